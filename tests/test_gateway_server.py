"""The Gateway gRPC server over a fake LLM: Chat, ChatStream, Info/Models, health,
INVALID_ARGUMENT for bad input, client cancellation reaching the LLM, and the same
Pipeline API through `pipeline('grpc://...')`."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import GenerationConfig, pipeline
from gateway.server import build_server
from gateway.service import ChatService
from gateway.tokenizer import Tokenizer
from protos import gateway_pb2, gateway_pb2_grpc
from tests.conftest import make_image
from tests.test_gateway_service import FakeLLM

TEXT = " the quick brown fox jumps over the lazy dog"


class _Server:
    """A gateway over a FakeLLM, on its own loop in a thread (pipelines run their own)."""

    def __init__(self, model_path: str, llm: FakeLLM):
        self.llm, self.model_path = llm, model_path
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.served = self.run(self._start(model_path))
        self.target = f"127.0.0.1:{self.served.port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self, model_path):
        served = build_server(ChatService(model_path, self.llm), "127.0.0.1:0", "fake-llm:0")
        await served.server.start()
        await served.set_serving(True)
        return served

    def stop(self):
        self.run(self.served.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def server(tiny_llava):
    tok = Tokenizer(tiny_llava)
    srv = _Server(str(tiny_llava), FakeLLM(tok.encode(TEXT, add_special_tokens=False) + [2], chunk=2, delay=0.002))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield gateway_pb2_grpc.GatewayStub(ch)


def _request(text="describe this image", image: bytes | None = None, url: str | None = None, **gen):
    message = gateway_pb2.Message(role="user", content=[gateway_pb2.ContentPart(text=text)])
    if image is not None:
        message.content.add(image=gateway_pb2.ImageRef(data=image))
    if url is not None:
        message.content.add(image=gateway_pb2.ImageRef(url=url))
    return gateway_pb2.ChatRequest(messages=[message], gen_config=gateway_pb2.GenerationConfig(**gen))


def _png(seed=1) -> bytes:
    import io

    buffer = io.BytesIO()
    make_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_serving(server):
    with grpc.insecure_channel(server.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="prism.v1.Gateway"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_chat_and_stream_agree(stub, tiny_llava):
    whole = stub.Chat(_request(image=_png(), output_logits="generation"))
    chunks = list(stub.ChatStream(_request(image=_png(), output_logits="generation")))
    assert whole.finish_reason == "stop" and whole.text == TEXT
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1) and chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert whole.generate_token_len == len(whole.token_ids) and whole.input_token_len > 16
    logits = np.frombuffer(whole.logits.data, dtype=np.float32).reshape(list(whole.logits.shape))
    assert list(logits.argmax(-1)) == list(whole.token_ids)


def test_info_and_models(stub, tiny_llava):
    info = stub.Info(gateway_pb2.GatewayInfoRequest())
    assert (info.model, info.chat_template, info.llm_target, info.session_len) == \
        (str(tiny_llava), "llava-v1", "fake-llm:0", 2048)
    [card] = stub.Models(gateway_pb2.ModelsRequest()).models
    assert card.architecture == "FakeForCausalLM"


@pytest.mark.parametrize("request_,match", [
    (_request(top_p=0.0), "top_p"),
    (_request(n=2), "n=2"),
    (_request(output_logits="all"), "'all'"),
    (_request(text="<IMAGE_TOKEN> <IMAGE_TOKEN>", image=b"\x89PNG"), "IMAGE_TOKEN"),
    (_request(image=b"not an image"), "cannot decode"),
    (_request(url="ftp://example.com/a.png"), "scheme"),
    (gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(role="robot", content=[gateway_pb2.ContentPart(
        text="x")])]), "role"),
    (gateway_pb2.ChatRequest(), "unsupported prompt"),
    (gateway_pb2.ChatRequest(messages=_request().messages, chat_template=gateway_pb2.ChatTemplate(model_name="nope")),
     "known templates"),
])
def test_invalid_argument(stub, request_, match):
    for call in (stub.Chat, lambda r: list(stub.ChatStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert match in err.value.details()


def test_client_cancel_aborts_the_llm_request(server, stub):
    before = len(server.llm.aborted)
    call = stub.ChatStream(_request(max_new_tokens=500, ignore_eos=True))
    next(call)
    call.cancel()
    assert _wait_for(lambda: len(server.llm.aborted) == before + 1)


@pytest.fixture(scope="module")
def remote(server):
    pipe = pipeline(f"grpc://{server.target}")
    yield pipe
    pipe.close()


def test_pipeline_over_grpc(remote, server, tmp_path):
    path = tmp_path / "x.png"
    make_image(3).save(path)
    response = remote(("describe this image", str(path)), gen_config=GenerationConfig(output_logits="generation"))
    assert response.text == TEXT and response.finish_reason == "stop"
    assert tuple(response.logits.shape) == (len(response.token_ids), 489)
    sent = server.llm.requests[-1].segments[1].image.image
    assert sent.data == path.read_bytes()  # a local file travels as its own bytes


def test_pipeline_batch_stream_and_chat(remote, server):
    images = [make_image(10 + i) for i in range(3)]
    responses = remote([("describe this image", image) for image in images], gen_config=GenerationConfig(max_new_tokens=3))
    assert [r.index for r in responses] == [0, 1, 2] and all(r.finish_reason == "length" for r in responses)

    deltas = list(remote.stream_infer(["a", "b"], gen_config=GenerationConfig(max_new_tokens=4)))
    four = Tokenizer(server.model_path).decode(server.llm.script[:4])
    for index in (0, 1):
        mine = [d for d in deltas if d.index == index]
        assert "".join(d.text for d in mine) == four
        assert mine[-1].generate_token_len == 4 and mine[-1].finish_reason == "length"

    session = remote.chat(("describe this image", images[0]), gen_config=GenerationConfig(max_new_tokens=3))
    session = remote.chat("What is it doing?", session=session, gen_config=GenerationConfig(max_new_tokens=3))
    assert [text for _, text in session.history] == [responses[0].text] * 2
    second = server.llm.requests[-1]
    assert sum(s.WhichOneof("kind") == "image" for s in second.segments) == 1  # the image is re-sent

    with pytest.raises(ValueError, match="IMAGE_TOKEN"):  # the server's INVALID_ARGUMENT
        remote(("<IMAGE_TOKEN><IMAGE_TOKEN>", images[0]))


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_stream_infer_errors_and_early_exit(remote, server):
    with pytest.raises(ValueError, match="IMAGE_TOKEN"):
        list(remote.stream_infer(["fine", ("<IMAGE_TOKEN><IMAGE_TOKEN>", make_image(1))]))
    before = len(server.llm.aborted)
    stream = remote.stream_infer("x", gen_config=GenerationConfig(max_new_tokens=500, ignore_eos=True))
    assert next(stream).index == 0
    stream.close()  # the consumer walks away: the gateway and the LLM request are cancelled
    assert _wait_for(lambda: len(server.llm.aborted) > before)


def test_server_path_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, gateway, gateway.server, gateway.client, gateway.pipeline; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class _FakeLLMServicer:
    """llm_service's gRPC face over a FakeLLM, so `serve` runs against a real socket."""

    def __init__(self, llm: FakeLLM):
        self.llm = llm

    async def Generate(self, request, context):
        async for chunk in self.llm.generate(request):
            yield chunk

    async def Info(self, request, context):
        return await self.llm.info()


def test_serve_waits_for_the_llm_and_drains_on_sigterm(tiny_llava):
    import re
    import signal
    import subprocess
    import sys

    from protos import llm_pb2_grpc
    from protos.serving import make_server

    tok = Tokenizer(tiny_llava)
    llm = FakeLLM(tok.encode(TEXT, add_special_tokens=False) + [2])
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start_llm():
        served = make_server(["prism.v1.LLMService"], "127.0.0.1:0")
        llm_pb2_grpc.add_LLMServiceServicer_to_server(_FakeLLMServicer(llm), served.server)
        await served.server.start()
        await served.set_serving(True)
        return served

    llm_served = asyncio.run_coroutine_threadsafe(start_llm(), loop).result()
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "gateway", "--model", str(tiny_llava),
           "--llm", f"127.0.0.1:{llm_served.port}", "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"serving on (\S+):(\d+)", line)
        assert match, line + process.stdout.read() if process.poll() is not None else line
        with grpc.insecure_channel(f"127.0.0.1:{match.group(2)}") as ch:
            reply = gateway_pb2_grpc.GatewayStub(ch).Chat(_request())
        assert reply.text == TEXT and reply.finish_reason == "stop"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        asyncio.run_coroutine_threadsafe(llm_served.server.stop(None), loop).result()
        loop.call_soon_threadsafe(loop.stop)


def test_generation_config_round_trips_over_the_wire():
    from gateway.wire import gen_config_from_proto, gen_config_to_proto

    for config in (GenerationConfig(), GenerationConfig(max_new_tokens=None, top_k=3, stop_words=["x"], random_seed=9),
                   GenerationConfig(top_k=40, do_sample=False, output_logits="generation", min_new_tokens=2)):
        assert gen_config_from_proto(gen_config_to_proto(config)) == config
    assert gen_config_from_proto(gateway_pb2.GenerationConfig(top_k=40)).do_sample is True  # other languages too
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen_config_from_proto(gateway_pb2.GenerationConfig(max_new_tokens=0))


def test_local_paths_refused_unless_allowed(tmp_path):
    from gateway.wire import messages_from_proto

    path = tmp_path / "secret.png"
    make_image(4).save(path)
    message = gateway_pb2.Message(role="user")
    message.content.add(image=gateway_pb2.ImageRef(url=str(path)))
    with pytest.raises(ValueError, match="allow-local-files"):
        messages_from_proto([message])
    assert messages_from_proto([message], allow_local_files=True)[0]["content"][0]["image_url"]["url"] == str(path)
