"""`VisionEncoder` over gRPC: what llm_service uses when the vision tier runs apart.

The channel is opened on first use, so the client can be built outside the event
loop that will use it. Cancelling the task awaiting `encode` cancels the RPC, and
the server then drops that request's queued images. Encode's chunks are taken as
the bytes gRPC received, unparsed: `wire.EmbeddingAssembler` copies each payload
straight into its tensor, on a small pool of threads rather than the event loop.
That copy is most of a chunk's cost (into fresh memory it page-faults: ~0.5 ms per
MB on the dev VM, 15x the copy itself), and in llm_service the loop it would hold
is the one that also takes requests in and streams every other request's tokens.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import grpc

from protos import common_pb2, vision_pb2, vision_pb2_grpc
from protos.serving import channel, rpc_exception
from vision_service.types import ImageEmbedding
from vision_service.wire import EmbeddingAssembler

ENCODE_METHOD = f"/{vision_pb2.DESCRIPTOR.services_by_name['VisionService'].full_name}/Encode"
ASSEMBLY_THREADS = 4


class VisionClient:
    """Talks to a vision_service at `target` (host:port). `timeout` (seconds) is the
    default deadline of each call; None waits as long as it takes."""

    def __init__(self, target: str, timeout: float | None = None):
        self.target = target
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._encode: grpc.aio.UnaryStreamMultiCallable | None = None
        self._info: grpc.aio.UnaryUnaryMultiCallable | None = None
        # threads start on first use and end with the client
        self._assembly = ThreadPoolExecutor(max_workers=ASSEMBLY_THREADS, thread_name_prefix="vision-assembly")

    def _calls(self) -> tuple[grpc.aio.UnaryStreamMultiCallable, grpc.aio.UnaryUnaryMultiCallable]:
        """Encode and Info, on a channel opened on first use. Encode has no deserializer: its
        chunks come as the bytes received."""
        if self._channel is None:
            self._channel = channel(self.target)
            self._encode = self._channel.unary_stream(
                ENCODE_METHOD, request_serializer=vision_pb2.EncodeRequest.SerializeToString)
            self._info = vision_pb2_grpc.VisionServiceStub(self._channel).Info
        return self._encode, self._info

    def _error(self, e: grpc.aio.AioRpcError) -> Exception:
        return rpc_exception(f"vision service {self.target}", e)

    async def encode(
        self, images: Sequence[common_pb2.ImageInput], timeout: float | None = None
    ) -> list[ImageEmbedding]:
        """Embeddings (on CPU, in the server's model dtype) in the order of `images`."""
        if not images:
            return []
        encode, _ = self._calls()
        call = encode(
            vision_pb2.EncodeRequest(images=list(images)),
            timeout=self.timeout if timeout is None else timeout,
        )
        assembler = EmbeddingAssembler(len(images))
        loop = asyncio.get_running_loop()
        try:
            async for chunk in call:  # one chunk at a time per call: an assembler is never shared
                await loop.run_in_executor(self._assembly, assembler.add, chunk)
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
            _, info = self._calls()
            return await info(
                vision_pb2.VisionInfoRequest(), timeout=self.timeout if timeout is None else timeout
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._encode = self._info = None

    async def __aenter__(self) -> "VisionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
