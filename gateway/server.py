"""The Gateway gRPC service over a ChatService.

Bad input (ValueError) is INVALID_ARGUMENT with the message; an error status from the
LLM tier is passed on with its code. A client that cancels or goes away cancels the
handler task, which closes the LLM stream, which aborts the request in the LLM tier.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from gateway.messages import normalize_messages
from gateway.service import ChatService, collect
from gateway.templates import ChatTemplateConfig
from gateway.wire import gen_config_from_proto, messages_from_proto, response_to_proto, template_from_proto
from protos import gateway_pb2, gateway_pb2_grpc
from protos.serving import Served, make_server, stop_on_signals, wait_serving

logger = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
VERSION = "0.1.0"
DRAIN_SECONDS = 30.0
LLM_WAIT_SECONDS = 900.0  # the LLM tier may still be loading weights


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, service: ChatService, llm_target: str = "", allow_local_files: bool = False):
        self.service = service
        self.llm_target = llm_target
        self.allow_local_files = allow_local_files

    def _parse(self, request: gateway_pb2.ChatRequest):
        messages = normalize_messages(messages_from_proto(request.messages, self.allow_local_files))
        gen_config = gen_config_from_proto(request.gen_config)
        template = template_from_proto(request.chat_template) if request.HasField("chat_template") else None
        return messages, gen_config, template

    async def _deltas(self, request: gateway_pb2.ChatRequest, context: grpc.aio.ServicerContext):
        try:
            messages, gen_config, template = self._parse(request)
            async for delta in self.service.stream(messages, gen_config, template,
                                                   request_id=request.request_id or None):
                yield delta
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:  # an LLM tier failure: report it, keep serving
            logger.exception("request %s failed", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")

    async def Chat(self, request, context):
        return response_to_proto(await collect(self._deltas(request, context)))

    async def ChatStream(self, request, context):
        async for delta in self._deltas(request, context):
            yield response_to_proto(delta)

    async def Info(self, request, context):
        info = await self.service.info()
        return gateway_pb2.GatewayInfo(model=self.service.model_path, chat_template=self.service.template.name,
                                       llm_target=self.llm_target, session_len=info.session_len, version=VERSION)

    async def Models(self, request, context):
        info = await self.service.info()
        card = gateway_pb2.ModelCard(id=self.service.model_path, architecture=info.architecture,
                                     session_len=info.session_len)
        return gateway_pb2.ModelsResponse(models=[card])


def build_server(service: ChatService, bind: str = "127.0.0.1:0", llm_target: str = "",
                 allow_local_files: bool = False) -> Served:
    """A gateway server (not started; health NOT_SERVING) over `service`."""
    served = make_server([SERVICE_NAME], bind)
    servicer = GatewayServicer(service, llm_target, allow_local_files)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, served.server)
    return served


async def serve(model_path: str, llm_target: str, chat_template_config: ChatTemplateConfig | None = None,
                bind: str = "127.0.0.1:0", on_started: Callable[[int], None] | None = None,
                allow_local_files: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation): NOT_SERVING while the LLM tier is
    not yet SERVING, SERVING after, NOT_SERVING again while draining."""
    from llm_service.client import LLMClient

    llm = LLMClient(llm_target)
    served = build_server(ChatService(model_path, llm, chat_template_config), bind, llm_target, allow_local_files)
    stop = asyncio.Event()
    await served.server.start()
    try:
        with stop_on_signals(stop):
            await wait_serving(llm_target, timeout=LLM_WAIT_SECONDS)
            await served.serve_until(stop, f"gateway serving on port {served.port} (llm {llm_target})", on_started)
    finally:
        await served.set_serving(False)
        await asyncio.shield(served.server.stop(DRAIN_SECONDS))
        await llm.aclose()
