"""The local vision engine: decode + preprocess on a thread pool, then a dynamic
batcher whose worker thread owns the model, pipelined with a finisher thread.

Callers from any asyncio loop enqueue prepared images; the worker takes up to
`max_batch_size` tiles across *all* pending callers, waiting at most
`batch_window_ms` after the oldest queued image for more, and launches one forward
(on CUDA on a high-priority stream of its own, so that it never waits behind a
co-located LLM engine's queued steps).
The finisher copies each batch's embeddings to the host (on a stream of its own on
CUDA) and resolves each caller's futures on that caller's loop, while the worker
already launches the next batch: at most two batches are in flight, so under load
the queue, not the window, decides the batch size. Bad images are caught while
preparing, so they fail only their own caller and never reach a batch.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch

from protos import common_pb2, vision_pb2
from vision_service.checkpoint import Checkpoint
from vision_service.config import VisionConfig
from vision_service.devices import DTYPES, resolve_device
from vision_service.models import PreparedImage, load_vision_model
from vision_service.preprocess import decode_image
from vision_service.staging import host_copy
from vision_service.types import ImageEmbedding

logger = logging.getLogger(__name__)

STATS_LOG_EVERY_S = 30.0  # how often a busy engine logs its batch-size histogram
# Decoding and preprocessing release the GIL for most of their time, and more threads than this
# only add Python that contends for it with the other tiers' threads in the same process: on the
# H100 host 16 -> 4 took the tier alone from 537 to 572 images/s and embedded W2 (int8) from 3854
# to 3940 output tok/s, its LLM engine no longer crawling through its first prefill's launches.
DEFAULT_PREP_THREADS = 4
_IN_FLIGHT = 2  # batches launched and not yet finished: one running, the next queued behind it

def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers narrow; os.cpu_count() if unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_dtype(name: str, ckpt_config: dict, device: torch.device) -> torch.dtype:
    """"auto" is float32 on CPU and the checkpoint's dtype (float16 if unstated) elsewhere."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"vision dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stated = ckpt_config.get("dtype") or ckpt_config.get("torch_dtype")
    if stated is None:
        stated = (ckpt_config.get("text_config") or {}).get("torch_dtype")
    return DTYPES.get(str(stated), torch.float16)


@dataclass
class _Work:
    """One image waiting for the worker, and where its result goes."""

    image: PreparedImage
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class _Launched:
    """A batch whose forward is launched; `done` marks its end on the device's stream (CUDA only)."""

    batch: list[_Work]
    outputs: list[ImageEmbedding]
    done: torch.cuda.Event | None


def _settle(future: asyncio.Future, result: ImageEmbedding | None, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _copied(src: torch.Tensor) -> torch.Tensor:
    """A copy of the host tensor `src` made by the calling thread alone (staging.host_copy)."""
    out = torch.empty_like(src)
    host_copy(out, src)
    return out


class VisionEngine:
    """Implements `VisionEncoder` in-process. Embeddings come back on CPU in the model dtype."""

    def __init__(self, model_path: str, config: VisionConfig | None = None):
        self.model_path = str(model_path)
        self.config = config or VisionConfig()
        ckpt = Checkpoint.open(model_path)
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, ckpt.config, self.device)
        self.model = load_vision_model(ckpt, self.device, self.dtype)
        self.images_encoded = 0
        self.batches_run = 0
        self.batch_sizes: Counter[int] = Counter()  # images per forward -> forwards run
        self.finish_seconds = 0.0  # the finisher's wait for forwards + copies to the host (bench/)
        self._logged_at = time.monotonic()
        self._pending: deque[_Work] = deque()
        self._cond = threading.Condition()
        self._closed: str | None = None  # why encode() is refused: closed, or the worker died
        threads = self.config.preprocess_threads or min(DEFAULT_PREP_THREADS, usable_cores())
        self._prep = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vision-prep")
        self._slots = threading.Semaphore(_IN_FLIGHT)
        self._launched: queue.SimpleQueue[_Launched | None] = queue.SimpleQueue()
        cuda = self.device.type == "cuda"
        # the forwards' own stream, at high priority: an LLM engine on the same device (the embedded
        # pipeline) queues whole steps on its stream, behind which a forward on the default stream
        # waited, starving the LLM of the images it needs next (W2's start: bench/RESULTS.md)
        self._stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._staging: torch.Tensor | None = None  # pinned, reused by every batch (the finisher's)
        if cuda:  # pinned now: a cudaHostAlloc under load (~1 ms per MB) stalls every CUDA call of the process
            self.model.reserve(self.config.max_batch_size)
            embedding = self.model.rows * self.model.hidden_size * self.dtype.itemsize
            self._staging = torch.empty(self.config.max_batch_size * embedding, dtype=torch.uint8, pin_memory=True)
        self._worker = threading.Thread(target=self._run, name="vision-worker", daemon=True)
        self._finisher = threading.Thread(target=self._finish_all, name="vision-finisher", daemon=True)
        self._worker.start()
        self._finisher.start()
        logger.info("vision engine: %s (%s) on %s in %s, max_batch_size=%d, %d preprocessing threads",
                    self.model_path, self.model.architecture, self.device, self.dtype, self.config.max_batch_size,
                    threads)

    async def encode(self, images: Sequence[common_pb2.ImageInput]) -> list[ImageEmbedding]:
        """Embeddings in the order of `images`; ValueError names the first bad image."""
        if self._closed:
            raise RuntimeError(f"vision engine {self._closed}")
        if not images:
            return []
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(self._prep, self._prepare, i, img) for i, img in enumerate(images)),
            return_exceptions=True,
        )
        for p in prepared:
            if isinstance(p, BaseException):
                raise p
        futures = [loop.create_future() for _ in prepared]
        with self._cond:
            if self._closed:
                raise RuntimeError(f"vision engine {self._closed}")
            self._pending.extend(_Work(p, f, loop) for p, f in zip(prepared, futures))
            self._cond.notify()
        # Cancelling this call cancels the futures; the worker then skips them.
        return list(await asyncio.gather(*futures))

    def info(self) -> vision_pb2.VisionInfo:
        with self._cond:
            encoded, batches, sizes = self.images_encoded, self.batches_run, dict(self.batch_sizes)
        return vision_pb2.VisionInfo(
            model=self.model_path,
            architecture=self.model.architecture,
            hidden_size=self.model.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            max_batch_size=self.config.max_batch_size,
            images_encoded=encoded,
            batches_run=batches,
            batch_sizes=sizes,
        )

    def close(self) -> None:
        """Stop the worker (after the batches in flight); queued images fail with RuntimeError."""
        self._shut("is closed")
        self._worker.join()
        self._finisher.join()
        self._prep.shutdown(wait=False, cancel_futures=True)
        logger.info("vision engine closed: %s", self._stats())

    def _shut(self, reason: str) -> None:
        """Refuse new work and fail the queued images."""
        with self._cond:
            if self._closed:
                return
            self._closed = reason
            leftover = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for work in leftover:
            self._resolve(work, None, RuntimeError(f"vision engine {reason}"))

    def _prepare(self, index: int, item: common_pb2.ImageInput) -> PreparedImage:
        """Verify, decode and preprocess one image (runs on the prep pool)."""
        try:
            data = item.data
            if item.sha256 and hashlib.sha256(data).hexdigest() != item.sha256.lower():
                raise ValueError("sha256 does not match the image bytes")
            return self.model.prepare(decode_image(data), dict(item.options))
        except ValueError as e:
            raise ValueError(f"image {index}: {e}") from None

    def _next_batch(self) -> list[_Work] | None:
        """Block until there is work; None once closed."""
        cap = self.config.max_batch_size
        window = self.config.batch_window_ms / 1000.0
        with self._cond:
            while True:
                while self._pending and self._pending[0].future.cancelled():
                    self._pending.popleft()
                if self._closed:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                queued = sum(w.image.tiles for w in self._pending if not w.future.cancelled())
                left = self._pending[0].enqueued + window - time.monotonic()
                if queued >= cap or left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Work] = []
            tiles = 0
            while self._pending:
                work = self._pending[0]
                if work.future.cancelled():
                    self._pending.popleft()
                    continue
                if batch and tiles + work.image.tiles > cap:
                    break
                batch.append(self._pending.popleft())
                tiles += work.image.tiles
            return batch

    def _run(self) -> None:
        """Launch batches, at most `_IN_FLIGHT` ahead of the finisher."""
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.cuda.stream(self._stream):  # None (CPU): no stream
                while True:
                    self._slots.acquire()  # form the batch only once the device can take it: it grows meanwhile
                    batch = self._next_batch()
                    if batch is None:
                        break
                    if batch:
                        self._launch(batch)
                    else:
                        self._slots.release()
        except BaseException as e:  # never leave callers waiting on a dead worker
            logger.exception("vision worker died")
            self._shut(f"worker died: {e!r}")
        finally:
            self._launched.put(None)

    def _launch(self, batch: list[_Work]) -> None:
        """Start one forward and hand it to the finisher; a failure fails this batch's callers, not the worker."""
        try:
            outputs = self.model.encode([w.image for w in batch])
            done = None
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
        except Exception as e:
            self._fail(batch, e)
            self._slots.release()
            return
        self._launched.put(_Launched(batch, outputs, done))

    def _finish_all(self) -> None:
        if self._copy_stream is not None:
            torch.cuda.set_device(self.device)
        while (launched := self._launched.get()) is not None:
            try:
                self._finish(launched)
            except BaseException as e:  # a failed forward surfaces here on CUDA; never leave callers waiting
                self._fail(launched.batch, e)
            launched = None  # its device outputs go back before the worker may launch another batch
            self._slots.release()

    def _finish(self, launched: _Launched) -> None:
        """Wait for one forward, copy its embeddings to the host and resolve its callers."""
        started = time.perf_counter()
        if self._copy_stream is None:
            outputs = [ImageEmbedding(o.embedding.to("cpu", copy=True), o.grid_thw) for o in launched.outputs]
        else:  # a stream of its own: the copies overlap the next batch's forward
            outputs = [ImageEmbedding(host, o.grid_thw)
                       for host, o in zip(self._to_host(launched), launched.outputs)]
        batch = launched.batch
        with self._cond:
            self.finish_seconds += time.perf_counter() - started
            self.images_encoded += len(batch)
            self.batches_run += 1
            self.batch_sizes[len(batch)] += 1
            report = time.monotonic() - self._logged_at >= STATS_LOG_EVERY_S
            if report:
                self._logged_at = time.monotonic()
        logger.debug("vision batch of %d images", len(batch))
        if report:
            logger.info("vision engine: %s", self._stats())
        for work, out in zip(batch, outputs):
            self._resolve(work, out, None)

    def _to_host(self, launched: _Launched) -> list[torch.Tensor]:
        """The batch's embeddings in host memory of their own: asynchronous copies into a pinned
        staging buffer kept for the next batch, then plain host copies. Per 7B-shaped image
        (576 x 4096 bf16) on an H200 host this costs 0.25-0.6 ms, against 6.6 ms for a fresh
        pinned tensor (the driver pins an 8 MB block: a burst of new images finds none free) and
        3.4-4.4 ms for a synchronous copy into pageable memory (bench/host_copies.py): both held
        the tier near 150 images/s."""
        embeddings = [o.embedding for o in launched.outputs]
        nbytes = [e.numel() * e.element_size() for e in embeddings]
        if self._staging is None or self._staging.numel() < sum(nbytes):
            self._staging = torch.empty(sum(nbytes), dtype=torch.uint8, pin_memory=True)
        staged, start = [], 0
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(launched.done)
            for e, n in zip(embeddings, nbytes):
                staged.append(self._staging[start : start + n])
                staged[-1].view(e.dtype).view(e.shape).copy_(e, non_blocking=True)
                start += n
            self._copy_stream.synchronize()
        hosts = self._prep.map(_copied, staged)  # side by side on the prep pool's threads
        return [h.view(e.dtype).view(e.shape) for h, e in zip(hosts, embeddings)]

    def _stats(self) -> str:
        with self._cond:
            return (f"{self.images_encoded} images in {self.batches_run} batches, "
                    f"batch sizes {dict(sorted(self.batch_sizes.items()))}")

    def _fail(self, batch: list[_Work], error: BaseException) -> None:
        logger.error("vision forward of %d images failed", len(batch), exc_info=error)
        for work in batch:
            self._resolve(work, None, RuntimeError(f"vision forward failed: {error}"))

    @staticmethod
    def _resolve(work: _Work, result: ImageEmbedding | None, error: BaseException | None) -> None:
        try:
            work.loop.call_soon_threadsafe(_settle, work.future, result, error)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass
