"""The gateway's core: messages in, streamed Responses out, over any LLM backend.

`llm` is anything with an async-generator `generate(GenerateRequest)` yielding
GenerateResponse chunks and `async info() -> LLMInfo`: the embedded engine or the gRPC client. Each chunk
carries new token ids (and logits rows when asked); the last one carries the finish
reason and usage. The service hides the stop token (LMDeploy returns neither its id
nor its logits unless include_stop_str_in_output), detokenizes incrementally, applies
string stop words, and closes the LLM stream as soon as it stops early or its
consumer goes away, which makes the LLM tier abort the request.
"""
from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from gateway.config import GenerationConfig, Response
from gateway.detokenize import IncrementalDetokenizer, StopStrings
from gateway.messages import build_request, fetches_images
from gateway.templates import ChatTemplate, ChatTemplateConfig, StringTemplate, get_template, resolve_template
from gateway.tokenizer import Tokenizer
from protos import common_pb2, llm_pb2

RAW_TEMPLATE = StringTemplate(name="raw", capability="completion")  # do_preprocess=False
# One: a second thread finished a burst's preparation sooner (270 against 350 ms for 256 on the
# dev VM), but its Python also kept the co-located LLM engine's launches waiting: with an eager
# prefill's 400 launches simulated (host_overhead.py --parts intake --launch-us 50, 16-core
# pools) the engine's second step came at 385 ms against 622 with two threads (bench/README.md).
PREPARE_THREADS = 1
_PREPARING = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="prism-prepare")


async def prepare_in_order(prepare, messages: list[dict], *args):
    """`prepare(messages, *args)` off the event loop, on a pool of PREPARE_THREADS in arrival order.
    Preparing holds the GIL (template, tokenizer, image encode: 256 W2 conversations take as long
    on 20 threads as on one), and every thread that wants it delays the event loop, vision and
    engine threads that carry the first requests on: a burst of 256 on the loop's default executor
    (cores + 4 threads) let none into the LLM tier until nearly all were prepared (bench/README.md,
    host_overhead.py --parts intake). Conversations that fetch http(s) images wait on the network,
    not the GIL, so they keep the default executor, where a slow server holds one of many threads."""
    pool = None if fetches_images(messages) else _PREPARING
    return await asyncio.get_running_loop().run_in_executor(pool, prepare, messages, *args)


def logits_to_numpy(tensor: common_pb2.Tensor, rows: int) -> np.ndarray | None:
    """A float32 [rows, vocab] Tensor message → a numpy array (None when empty)."""
    if not tensor.data or rows == 0:
        return None
    if tensor.dtype != "float32":
        raise RuntimeError(f"the LLM sent logits as {tensor.dtype!r}, expected float32")
    return np.frombuffer(tensor.data, dtype="<f4").reshape(rows, -1).copy()


@dataclass
class PreparedChat:
    """One conversation ready for the LLM tier: the request, and how its stream is cut."""

    request: llm_pb2.GenerateRequest
    gen_config: GenerationConfig
    stop_ids: set[int]
    stop_words: list[str]


class ChatService:
    def __init__(self, model_path: str, llm, chat_template_config: ChatTemplateConfig | None = None):
        self.model_path = str(model_path)
        self.llm = llm
        self.tokenizer = Tokenizer(model_path)
        self.template = resolve_template(self.model_path, chat_template_config, self.tokenizer)

    async def info(self) -> llm_pb2.LLMInfo:
        return await self.llm.info()

    def _template(self, override: ChatTemplateConfig | None, do_preprocess: bool) -> ChatTemplate:
        if not do_preprocess:
            return RAW_TEMPLATE
        return self.template if override is None else get_template(override, self.model_path, self.tokenizer)

    def prepare(self, messages: list[dict], gen_config: GenerationConfig | None = None,
                template_override: ChatTemplateConfig | None = None, do_preprocess: bool = True,
                request_id: str | None = None) -> PreparedChat:
        """Render, tokenize and load the images of one normalized conversation. Blocking
        (images may be fetched): `stream` runs it through `prepare_in_order`; a caller with a
        thread of its own to spare (the embedded pipeline) runs it there, two hops fewer."""
        gen_config = gen_config or GenerationConfig()
        template = self._template(template_override, do_preprocess)
        request = build_request(messages, template, self.tokenizer, gen_config, request_id or uuid.uuid4().hex)
        stop_ids = set(request.sampling.stop_token_ids)
        if not gen_config.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        stop_words = [*gen_config.template_stop_words(template.stop_words), *(gen_config.stop_words or [])]
        return PreparedChat(request, gen_config, stop_ids, stop_words)

    async def stream(self, messages: list[dict], gen_config: GenerationConfig | None = None,
                     template_override: ChatTemplateConfig | None = None, index: int = 0,
                     do_preprocess: bool = True, request_id: str | None = None) -> AsyncIterator[Response]:
        """Delta Responses for one normalized conversation: new text and ids each,
        the running generate_token_len, and the finish reason on the last one."""
        prepared = await prepare_in_order(self.prepare, messages, gen_config, template_override, do_preprocess,
                                          request_id)
        async with aclosing(self.stream_prepared(prepared, index)) as deltas:
            async for delta in deltas:
                yield delta

    async def stream_prepared(self, prepared: PreparedChat, index: int = 0) -> AsyncIterator[Response]:
        """`stream` for a conversation `prepare` already made ready."""
        request, gen_config, stop_ids = prepared.request, prepared.gen_config, prepared.stop_ids
        detok = IncrementalDetokenizer(self.tokenizer, gen_config.skip_special_tokens)
        stops = StopStrings(prepared.stop_words, gen_config.include_stop_str_in_output)
        input_len, generated, finish, hit_stop_token = 0, 0, None, False
        wants_logits = gen_config.output_logits is not None
        stream = self.llm.generate(request)
        try:
            async for chunk in stream:  # once per engine step and request: keep it lean
                if chunk.HasField("usage"):
                    input_len = chunk.usage.input_tokens
                ids, logits, text = [], None, ""
                if not hit_stop_token:  # ids after a stop token are not output
                    ids = list(chunk.token_ids)
                    if wants_logits and chunk.HasField("logits"):
                        logits = logits_to_numpy(chunk.logits, len(ids))
                    if stop_ids.isdisjoint(ids):
                        text = detok.step(ids)
                    else:
                        at = next(i for i, t in enumerate(ids) if t in stop_ids)
                        hit_stop_token, finish = True, "stop"
                        text = detok.step(ids[:at]) + detok.finish()
                        keep = at
                        if gen_config.include_stop_str_in_output:
                            text += self.tokenizer.decode(ids[at:at + 1], skip_special_tokens=False)
                            keep += 1
                        ids = ids[:keep]
                        logits = logits[:keep] if logits is not None else None
                text = stops.feed(text)
                ended = stops.stopped or bool(chunk.finish_reason)
                if ended:
                    finish = "stop" if stops.stopped else finish or chunk.finish_reason
                    text += stops.feed(detok.finish()) + stops.flush()
                generated += len(ids)
                if ids or text or ended:
                    yield Response(text=text, generate_token_len=generated, input_token_len=input_len,
                                   finish_reason=finish if ended else None, token_ids=ids, logits=logits, index=index)
                if ended:
                    return
            raise RuntimeError("the LLM stream ended without a finish reason")
        finally:
            await stream.aclose()  # no-op when finished; else the LLM tier aborts the request

    async def chat(self, messages: list[dict], gen_config: GenerationConfig | None = None,
                   template_override: ChatTemplateConfig | None = None, index: int = 0,
                   do_preprocess: bool = True, request_id: str | None = None) -> Response:
        """The whole Response: joined text, ids and logits of every delta."""
        return await collect(self.stream(messages, gen_config, template_override, index, do_preprocess, request_id))


async def collect(deltas: AsyncIterator[Response]) -> Response:
    """Fold a stream of delta Responses into one."""
    texts, ids, logits, last = [], [], [], None
    async for delta in deltas:
        texts.append(delta.text)
        ids += delta.token_ids
        if delta.logits is not None:
            logits.append(delta.logits)
        last = delta
    if last is None:
        raise RuntimeError("the generation produced no response")
    return Response(text="".join(texts), generate_token_len=last.generate_token_len,
                    input_token_len=last.input_token_len, finish_reason=last.finish_reason, token_ids=ids,
                    logits=np.concatenate(logits) if logits else None, index=last.index)
