"""The LLM engine: request intake, scheduler, block manager, model runner, sampler."""
from llm_service.engine.async_engine import AsyncLLMEngine

__all__ = ["AsyncLLMEngine"]
