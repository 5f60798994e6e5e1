"""Prism's gateway tier and its Python face, which matches LMDeploy's VLM pipeline:
`from gateway import pipeline, GenerationConfig, ...` works where `lmdeploy` did.
Nothing imported here pulls in torch or transformers."""
from gateway.config import GenerationConfig, PytorchEngineConfig, Response, TurbomindEngineConfig, VisionConfig
from gateway.pipeline import Pipeline, Session, pipeline
from gateway.templates import ChatTemplateConfig

__all__ = ["pipeline", "Pipeline", "Session", "GenerationConfig", "TurbomindEngineConfig", "PytorchEngineConfig",
           "ChatTemplateConfig", "VisionConfig", "Response"]
