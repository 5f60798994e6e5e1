"""Host tensors to the device through pinned buffers kept for reuse.

Both tiers stage through it: the vision tier a batch's uint8 pixels, the LLM tier a step's image
rows (llm_service may import this tier, not the other way round). A fresh pinned tensor per
copy costs a cudaHostAlloc when the allocator has no free block (~1 ms per MB, under a lock
every CUDA call of the process takes: in W2's burst 230 of them, one per image, held the
co-located LLM engine's launches back; one per step cost a W1 request up to 4 ms of TTFT), so
the buffers are pinned once, reserved before serving at their largest where that is known.
"""
from __future__ import annotations

import numpy as np
import torch


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src between contiguous host tensors of one dtype, as bytes, by numpy on the
    calling thread alone (the GIL let go). torch's copy_ splits a copy this large over its
    intra-op thread pool, whose threads spin and wait on one another while other threads and
    processes (the split tiers) want the same cores: staging uint8 pixels that way held the split
    vision tier's worker ~3 s over W4's 256 images, and W4 fell from 92% to 80% of embedded
    when the finisher's copy took that path (bench/RESULTS.md)."""
    np.copyto(dst.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())


def _fits(buffer: torch.Tensor | None, numel: int, dtype: torch.dtype) -> bool:
    return buffer is not None and buffer.numel() >= numel and buffer.dtype == dtype


class PinnedStaging:
    """`buffers` pinned buffers used in turn: a buffer is written again only once the copy out
    of it has run (its event), so with two one batch is staged while the previous one's copy may
    still run; with one the wait is for the previous copy, which stream order puts before the
    work that reads it, so a caller running ahead of the device is not held up."""

    def __init__(self, buffers: int = 2):
        self._buffers: list[torch.Tensor | None] = [None] * buffers
        self._copied: list[torch.cuda.Event | None] = [None] * buffers
        self._next = 0

    def reserve(self, numel: int, dtype: torch.dtype) -> None:
        """Pin every buffer for copies of up to `numel` elements now, before serving."""
        for i, buffer in enumerate(self._buffers):
            if not _fits(buffer, numel, dtype):
                self._buffers[i] = torch.empty(numel, dtype=dtype, pin_memory=True)

    def to_device(self, parts: list[torch.Tensor], device: torch.device,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """torch.cat(parts) in `dtype` (default the parts') on `device`; on CUDA the copy is
        asynchronous on the current stream."""
        dtype = dtype or parts[0].dtype
        if device.type != "cuda":
            return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device, dtype)
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        numel = shape[0] * parts[0][0].numel()
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        buffer = self._buffers[i]
        if not _fits(buffer, numel, dtype):
            buffer = self._buffers[i] = torch.empty(numel, dtype=dtype, pin_memory=True)
        elif self._copied[i] is not None:
            self._copied[i].synchronize()
        staged = buffer[:numel].view(shape)
        start = 0
        for p in parts:
            rows = staged[start : start + p.shape[0]]
            if p.dtype == dtype and p.is_contiguous():
                host_copy(rows, p)
            else:  # a cast
                rows.copy_(p)
            start += p.shape[0]
        on_device = staged.to(device, non_blocking=True)
        self._copied[i] = torch.cuda.Event()
        self._copied[i].record()
        return on_device
