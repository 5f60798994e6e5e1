"""`LLMClient`: the gateway → LLM seam over gRPC, with the engine's interface.

`generate` streams GenerateResponse chunks; INVALID_ARGUMENT comes back as ValueError,
as from the in-process engine. Closing the generator (or cancelling the task consuming
it) cancels the RPC, and the server then aborts the request and frees its KV blocks.
A channel is opened per event loop on first use, so callers may live on any loop.
"""
from __future__ import annotations

import asyncio
import weakref
from typing import AsyncIterator

import grpc

from protos import llm_pb2, llm_pb2_grpc
from protos.serving import channel, rpc_exception


class LLMClient:
    """Talks to an llm_service at `target` (host:port). `timeout` (seconds) is the
    default deadline of each call; None waits as long as it takes."""

    def __init__(self, target: str, timeout: float | None = None):
        self.target = target
        self.timeout = timeout
        self._channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, grpc.aio.Channel] = (
            weakref.WeakKeyDictionary()
        )

    def _stub(self) -> llm_pb2_grpc.LLMServiceStub:
        loop = asyncio.get_running_loop()
        ch = self._channels.get(loop)
        if ch is None:
            ch = self._channels[loop] = channel(self.target)
        return llm_pb2_grpc.LLMServiceStub(ch)

    def _error(self, e: grpc.aio.AioRpcError) -> Exception:
        return rpc_exception(f"llm service {self.target}", e)

    async def generate(
        self, request: llm_pb2.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        call = self._stub().Generate(request, timeout=self.timeout if timeout is None else timeout)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        finally:
            call.cancel()  # no-op once the stream has ended

    async def info(self, timeout: float | None = None) -> llm_pb2.LLMInfo:
        try:
            return await self._stub().Info(llm_pb2.LLMInfoRequest(), timeout=self.timeout if timeout is None else timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

    async def aclose(self) -> None:
        """Close the current loop's channel and wait for it; the others as `close` does."""
        ch = self._channels.pop(asyncio.get_running_loop(), None)
        self.close()
        if ch is not None:
            await ch.close()

    def close(self) -> None:
        """Close every channel, each on its own loop (callable from any thread)."""
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        channels, self._channels = list(self._channels.items()), weakref.WeakKeyDictionary()
        for loop, ch in channels:
            if loop is current:
                loop.create_task(ch.close())
            elif not loop.is_closed():
                loop.call_soon_threadsafe(lambda ch=ch: asyncio.ensure_future(ch.close()))
