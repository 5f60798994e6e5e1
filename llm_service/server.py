"""The LLM tier's gRPC server: `LLMService` over an `AsyncLLMEngine`.

The server starts before the model loads, so health answers NOT_SERVING while loading
(and again while draining on SIGTERM/SIGINT). A bad request is INVALID_ARGUMENT; a
client that cancels or runs past its deadline has its request aborted and its KV
blocks freed (the handler's cancellation closes the engine's stream). If a
tensor-parallel worker dies, health goes NOT_SERVING, in-flight requests fail and
`serve` raises, so the process exits non-zero instead of hanging.
Run it with `prism serve llm --model PATH [--vision HOST:PORT] [--tp N] --port P`.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from typing import AsyncIterator, Callable

import grpc

from llm_service.config import EngineConfig
from llm_service.engine import AsyncLLMEngine
from protos import llm_pb2, llm_pb2_grpc
from protos.serving import make_server, stop_on_signals

logger = logging.getLogger(__name__)

SERVICE_NAME = "prism.v1.LLMService"


# A streamed message costs grpc aio ~33 us of this process's event loop, which shares the GIL with
# the engine thread: 256 streams of one id a step took 8.5-13 ms of CPU a decode step
# (bench/split_overhead.py). So under load each stream's message waits for more ids: one more per
# STREAMS_PER_EXTRA_TOKEN concurrent streams (4 ids at 256 streams); with up to 64 streams, and for
# every first token, each id goes out as soon as it is sampled.
STREAMS_PER_EXTRA_TOKEN = 64


def tokens_per_chunk(streams: int) -> int:
    """Ids a streamed GenerateResponse waits for while `streams` Generate calls are running."""
    return 1 + max(0, streams - 1) // STREAMS_PER_EXTRA_TOKEN


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    """Serves one engine; `engine` is None until the model has loaded."""

    def __init__(self, engine: AsyncLLMEngine | None = None):
        self.engine = engine
        self.streams = 0  # Generate calls running (on the server's event loop only)

    async def _engine(self, context: grpc.aio.ServicerContext) -> AsyncLLMEngine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the language model is still loading")
        return self.engine

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        engine = await self._engine(context)
        stream = engine.generate(request, lambda: tokens_per_chunk(self.streams))
        self.streams += 1
        try:
            async for chunk in stream:
                yield chunk
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (RuntimeError, TimeoutError) as e:  # engine closed, or vision tier unreachable
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self.streams -= 1
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
    llm_pb2_grpc.add_LLMServiceServicer_to_server(servicer, served.server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
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
        with stop_on_signals(stop):
            vision = await asyncio.to_thread(_vision, model_path, config, vision_target)
            engine = await asyncio.to_thread(AsyncLLMEngine, model_path, config, vision)
            engine.engine.on_worker_failure(worker_failed)
            servicer.engine = engine
            await served.serve_until(stop, f"llm service SERVING on port {served.port}", on_started)
    finally:
        await served.set_serving(False)
        await served.server.stop(grace)  # drain: in-flight streams get `grace` seconds
        if engine is not None and failure:
            await asyncio.to_thread(_close_within, engine, grace)
        elif engine is not None:
            await asyncio.to_thread(engine.close)
        if vision is not None:
            await _close(vision)
        logger.info("llm service stopped")
    if failure:
        raise RuntimeError(f"the LLM service stopped: {failure[0]}")

