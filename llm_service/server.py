"""The LLM tier's gRPC server: `LLMService` over an `AsyncLLMEngine`.

The server starts before the model loads, so health answers NOT_SERVING while loading
(and again while draining on SIGTERM/SIGINT). A bad request is INVALID_ARGUMENT; a
client that cancels or runs past its deadline has its request aborted and its KV
blocks freed (the handler's cancellation closes the engine's stream). If a
tensor-parallel worker dies, health goes NOT_SERVING, in-flight requests fail and
`serve` raises, so the process exits non-zero instead of hanging.

    python -m llm_service.server --model PATH [--vision HOST:PORT] --port 50051
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import signal
import threading
from typing import AsyncIterator, Callable

import grpc

from llm_service.config import EngineConfig
from llm_service.engine import AsyncLLMEngine
from protos import llm_pb2, llm_pb2_grpc
from protos.serving import make_server

logger = logging.getLogger(__name__)

SERVICE_NAME = "prism.v1.LLMService"


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    """Serves one engine; `engine` is None until the model has loaded."""

    def __init__(self, engine: AsyncLLMEngine | None = None):
        self.engine = engine

    async def _engine(self, context: grpc.aio.ServicerContext) -> AsyncLLMEngine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the language model is still loading")
        return self.engine

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        engine = await self._engine(context)
        stream = engine.generate(request)
        try:
            async for chunk in stream:
                yield chunk
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (RuntimeError, TimeoutError) as e:  # engine closed, or vision tier unreachable
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            await stream.aclose()  # on cancellation: aborts the request, frees its blocks

    async def Info(self, request: llm_pb2.LLMInfoRequest, context: grpc.aio.ServicerContext) -> llm_pb2.LLMInfo:
        return await (await self._engine(context)).info()


def _vision(model_path: str, config: EngineConfig, vision_target: str | None):
    """A gRPC client to the vision tier, or (target None) the vision engine in-process;
    None for a text-only checkpoint."""
    if vision_target:
        from vision_service.client import VisionClient

        return VisionClient(vision_target)
    from llm_service.models.loader import read_spec

    if read_spec(model_path).image_token_id is None:
        return None
    from vision_service.config import VisionConfig
    from vision_service.engine import VisionEngine

    return VisionEngine(model_path, VisionConfig(device=config.device))


async def _close(obj) -> None:
    result = obj.close()
    if inspect.isawaitable(result):
        await result


def _close_within(engine: AsyncLLMEngine, seconds: float) -> None:
    """engine.close, given up on after `seconds`: after a worker died a NCCL collective
    may never return, and the process is about to exit anyway."""
    thread = threading.Thread(target=engine.close, name="llm-close", daemon=True)
    thread.start()
    thread.join(seconds)


async def serve(
    model_path: str,
    config: EngineConfig,
    vision_target: str | None,
    bind: str = "127.0.0.1:0",
    on_started: Callable[[int], None] | None = None,
    grace: float = 5.0,
) -> None:
    """Serve until cancelled or SIGTERM/SIGINT; `on_started(port)` once SERVING.
    RuntimeError once drained if a tensor-parallel worker died."""
    servicer = LLMServicer()
    served = make_server([SERVICE_NAME], bind)
    if not served.port:
        raise ValueError(f"cannot bind the LLM service to {bind}")
    llm_pb2_grpc.add_LLMServiceServicer_to_server(servicer, served.server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    await served.server.start()
    vision = engine = None
    failure: list[str] = []

    def worker_failed(reason: str) -> None:  # on the TP watchdog thread
        def fail() -> None:
            failure.append(reason)
            stop.set()

        try:
            loop.call_soon_threadsafe(fail)
        except RuntimeError:  # the loop has closed: we are gone already
            pass

    try:
        vision = await asyncio.to_thread(_vision, model_path, config, vision_target)
        engine = await asyncio.to_thread(AsyncLLMEngine, model_path, config, vision)
        engine.engine.on_worker_failure(worker_failed)
        servicer.engine = engine
        await served.set_serving(True)
        logger.info("llm service SERVING on port %d", served.port)
        if on_started is not None:
            on_started(served.port)
        await stop.wait()
    finally:
        await served.set_serving(False)
        await served.server.stop(grace)  # drain: in-flight streams get `grace` seconds
        if engine is not None and failure:
            await asyncio.to_thread(_close_within, engine, grace)
        elif engine is not None:
            await asyncio.to_thread(engine.close)
        if vision is not None:
            await _close(vision)
        for sig in signals:
            loop.remove_signal_handler(sig)
        logger.info("llm service stopped")
    if failure:
        raise RuntimeError(f"the LLM service stopped: {failure[0]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prism LLM service (paged KV cache, continuous batching).")
    parser.add_argument("--model", required=True, help="checkpoint folder (HF layout)")
    parser.add_argument("--vision", default=None, help="vision tier HOST:PORT (default: in-process)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--session-len", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--cache-max-entry-count", type=float, default=0.8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-prefill-token-num", type=int, default=8192)
    parser.add_argument("--enable-prefix-caching", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(
        dtype=args.dtype, tp=args.tp, session_len=args.session_len, max_batch_size=args.max_batch_size,
        cache_max_entry_count=args.cache_max_entry_count, block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, max_prefill_token_num=args.max_prefill_token_num,
        device=args.device,
    )

    def started(port: int) -> None:
        print(f"llm_service listening on {args.host}:{port}", flush=True)

    asyncio.run(serve(args.model, config, args.vision, f"{args.host}:{args.port}", on_started=started))


if __name__ == "__main__":
    main()
