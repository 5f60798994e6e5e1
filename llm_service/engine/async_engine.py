"""asyncio intake for the engine: the gateway → LLM seam in-process.

The synchronous LLMEngine runs in its own thread. Callers on any event loop submit
work to that thread through a queue of callables. After each step the thread hands the
step's outputs to each caller loop in ONE call_soon_threadsafe (one wake-up of that loop
per step, not one per request); on the loop they are merged into each request's pending
delta, so a slow reader gets fewer, larger chunks. A caller that stops consuming
(generator closed, task cancelled) aborts its request, freeing its blocks.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from llm_service.config import EngineConfig
from llm_service.embedding_cache import EmbeddingCache
from llm_service.engine.llm_engine import LLMEngine, StepOutput
from llm_service.engine.prompt import build_sequence
from llm_service.engine.sequence import Sequence
from protos import common_pb2, llm_pb2
from vision_service.types import VisionEncoder


@dataclass
class _Delta:
    token_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = ""


@dataclass(eq=False)
class _Stream:
    """One request's way back to its caller. `pending`, `error` and `waiter` belong to
    the caller's loop; the engine thread only reaches them through `_dispatch`."""

    seq: Sequence
    loop: asyncio.AbstractEventLoop
    pending: _Delta = field(default_factory=_Delta)
    error: BaseException | None = None
    waiter: asyncio.Future | None = None

    def put(self, token_id: int | None, logits: torch.Tensor | None, finish_reason: str,
            error: BaseException | None) -> None:
        if error is not None:
            self.error = error
        else:
            if token_id is not None:
                self.pending.token_ids.append(token_id)
            if logits is not None:
                self.pending.logits.append(logits)
            if finish_reason:
                self.pending.finish_reason = finish_reason
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self, min_tokens: int = 1) -> _Delta:
        """Everything received since the last call, once it holds `min_tokens` ids or the
        finish (waits); raises the engine's error for this request."""
        while not (len(self.pending.token_ids) >= min_tokens or self.pending.finish_reason or self.error):
            self.waiter = self.loop.create_future()
            await self.waiter
        if self.error is not None:
            raise self.error
        delta, self.pending = self.pending, _Delta()
        return delta


# What the engine thread hands a loop for one request: (stream, token id, logits row,
# finish reason, error); None for what the step did not produce.
_Item = tuple[_Stream, int | None, torch.Tensor | None, str, BaseException | None]


def _dispatch(items: list[_Item]) -> None:
    """On a caller loop: one step's outputs for the requests awaited there."""
    for stream, token_id, logits, finish_reason, error in items:
        stream.put(token_id, logits, finish_reason, error)


def _tensor(rows: list[torch.Tensor]) -> common_pb2.Tensor:
    t = torch.stack(rows).to(device="cpu", dtype=torch.float32).contiguous()
    return common_pb2.Tensor(dtype="float32", shape=list(t.shape), data=t.numpy().tobytes())


class AsyncLLMEngine:
    def __init__(self, model_path: str, config: EngineConfig, vision: VisionEncoder | None = None):
        self.model_path = str(model_path)
        self.engine = LLMEngine(self.model_path, config)
        self.vision = vision
        self.embeddings = EmbeddingCache(config.embedding_cache_entries)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, _Stream] = {}  # seq_id -> stream; engine thread only
        self._outbox: dict[asyncio.AbstractEventLoop, list[_Item]] = {}  # engine thread only
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any thread, any loop) ----

    async def generate(
        self, request: llm_pb2.GenerateRequest, tokens_per_chunk: Callable[[], int] | None = None
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Stream of newly generated ids per step; the last chunk carries finish_reason and
        usage. ValueError for a bad request, before any token. tokens_per_chunk: after the
        first chunk, how many ids a chunk waits for (asked before each one; default 1)."""
        if self._closed:
            raise RuntimeError("the LLM engine is closed")
        e = self.engine
        seq = await build_sequence(
            request, e.spec, self.vision, self.embeddings, e.dtype, e.device, e.session_len,
            e.blocks.num_blocks * e.blocks.block_size,
        )
        if self._closed:
            raise RuntimeError("the LLM engine is closed")
        seq.request_id = request.request_id or uuid.uuid4().hex
        stream = _Stream(seq, asyncio.get_running_loop())
        self._submit(lambda: self._start(stream))
        done = False
        try:
            first = True
            while not done:
                delta = await stream.next(1 if first or tokens_per_chunk is None else tokens_per_chunk())
                first = False
                done = bool(delta.finish_reason)
                yield self._response(seq, delta)
        finally:
            if not done and stream.error is None:  # a request the engine failed is gone already
                self._submit(lambda: self._abort(seq))

    async def info(self) -> llm_pb2.LLMInfo:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def build() -> None:
            e = self.engine
            info = llm_pb2.LLMInfo(
                model=self.model_path,
                architecture=e.spec.architecture,
                vocab_size=e.spec.args.vocab_size,
                session_len=e.session_len,
                max_batch_size=e.max_batch_size,
                block_size=e.blocks.block_size,
                total_blocks=e.blocks.num_blocks,
                free_blocks=e.blocks.num_free_blocks,
                tp=e.config.tp,
                dtype=str(e.dtype).removeprefix("torch."),
                device=str(e.device),
                eos_token_ids=e.eos_token_ids,
                running=len(e.scheduler.running),
                waiting=len(e.scheduler.waiting),
            )
            loop.call_soon_threadsafe(_resolve, future, info)

        if self._closed:
            raise RuntimeError("the LLM engine is closed")
        self._submit(build)
        return await future

    def close(self) -> None:
        """Abort everything in flight and stop the engine thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join()
        while not self._inbox.empty():  # work submitted while closing: the thread is gone
            self._inbox.get()()
        for stream in self._streams.values():
            self._post(stream, None, None, "abort", None)
        self._streams.clear()
        self._flush()
        for seq in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
            self.engine.abort(seq)
        self.engine.reset()
        self.engine.close()  # the engine thread is gone: no step can race the workers' shutdown

    # ---- engine thread ----

    def _submit(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake.set()

    def _start(self, stream: _Stream) -> None:
        self._streams[stream.seq.seq_id] = stream
        self.engine.add(stream.seq)

    def _abort(self, seq: Sequence) -> None:
        self._streams.pop(seq.seq_id, None)
        self.engine.abort(seq)

    def _run(self) -> None:
        """The engine thread: run submitted work, step while there is any, else sleep."""
        while True:
            while not self._inbox.empty():
                self._inbox.get()()
            if self._closed:
                break
            if not self.engine.has_work():
                if not self._wake.wait(self.engine.idle_ping_s):
                    self.engine.ping()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, not the server
                self.engine.reset()
                self._fail_all(exc)
                outputs = []
            for out in outputs:
                self._deliver(out)
            self._flush()

    def _deliver(self, out: StepOutput) -> None:
        stream = self._streams.get(out.seq.seq_id)
        if stream is None:  # its caller went away
            self.engine.abort(out.seq)
            return
        logits = out.logits.cpu() if out.logits is not None else None  # off the graph's reused buffer
        self._post(stream, out.token_id, logits, out.finish_reason or "", None)
        if out.finish_reason:
            del self._streams[out.seq.seq_id]

    def _post(self, stream: _Stream, token_id: int | None, logits: torch.Tensor | None, finish_reason: str,
              error: BaseException | None) -> None:
        self._outbox.setdefault(stream.loop, []).append((stream, token_id, logits, finish_reason, error))

    def _flush(self) -> None:
        """One hand-off per caller loop for everything posted since the last flush."""
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # the caller's loop is closed: nobody will read these
                for stream, *_ in items:
                    self._streams.pop(stream.seq.seq_id, None)
                    self.engine.abort(stream.seq)
        self._outbox = {}

    def _fail_all(self, exc: Exception) -> None:
        for seq in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
            stream = self._streams.pop(seq.seq_id, None)
            if stream is not None:
                self._post(stream, None, None, "", RuntimeError(f"engine step failed: {exc!r}"))
            self.engine.abort(seq)

    # ---- helpers ----

    @staticmethod
    def _response(seq: Sequence, delta: _Delta) -> llm_pb2.GenerateResponse:
        out = llm_pb2.GenerateResponse(token_ids=delta.token_ids, finish_reason=delta.finish_reason)
        if delta.logits:
            out.logits.CopyFrom(_tensor(delta.logits))
        # Usage rides on every chunk (three ints), so a caller that stops early still knows it.
        usage = out.usage
        usage.input_tokens = seq.num_prompt_tokens
        usage.output_tokens = seq.num_output_tokens
        usage.cached_tokens = seq.num_cached_tokens
        return out


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
