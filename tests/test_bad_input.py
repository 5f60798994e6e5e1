"""Bad input gets a clear error (INVALID_ARGUMENT over gRPC, ValueError in Python), and
every tier stays healthy with no KV block leaked."""
from __future__ import annotations

import io
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import ChatTemplateConfig, GenerationConfig, pipeline
from gateway.vl import load_image
from gateway.vl.constants import IMAGE_TOKEN
from protos import gateway_pb2, gateway_pb2_grpc, llm_pb2, llm_pb2_grpc
from tests.conftest import make_image

LONG_TEXT = "describe this image " * 1200  # ~2400+ tokens > session_len (2048)


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def _user(*parts) -> gateway_pb2.Message:
    return gateway_pb2.Message(role="user", content=list(parts))


def _text(text: str) -> gateway_pb2.ContentPart:
    return gateway_pb2.ContentPart(text=text)


def _image(**source) -> gateway_pb2.ContentPart:
    return gateway_pb2.ContentPart(image=gateway_pb2.ImageRef(**source))


BAD_REQUESTS = {
    "corrupt image bytes": dict(messages=[_user(_text("hi"), _image(data=b"\x89PNG not really"))]),
    "unsupported url scheme": dict(messages=[_user(_text("hi"), _image(url="ftp://127.0.0.1/x.png"))]),
    "unreachable url": dict(messages=[_user(_text("hi"), _image(url="http://127.0.0.1:9/x.png"))]),
    "prompt longer than session_len": dict(messages=[_user(_text(LONG_TEXT))]),
    "top_p > 1": dict(messages=[_user(_text("hi"))], gen_config=gateway_pb2.GenerationConfig(top_p=1.5)),
    "temperature < 0": dict(messages=[_user(_text("hi"))], gen_config=gateway_pb2.GenerationConfig(temperature=-0.5)),
    "max_new_tokens < 1": dict(messages=[_user(_text("hi"))], gen_config=gateway_pb2.GenerationConfig(max_new_tokens=0)),
    "unknown template": dict(messages=[_user(_text("hi"))], chat_template=gateway_pb2.ChatTemplate(model_name="no-such-template")),
    "more IMAGE_TOKENs than images": dict(messages=[_user(_text(f"{IMAGE_TOKEN} and {IMAGE_TOKEN}"), _image(data=_png()))]),
}


def _assert_healthy(tiers) -> None:
    for name, tier in tiers.tiers.items():
        with grpc.insecure_channel(tier.target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name


def _llm_info(tiers) -> llm_pb2.LLMInfo:
    with grpc.insecure_channel(tiers.tiers["llm"].target) as ch:
        return llm_pb2_grpc.LLMServiceStub(ch).Info(llm_pb2.LLMInfoRequest(), timeout=5)


def _wait_all_blocks_free(tiers, timeout: float = 10.0) -> llm_pb2.LLMInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = _llm_info(tiers)
        if info.free_blocks == info.total_blocks and info.running == 0 or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_grpc_bad_input_is_invalid_argument(case, split_tiers):
    with grpc.insecure_channel(split_tiers.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(gateway_pb2.ChatRequest(**BAD_REQUESTS[case]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details(), "the error must say what was wrong"
    _assert_healthy(split_tiers)
    info = _wait_all_blocks_free(split_tiers)
    assert info.free_blocks == info.total_blocks
    # and it still serves
    with grpc.insecure_channel(split_tiers.gateway) as ch:
        reply = gateway_pb2_grpc.GatewayStub(ch).Chat(gateway_pb2.ChatRequest(
            messages=[_user(_text("hello"), _image(data=_png(1)))],
            gen_config=gateway_pb2.GenerationConfig(max_new_tokens=4)), timeout=60)
    assert reply.generate_token_len > 0


def test_cancel_mid_stream_frees_kv_blocks(split_tiers):
    request = gateway_pb2.ChatRequest(
        messages=[_user(_text("describe this image"), _image(data=_png(2)))],
        gen_config=gateway_pb2.GenerationConfig(max_new_tokens=1500, ignore_eos=True))
    with grpc.insecure_channel(split_tiers.gateway) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).ChatStream(request, timeout=120)
        chunks = [next(call) for _ in range(3)]
        assert all(chunk.token_ids for chunk in chunks)
        busy = _llm_info(split_tiers)
        assert busy.free_blocks < busy.total_blocks  # the request holds blocks while it runs
        call.cancel()
    info = _wait_all_blocks_free(split_tiers)
    assert info.free_blocks == info.total_blocks and info.running == 0
    _assert_healthy(split_tiers)


def test_python_bad_input_is_value_error(embedded, tiny_llava):
    image = make_image(3)
    cases = [
        lambda: load_image("data:image/png;base64,bm90IGFuIGltYWdl"),  # corrupt bytes
        lambda: load_image("ftp://127.0.0.1/x.png"),
        lambda: load_image("http://127.0.0.1:9/x.png"),
        lambda: embedded((LONG_TEXT, image)),
        lambda: embedded(("hi", image), gen_config=GenerationConfig(top_p=1.5)),
        lambda: embedded(("hi", image), gen_config=GenerationConfig(temperature=-1.0)),
        lambda: embedded(("hi", image), gen_config=GenerationConfig(max_new_tokens=0)),
        lambda: pipeline(str(tiny_llava), chat_template_config=ChatTemplateConfig(model_name="no-such-template")),
        lambda: embedded((f"{IMAGE_TOKEN} vs {IMAGE_TOKEN}", image)),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError) as err:
            case()
        assert str(err.value), f"case {i}: empty error message"
    assert embedded(("hi", image), gen_config=GenerationConfig(max_new_tokens=3)).generate_token_len > 0


def test_embedded_stream_abandoned_frees_kv_blocks(embedded):
    engine = embedded._service.llm
    total = embedded._thread.run(engine.info()).total_blocks
    stream = embedded.stream_infer(("describe this image", make_image(4)),
                                   gen_config=GenerationConfig(max_new_tokens=1500, ignore_eos=True))
    deltas = [next(stream) for _ in range(3)]
    assert all(d.token_ids for d in deltas)
    assert embedded._thread.run(engine.info()).free_blocks < total
    stream.close()  # the consumer walks away mid-stream
    deadline = time.monotonic() + 10
    while (info := embedded._thread.run(engine.info())).free_blocks != total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert info.free_blocks == total and info.running == 0


def test_deadline_propagates_and_frees_kv_blocks(split_tiers):
    request = gateway_pb2.ChatRequest(
        messages=[_user(_text("describe this image"), _image(data=_png(5)))],
        gen_config=gateway_pb2.GenerationConfig(max_new_tokens=1900, ignore_eos=True))
    with grpc.insecure_channel(split_tiers.gateway) as ch:
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayStub(ch).Chat(request, timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = _wait_all_blocks_free(split_tiers)
    assert info.free_blocks == info.total_blocks and info.running == 0
    _assert_healthy(split_tiers)
