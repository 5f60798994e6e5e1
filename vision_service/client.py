"""`VisionEncoder` over gRPC: what llm_service uses when the vision tier runs apart.

The channel is opened on first use, so the client can be built outside the event
loop that will use it. Cancelling the task awaiting `encode` cancels the RPC, and
the server then drops that request's queued images.
"""
from __future__ import annotations

import asyncio
from typing import Sequence

import grpc

from protos import common_pb2, vision_pb2, vision_pb2_grpc
from protos.serving import channel, rpc_exception
from vision_service.types import ImageEmbedding
from vision_service.wire import EmbeddingAssembler


class VisionClient:
    """Talks to a vision_service at `target` (host:port). `timeout` (seconds) is the
    default deadline of each call; None waits as long as it takes."""

    def __init__(self, target: str, timeout: float | None = None):
        self.target = target
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: vision_pb2_grpc.VisionServiceStub | None = None

    def _get_stub(self) -> vision_pb2_grpc.VisionServiceStub:
        if self._stub is None:
            self._channel = channel(self.target)
            self._stub = vision_pb2_grpc.VisionServiceStub(self._channel)
        return self._stub

    def _error(self, e: grpc.aio.AioRpcError) -> Exception:
        return rpc_exception(f"vision service {self.target}", e)

    async def encode(
        self, images: Sequence[common_pb2.ImageInput], timeout: float | None = None
    ) -> list[ImageEmbedding]:
        """Embeddings (on CPU, in the server's model dtype) in the order of `images`."""
        if not images:
            return []
        call = self._get_stub().Encode(
            vision_pb2.EncodeRequest(images=list(images)),
            timeout=self.timeout if timeout is None else timeout,
        )
        assembler = EmbeddingAssembler(len(images))
        try:
            async for chunk in call:
                assembler.add(chunk)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        except RuntimeError:  # a malformed stream: stop the server sending the rest
            call.cancel()
            raise
        return assembler.finish()

    async def info(self, timeout: float | None = None) -> vision_pb2.VisionInfo:
        try:
            return await self._get_stub().Info(
                vision_pb2.VisionInfoRequest(), timeout=self.timeout if timeout is None else timeout
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> "VisionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
