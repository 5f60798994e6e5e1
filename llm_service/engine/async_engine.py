"""asyncio intake for the engine: the gateway → LLM seam in-process.

The synchronous LLMEngine runs in its own thread. Callers on any event loop submit
work to that thread through a queue of callables; the thread hands each request's
outputs back to the request's own loop with call_soon_threadsafe. A caller that stops
consuming (generator closed, task cancelled) aborts its request, freeing its blocks.
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


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of _Delta or an exception


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
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any thread, any loop) ----

    async def generate(self, request: llm_pb2.GenerateRequest) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Stream of newly generated ids per step; the last chunk carries finish_reason and
        usage. ValueError for a bad request, before any token."""
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
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(lambda: self._start(seq, stream))
        done = False
        try:
            while not done:
                delta = await stream.queue.get()
                while not isinstance(delta, BaseException) and not delta.finish_reason and not stream.queue.empty():
                    delta = self._merge(delta, stream.queue.get_nowait())  # a slow reader gets fewer, larger chunks
                if isinstance(delta, BaseException):
                    done = True
                    raise delta
                done = bool(delta.finish_reason)
                yield self._response(seq, delta)
        finally:
            if not done:
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
        for seq_id in list(self._streams):
            self._send(seq_id, _Delta(finish_reason="abort"))
        for seq in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
            self.engine.abort(seq)
        self._streams.clear()
        self.engine.close()  # the engine thread is gone: no step can race the workers' shutdown

    # ---- engine thread ----

    def _submit(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake.set()

    def _start(self, seq: Sequence, stream: _Stream) -> None:
        self._streams[seq.seq_id] = stream
        self.engine.add(seq)

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
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: StepOutput) -> None:
        delta = _Delta(finish_reason=out.finish_reason or "")
        if out.token_id is not None:
            delta.token_ids.append(out.token_id)
        if out.logits is not None:
            delta.logits.append(out.logits.cpu())
        if not self._send(out.seq.seq_id, delta):
            self.engine.abort(out.seq)
        if out.finish_reason:
            self._streams.pop(out.seq.seq_id, None)

    def _send(self, seq_id: int, item) -> bool:
        """Hand `item` to the request's loop; False when nobody can receive it any more."""
        stream = self._streams.get(seq_id)
        if stream is None:
            return False
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            self._streams.pop(seq_id, None)
            return False
        return True

    def _fail_all(self, exc: Exception) -> None:
        for seq in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
            self._send(seq.seq_id, RuntimeError(f"engine step failed: {exc!r}"))
            self._streams.pop(seq.seq_id, None)
            self.engine.abort(seq)

    # ---- helpers ----

    @staticmethod
    def _merge(a: _Delta, b) -> _Delta | BaseException:
        if isinstance(b, BaseException):
            return b
        return _Delta(a.token_ids + b.token_ids, a.logits + b.logits, b.finish_reason)

    @staticmethod
    def _response(seq: Sequence, delta: _Delta) -> llm_pb2.GenerateResponse:
        out = llm_pb2.GenerateResponse(token_ids=delta.token_ids, finish_reason=delta.finish_reason)
        if delta.logits:
            out.logits.CopyFrom(_tensor(delta.logits))
        # Usage rides on every chunk (three ints), so a caller that stops early still knows it.
        out.usage.CopyFrom(
            llm_pb2.Usage(
                input_tokens=seq.num_prompt_tokens,
                output_tokens=seq.num_output_tokens,
                cached_tokens=seq.num_cached_tokens,
            )
        )
        return out


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
