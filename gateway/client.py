"""A client of a running gateway with ChatService's interface, so `pipeline('grpc://...')`
is the same Pipeline over the network. PIL images and local files are read here and
sent as bytes (the gateway may run elsewhere); http(s) and data URLs are sent as URLs.
INVALID_ARGUMENT comes back as ValueError, like the embedded pipeline raises.
"""
from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc

from gateway.config import GenerationConfig, Response
from gateway.service import collect, prepare_in_order
from gateway.templates import ChatTemplateConfig
from gateway.wire import gen_config_to_proto, messages_to_proto, response_from_proto, template_to_proto
from protos import gateway_pb2, gateway_pb2_grpc
from protos.serving import channel


class GatewayClient:
    """Create it inside the event loop that will use it (grpc.aio channels bind to one)."""

    def __init__(self, target: str, chat_template_config: ChatTemplateConfig | None = None):
        self.target = target.removeprefix("grpc://")
        self.template = chat_template_config
        self._channel = channel(self.target)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def prepare(self, messages: list[dict], gen_config: GenerationConfig | None = None,
                template_override: ChatTemplateConfig | None = None, do_preprocess: bool = True,
                request_id: str | None = None) -> gateway_pb2.ChatRequest:
        """ChatService.prepare's counterpart: the request, local images read and encoded (blocking)."""
        if not do_preprocess:
            raise ValueError("do_preprocess=False is not supported through a gateway")
        request = gateway_pb2.ChatRequest(messages=messages_to_proto(messages),
                                          gen_config=gen_config_to_proto(gen_config or GenerationConfig()),
                                          request_id=request_id or uuid.uuid4().hex)
        template = template_override or self.template
        if template is not None:
            request.chat_template.CopyFrom(template_to_proto(template))
        return request

    async def stream(self, messages: list[dict], gen_config: GenerationConfig | None = None,
                     template_override: ChatTemplateConfig | None = None, index: int = 0,
                     do_preprocess: bool = True, request_id: str | None = None) -> AsyncIterator[Response]:
        request = await prepare_in_order(self.prepare, messages, gen_config, template_override, do_preprocess,
                                         request_id)
        async with aclosing(self.stream_prepared(request, index)) as deltas:
            async for delta in deltas:
                yield delta

    async def stream_prepared(self, request: gateway_pb2.ChatRequest, index: int = 0) -> AsyncIterator[Response]:
        call = self._stub.ChatStream(request)
        try:
            async for reply in call:
                yield response_from_proto(reply, index)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(err.details()) from None
            raise
        finally:
            call.cancel()  # no-op once finished; aborts the request if we stopped early

    async def chat(self, messages: list[dict], gen_config: GenerationConfig | None = None,
                   template_override: ChatTemplateConfig | None = None, index: int = 0,
                   do_preprocess: bool = True, request_id: str | None = None) -> Response:
        return await collect(self.stream(messages, gen_config, template_override, index, do_preprocess, request_id))

    async def info(self) -> gateway_pb2.GatewayInfo:
        return await self._stub.Info(gateway_pb2.GatewayInfoRequest())

    async def close(self) -> None:
        await self._channel.close()
