"""The vision tier's gRPC server: `VisionService` over a `VisionEngine`.

The server starts before the model loads so health checks answer NOT_SERVING
while loading (and again while draining). Bad images map to INVALID_ARGUMENT;
a client that cancels has its queued images dropped by the engine. Encode yields
its chunks already serialized (`wire.to_wire`), so the service is registered here
rather than by the generated helper, whose serializer wants messages.
Run it with `prism serve vision --model PATH --device cuda:1 --port P`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import grpc

from protos import vision_pb2, vision_pb2_grpc
from protos.serving import Served, make_server, stop_on_signals
from vision_service.config import VisionConfig
from vision_service.engine import VisionEngine
from vision_service.wire import to_wire

logger = logging.getLogger(__name__)

SERVICE_NAME = "prism.v1.VisionService"


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    """Serves one engine; `engine` is None until the model has loaded."""

    def __init__(self, engine: VisionEngine | None = None):
        self.engine = engine

    async def _engine(self, context: grpc.aio.ServicerContext) -> VisionEngine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "vision model is still loading")
        return self.engine

    async def Encode(
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each image's serialized EmbeddingChunks, in order."""
        engine = await self._engine(context)
        try:
            embeddings = await engine.encode(request.images)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:  # engine closed or forward failed
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        for index, emb in enumerate(embeddings):
            for chunk in to_wire(index, emb):
                yield chunk

    async def Info(self, request: vision_pb2.VisionInfoRequest, context: grpc.aio.ServicerContext) -> vision_pb2.VisionInfo:
        return (await self._engine(context)).info()


def build_server(servicer: VisionServicer, bind: str = "127.0.0.1:0") -> Served:
    """A vision server (not started; health NOT_SERVING) over `servicer`."""
    served = make_server([SERVICE_NAME], bind)
    handlers = {
        "Encode": grpc.unary_stream_rpc_method_handler(  # no serializer: the chunks come serialized
            servicer.Encode, request_deserializer=vision_pb2.EncodeRequest.FromString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=vision_pb2.VisionInfoRequest.FromString,
            response_serializer=vision_pb2.VisionInfo.SerializeToString),
    }
    served.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    served.server.add_registered_method_handlers(SERVICE_NAME, handlers)
    return served


async def serve(
    model_path: str,
    config: VisionConfig,
    bind: str = "127.0.0.1:0",
    on_started: Callable[[int], None] | None = None,
    grace: float = 5.0,
) -> None:
    """Serve until cancelled or SIGTERM/SIGINT; `on_started(port)` once SERVING."""
    servicer = VisionServicer()
    served = build_server(servicer, bind)
    stop = asyncio.Event()
    await served.server.start()
    engine: VisionEngine | None = None
    try:
        with stop_on_signals(stop):
            engine = await asyncio.to_thread(VisionEngine, model_path, config)
            servicer.engine = engine
            await served.serve_until(stop, f"vision service SERVING on port {served.port}", on_started)
    finally:
        await served.set_serving(False)
        await served.server.stop(grace)
        if engine is not None:
            await asyncio.to_thread(engine.close)
        logger.info("vision service stopped")
