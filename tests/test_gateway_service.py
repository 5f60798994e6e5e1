"""ChatService over a scripted fake LLM: deltas, stop tokens and stop strings, logits,
and that closing or cancelling the consumer closes (aborts) the LLM stream."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from gateway import ChatTemplateConfig, GenerationConfig
from gateway.messages import normalize_messages
from gateway.service import PREPARE_THREADS, ChatService
from gateway.tokenizer import Tokenizer
from protos import common_pb2, llm_pb2
from tests.conftest import make_image

IMAGE_ROWS = 16  # the tiny checkpoint's rows per image


class FakeLLM:
    """Replays `script` like the LLM tier would: stops on a stop id (sent as the last
    token) or at max_new_tokens, sends usage on the last chunk, records aborts."""

    def __init__(self, script: list[int], eos=(2,), vocab: int = 489, chunk: int = 1, delay: float = 0.0):
        self.script, self.eos, self.vocab, self.chunk, self.delay = script, set(eos), vocab, chunk, delay
        self.requests: list[llm_pb2.GenerateRequest] = []
        self.aborted: list[str] = []
        self.started = asyncio.Event()

    async def info(self) -> llm_pb2.LLMInfo:
        return llm_pb2.LLMInfo(model="fake", architecture="FakeForCausalLM", vocab_size=self.vocab, session_len=2048,
                               eos_token_ids=sorted(self.eos))

    def _input_tokens(self, request) -> int:
        return sum(len(s.text.token_ids) if s.WhichOneof("kind") == "text" else IMAGE_ROWS for s in request.segments)

    async def generate(self, request: llm_pb2.GenerateRequest):
        self.requests.append(request)
        self.started.set()
        sampling = request.sampling
        stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else self.eos)
        limit = sampling.max_new_tokens or len(self.script)
        out, finished = [], False
        try:
            while not finished:
                ids = []
                while len(ids) < self.chunk and not finished:
                    token = self.script[len(out) % len(self.script)]
                    ids.append(token)
                    out.append(token)
                    finished = token in stops or len(out) >= limit
                chunk = llm_pb2.GenerateResponse(token_ids=ids)
                if sampling.output_logits == "generation":
                    rows = np.zeros((len(ids), self.vocab), dtype=np.float32)
                    rows[np.arange(len(ids)), ids] = np.arange(len(out) - len(ids), len(out)) + 1.0
                    chunk.logits.CopyFrom(common_pb2.Tensor(dtype="float32", shape=list(rows.shape),
                                                            data=rows.tobytes()))
                if finished:
                    chunk.finish_reason = "stop" if out[-1] in stops else "length"
                    chunk.usage.CopyFrom(llm_pb2.Usage(input_tokens=self._input_tokens(request),
                                                       output_tokens=len(out)))
                await asyncio.sleep(self.delay)
                yield chunk
        finally:
            if not finished:
                self.aborted.append(request.request_id)


@pytest.fixture(scope="module")
def tok(tiny_llava):
    return Tokenizer(tiny_llava)


def words(tok, text):
    return tok.encode(text, add_special_tokens=False)


def run(coro):
    return asyncio.run(coro)


async def _deltas(service, messages, gen_config=None, **kw):
    return [d async for d in service.stream(normalize_messages(messages), gen_config, **kw)]


def test_stream_and_chat_agree(tiny_llava, tok):
    script = words(tok, " the quick brown fox jumps over the lazy dog")
    service = ChatService(str(tiny_llava), FakeLLM(script, chunk=2))
    gen = GenerationConfig(max_new_tokens=5)
    deltas = run(_deltas(service, ("describe this image", make_image(1)), gen))
    whole = run(service.chat(normalize_messages(("describe this image", make_image(1))), gen))
    assert [d.finish_reason for d in deltas] == [None, None, "length"]
    assert [d.generate_token_len for d in deltas] == [2, 4, 5]
    assert "".join(d.text for d in deltas) == whole.text == tok.decode(script[:5])
    assert whole.token_ids == script[:5] and whole.generate_token_len == 5 and whole.finish_reason == "length"
    first = service.llm.requests[0]
    assert whole.input_token_len == service.llm._input_tokens(first) > IMAGE_ROWS


def test_a_prepared_conversation_streams_as_stream_does(tiny_llava, tok):
    """prepare (what the embedded pipeline runs on the caller's thread) sends nothing; its
    request then streams the same deltas, stop strings included, as `stream`."""
    script = words(tok, " the quick brown fox jumps over the lazy dog")
    llm = FakeLLM(script, chunk=2)
    service = ChatService(str(tiny_llava), llm)
    prompt = ("describe this image", make_image(1))
    gen = GenerationConfig(max_new_tokens=8, stop_words=["fox"])
    streamed = run(_deltas(service, prompt, gen, request_id="r"))
    prepared = service.prepare(normalize_messages(prompt), gen, request_id="r")
    assert len(llm.requests) == 1

    async def deltas():
        return [d async for d in service.stream_prepared(prepared, index=3)]

    again = run(deltas())
    assert [(d.text, d.token_ids, d.finish_reason, d.index) for d in again] == \
        [(d.text, d.token_ids, d.finish_reason, 3) for d in streamed]
    assert "".join(d.text for d in again) == " the quick brown " and again[-1].finish_reason == "stop"
    assert llm.requests[1] == llm.requests[0]


def test_a_burst_reaches_the_llm_while_later_conversations_wait_their_turn(tiny_llava, tok):
    """Conversations arriving together are prepared PREPARE_THREADS at a time, in order, so the
    first reaches the LLM tier before the later ones are even started: on the loop's default
    executor (cores + 4 threads) a burst was prepared all side by side, holding the GIL the first
    requests' next hops need (bench/host_overhead.py --parts intake). Here every conversation after
    the first waits in `prepare` until the LLM tier has the first."""
    llm = FakeLLM(words(tok, " a tiger"))
    service = ChatService(str(tiny_llava), llm)
    first_in, started, at_first = threading.Event(), [], []
    prepare = service.prepare

    def gated(messages, *args):
        started.append(messages[0]["content"][0]["text"])
        if started[-1] != "c0":
            first_in.wait(timeout=30)
        return prepare(messages, *args)

    async def generate(request):
        if not first_in.is_set():
            at_first.extend(started)
            first_in.set()
        async for chunk in FakeLLM.generate(llm, request):
            yield chunk

    service.prepare, llm.generate = gated, generate
    burst = [(f"c{i}", make_image(i)) for i in range(8)]

    async def all_at_once():
        return await asyncio.gather(*(service.chat(normalize_messages(p), GenerationConfig(max_new_tokens=2))
                                      for p in burst))

    assert all(r.finish_reason == "length" for r in run(all_at_once()))
    assert at_first[0] == "c0" and set(at_first) <= {f"c{i}" for i in range(PREPARE_THREADS + 1)}
    assert sorted(started) == [f"c{i}" for i in range(8)]


def test_eos_is_not_returned(tiny_llava, tok):
    script = words(tok, " a tiger") + [2] + words(tok, " never")
    service = ChatService(str(tiny_llava), FakeLLM(script, chunk=3))
    r = run(service.chat(normalize_messages("hi"), GenerationConfig(output_logits="generation")))
    assert r.finish_reason == "stop" and r.text == " a tiger"
    assert r.token_ids == script[: script.index(2)] and r.generate_token_len == len(r.token_ids)
    assert r.logits.shape == (len(r.token_ids), 489)
    assert list(r.logits.argmax(-1)) == r.token_ids


def test_include_stop_str_in_output(tiny_llava, tok):
    script = words(tok, " a tiger") + [2]
    service = ChatService(str(tiny_llava), FakeLLM(script))
    r = run(service.chat(normalize_messages("hi"),
                         GenerationConfig(include_stop_str_in_output=True, output_logits="generation")))
    assert r.finish_reason == "stop" and r.text == " a tiger</s>"
    assert r.token_ids == script and r.generate_token_len == len(script) and len(r.logits) == len(script)


def test_ignore_eos_runs_to_the_limit(tiny_llava, tok):
    script = words(tok, " a") + [2]
    service = ChatService(str(tiny_llava), FakeLLM(script))
    r = run(service.chat(normalize_messages("hi"), GenerationConfig(ignore_eos=True, max_new_tokens=5)))
    assert r.finish_reason == "length" and r.generate_token_len == 5 and r.token_ids.count(2) == 2


def test_stop_string_truncates_and_aborts(tiny_llava, tok):
    script = words(tok, " the quick brown fox jumps over the lazy dog")
    llm = FakeLLM(script)
    service = ChatService(str(tiny_llava), llm)
    r = run(service.chat(normalize_messages("hi"), GenerationConfig(stop_words=["own f"])))
    assert r.text == " the quick br" and r.finish_reason == "stop"
    assert llm.aborted == [llm.requests[0].request_id]  # the LLM stream was closed early
    with_stop = run(service.chat(normalize_messages("hi"), GenerationConfig(stop_words=["own f"],
                                                                             include_stop_str_in_output=True)))
    assert with_stop.text == " the quick brown f"


def test_closing_the_stream_aborts_the_llm_request(tiny_llava, tok):
    llm = FakeLLM(words(tok, " the quick brown fox jumps"))
    service = ChatService(str(tiny_llava), llm)

    async def first_delta_only():
        stream = service.stream(normalize_messages("hi"))
        delta = await stream.__anext__()
        await stream.aclose()
        return delta

    assert run(first_delta_only()).generate_token_len == 1
    assert llm.aborted == [llm.requests[0].request_id]


def test_cancelling_the_consumer_aborts_the_llm_request(tiny_llava, tok):
    llm = FakeLLM(words(tok, " the quick brown fox jumps"), delay=0.05)
    service = ChatService(str(tiny_llava), llm)

    async def cancel_midway():
        task = asyncio.ensure_future(service.chat(normalize_messages("hi")))
        await llm.started.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_midway())
    assert llm.aborted == [llm.requests[0].request_id]


def test_bad_input_never_reaches_the_llm(tiny_llava):
    llm = FakeLLM([5])
    service = ChatService(str(tiny_llava), llm)
    with pytest.raises(ValueError, match="IMAGE_TOKEN"):
        run(service.chat(normalize_messages(("<IMAGE_TOKEN><IMAGE_TOKEN>", make_image(1)))))
    with pytest.raises(ValueError, match="not found"):
        run(service.chat(normalize_messages(("x", "/missing.png"))))
    assert llm.requests == []


def test_template_override_and_raw_prompt(tiny_llava, tok):
    llm = FakeLLM([2])
    service = ChatService(str(tiny_llava), llm)
    run(service.chat(normalize_messages("hi"), template_override=ChatTemplateConfig("vicuna", meta_instruction="S")))
    run(service.chat(normalize_messages("hi"), do_preprocess=False))
    ids = [list(r.segments[0].text.token_ids) for r in llm.requests]
    assert ids == [tok.encode("S USER: hi ASSISTANT:"), tok.encode("hi")]
