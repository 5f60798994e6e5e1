"""llm_service over gRPC on loopback: the server (with the vision tier as a gRPC client,
and embedded), LLMClient, INVALID_ARGUMENT → ValueError, cancellation freeing blocks."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from llm_service.client import LLMClient
from llm_service.config import EngineConfig
from llm_service.server import serve
from protos import llm_pb2, llm_pb2_grpc
from protos.serving import channel, wait_serving
from tests.test_llm_engine import PARTS, build_prompt, collect, hf_greedy, image_seg, request, run, text_seg
from vision_service.config import VisionConfig

CONFIG = dict(device="cpu", session_len=512, max_batch_size=4, block_size=16)


class Servers:
    """vision_service and llm_service served from one background event loop."""

    def __init__(self, model: str):
        self.model = model
        self.loop = asyncio.new_event_loop()
        self.targets: dict[str, str] = {}
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.tasks: list[asyncio.Task] = []

    async def _main(self) -> None:
        from vision_service.server import serve as serve_vision

        try:
            vision_port = asyncio.get_running_loop().create_future()
            self.tasks.append(asyncio.create_task(serve_vision(
                self.model, VisionConfig(device="cpu"), on_started=vision_port.set_result)))
            self.targets["vision"] = f"127.0.0.1:{await vision_port}"
            llm_port = asyncio.get_running_loop().create_future()
            self.tasks.append(asyncio.create_task(serve(
                self.model, EngineConfig(**CONFIG), self.targets["vision"], on_started=llm_port.set_result)))
            self.targets["llm"] = f"127.0.0.1:{await llm_port}"
        except BaseException as e:
            self.error = e
        finally:
            self.ready.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def __enter__(self) -> "Servers":
        self.thread.start()
        self.ready.wait(120)
        if self.error or "llm" not in self.targets:
            raise RuntimeError(f"servers did not start: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks:
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(30)


@pytest.fixture(scope="module")
def servers(tiny_llava):
    with Servers(str(tiny_llava)) as s:
        yield s


@pytest.fixture(scope="module")
def refs(tiny_llava):
    out = {}
    for name in ("fox", "one image", "two images"):
        prompt = build_prompt(tiny_llava, PARTS[name])
        out[name] = (prompt, hf_greedy(tiny_llava, prompt))
    return out


def _info(target: str) -> llm_pb2.LLMInfo:
    async def get():
        client = LLMClient(target)
        try:
            return await client.info()
        finally:
            await client.aclose()

    return run(get())


def _wait_all_free(target: str, timeout: float = 10.0) -> llm_pb2.LLMInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = _info(target)
        if (info.free_blocks == info.total_blocks and info.running == 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_round_trip_equals_hf(servers, refs):
    target = servers.targets["llm"]
    run(wait_serving(target, timeout=10))

    async def all_at_once():
        client = LLMClient(target)
        try:
            return await asyncio.gather(*(collect(client, request(p.segments, output_logits="generation"))
                                          for p, _ in refs.values()))
        finally:
            await client.aclose()

    for result, (prompt, ref) in zip(run(all_at_once()), refs.values()):
        assert result.tokens == ref.tokens
        assert result.usage.input_tokens == len(prompt.ids)
        assert sum(len(x) for x in result.logits) == len(ref.tokens)
    info = _wait_all_free(target)
    assert info.architecture == "LlavaForConditionalGeneration" and info.session_len == 512
    assert info.total_blocks == info.free_blocks > 0 and 2 in info.eos_token_ids


def test_streams_carry_more_ids_a_message_under_load(servers, refs, monkeypatch):
    """With many concurrent Generate calls each message waits for several ids (fewer messages for
    the server's event loop); the first id still goes alone, and the ids are the same."""
    from llm_service import server as llm_server

    assert [llm_server.tokens_per_chunk(n) for n in (1, 64, 65, 128, 129, 256)] == [1, 1, 2, 2, 3, 4]
    monkeypatch.setattr(llm_server, "STREAMS_PER_EXTRA_TOKEN", 1)  # 3 streams: 3 ids a message
    target = servers.targets["llm"]
    run(wait_serving(target, timeout=10))
    chosen = list(refs.values())

    async def all_at_once():
        client = LLMClient(target)
        try:
            async def sizes(prompt):
                out = []
                async for chunk in client.generate(request(prompt.segments)):
                    out.append(list(chunk.token_ids))
                return out

            return await asyncio.gather(*(sizes(p) for p, _ in chosen))
        finally:
            await client.aclose()

    results = run(all_at_once())
    for chunks, (prompt, ref) in zip(results, chosen):
        assert [i for c in chunks for i in c] == ref.tokens
        assert len(chunks[0]) == 1
    tokens = sum(len(ref.tokens) for _, ref in chosen)
    assert tokens >= 12 and sum(len(chunks) for chunks in results) < tokens  # ids shared messages
    _wait_all_free(target)


def test_bad_requests_are_invalid_argument(servers, refs):
    target = servers.targets["llm"]
    ok = refs["fox"][0].segments
    bad = {
        "top_p": request(ok, top_p=1.5),
        "session_len": request([text_seg([5] * 600)]),
        "image bytes": request([text_seg([1]), image_seg(b"\x89PNG not really")]),
    }

    async def raw(req):
        async with channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in llm_pb2_grpc.LLMServiceStub(ch).Generate(req):
                    pass
            return err.value

    async def via_client(req):
        client = LLMClient(target)
        try:
            with pytest.raises(ValueError) as err:
                await collect(client, req)
            return err.value
        finally:
            await client.aclose()

    for name, req in bad.items():
        err = run(raw(req))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details(), name
        assert str(run(via_client(req))), name
    assert _wait_all_free(target).free_blocks > 0

    async def still_serving():
        client = LLMClient(target)
        try:
            return await collect(client, request(ok))
        finally:
            await client.aclose()

    assert run(still_serving()).tokens == refs["fox"][1].tokens


def test_cancel_mid_stream_frees_blocks(servers, refs):
    target = servers.targets["llm"]
    prompt, ref = refs["one image"]

    async def two_chunks_then_close():
        client = LLMClient(target)
        try:
            stream = client.generate(request(prompt.segments, max_new_tokens=0, ignore_eos=True))
            got = [await stream.__anext__(), await stream.__anext__()]
            busy = await client.info()
            await stream.aclose()
            return got, busy
        finally:
            await client.aclose()

    got, busy = run(two_chunks_then_close())
    assert [t for c in got for t in c.token_ids] == ref.tokens[: sum(len(c.token_ids) for c in got)]
    assert busy.running == 1 and busy.free_blocks < busy.total_blocks
    info = _wait_all_free(target)
    assert info.free_blocks == info.total_blocks and info.running == 0


def test_serve_with_embedded_vision(tiny_llava, refs):
    prompt, ref = refs["two images"]

    async def main():
        port = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(str(tiny_llava), EngineConfig(**CONFIG), None, on_started=port.set_result))
        try:
            client = LLMClient(f"127.0.0.1:{await asyncio.wait_for(port, 60)}")
            result = await collect(client, request(prompt.segments))
            await client.aclose()
            return result
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert run(main()).tokens == ref.tokens
