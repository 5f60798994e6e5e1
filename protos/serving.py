"""What every Prism gRPC server and client shares: message limits, health, reflection.

Each tier builds its `grpc.aio` server with `make_server`, which registers the
`grpc.health.v1` service (NOT_SERVING until the tier calls `set_serving`) and server
reflection. Large tensors travel in chunks of about CHUNK_BYTES; limits are raised on
both ends anyway.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # 256 KiB costs more per image in messages; 4 MiB gains nothing (bench/split_overhead.py)
MAX_MESSAGE_BYTES = 256 << 20

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class Served:
    """A started-or-not aio server plus its health servicer."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, services: list[str]):
        self.server = server
        self.health = health_servicer
        self.services = services
        self.port: int | None = None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:
            await self.health.set(name, status)

    async def serve_until(self, stop: asyncio.Event, announce: str,
                          on_started: Callable[[int], None] | None = None) -> None:
        """Health SERVING, `announce` logged, `on_started(port)` called; then wait for `stop`
        (the caller turns NOT_SERVING and drains)."""
        freeze_startup_heap()
        await self.set_serving(True)
        logger.info("%s", announce)
        if on_started is not None:
            on_started(self.port)
        await stop.wait()


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, weights' wrappers, tokenizer, imports) into the
    collector's permanent generation, so its full collections, which walk every tracked object
    and stop every thread, no longer walk them: on the 7B bench they paused serving for 270-330 ms
    (bench/RESULTS.md, "stalls"). What requests allocate later is still collected."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """Undo freeze_startup_heap once what it froze is being torn down (an embedded pipeline's
    close): frozen objects are never collected, and a model's modules and weights sit in
    reference cycles (a parameter's weight_loader is its module's bound method), so without
    this a closed pipeline kept its weights on the GPU."""
    gc.unfreeze()
    gc.collect()


def make_server(service_names: list[str], bind: str) -> Served:
    """An aio server bound to `bind` (host:port, port 0 = any free), with health
    (NOT_SERVING) and reflection registered for `service_names` (full names)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    served = Served(server, health_servicer, service_names)
    served.port = server.add_insecure_port(bind)
    if not served.port:
        raise ValueError(f"cannot bind a gRPC server to {bind}")
    return served


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event):
    """Set `stop` on SIGTERM/SIGINT while inside (only possible on the main thread;
    elsewhere, e.g. a server run by a test in a thread, cancellation stops it)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def channel(target: str) -> grpc.aio.Channel:
    """An aio channel to `target` (host:port) with Prism's message limits."""
    return grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)


async def wait_serving(target: str, timeout: float = 60.0, service: str = "") -> None:
    """Block until the server at `target` reports SERVING (or raise TimeoutError)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    async with channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.2)


def rpc_exception(what: str, error: grpc.aio.AioRpcError) -> Exception:
    """A lower tier's status as the exception its local engine would raise:
    INVALID_ARGUMENT → ValueError (the caller's bad input), DEADLINE_EXCEEDED →
    TimeoutError, anything else → RuntimeError naming `what` (e.g. 'llm service host:port')."""
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(error.details())
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(f"{what}: deadline exceeded")
    return RuntimeError(f"{what}: {code.name}: {error.details()}")
