"""Small vision batches replayed from CUDA graphs.

A LLaVA-1.5 tower and projector are some 300 kernels. Launched one by one from Python they took
9 ms of the H100 bench host's time for one image, whose forward needs a few ms of GPU: a lone
request's first token waited on the launches (bench.py --profile, "W1 new image"). Batches
therefore replay a graph captured once per size (the smallest that holds the batch; the rows past
it recompute the previous batch's pixels, and nothing reads them), up to the engine's
max_batch_size: large batches keep the GPU busier than their launches take, but beside an LLM
engine in the same process (the embedded pipeline) those launches are Python that competes for
the GIL with the engine's own, and in W2's burst the vision worker spent all its time launching.
PRISM_EAGER=1 turns the graphs off, as it does the LLM tier's.

The capture loop and the size pick live here and the LLM tier's graphs (llm_service/engine/
cuda_graph.py) use them too: a lower tier may not import a higher one.
"""
from __future__ import annotations

import bisect
import os
from typing import Callable

import torch

SIZES = (1, 2, 4, 8)


def graph_sizes(max_batch: int) -> list[int]:
    """SIZES, then powers of two below `max_batch` and `max_batch` itself: the batch sizes an
    engine of that max_batch_size replays."""
    sizes, size = set(SIZES), SIZES[-1] * 2
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes | {max_batch})


def eager_requested() -> bool:
    """PRISM_EAGER=1: no CUDA graphs in any tier."""
    return os.environ.get("PRISM_EAGER", "0") not in ("", "0")


def pick_batch_size(sizes: list[int], batch: int) -> int | None:
    """Smallest of the ascending `sizes` that holds `batch` rows; None when none does."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


@torch.inference_mode()
def capture_graphs(sizes: list[int], forward: Callable[[int], None], device: torch.device,
                   before: Callable[[int], None] | None = None) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph of `forward(size)` per size, sharing one memory pool. Largest first, so the
    smaller graphs fit in the pool memory the larger one left; each size runs once outside
    the capture first (Triton compiles, NCCL/cuBLAS set up). Captured on `device`'s stream
    whatever the thread's current device: a tier on cuda:2 (`--device`) touches no other GPU."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    pool = None
    with torch.cuda.device(device):
        for size in reversed(sizes):
            if before is not None:
                before(size)
            forward(size)
            graph = torch.cuda.CUDAGraph()
            # thread_local: work other threads put on the GPU meanwhile (the other tier, embedded) is no error
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                forward(size)
            pool = graph.pool() if pool is None else pool
            graphs[size] = graph
        torch.cuda.synchronize()
    return graphs


class GraphedForward:
    """`forward(pixel_values)` for pixel batches of one shape, replayed from a graph per size
    of `graph_sizes(max_batch)` and eager beyond. The output is the caller's own tensor (a copy out of the
    graph's static one, which the next replay overwrites while the finisher may still read)."""

    @torch.inference_mode()
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, max_batch: int):
        """example: one image's pixel_values [1, ...] on the device, in the forward's dtype."""
        self.forward = forward
        self.sizes = graph_sizes(max_batch)
        self.pixels = example.expand(self.sizes[-1], *example.shape[1:]).clone()
        self.outputs: dict[int, torch.Tensor] = {}

        def run(size: int) -> None:  # the captured call's output is the one kept
            self.outputs[size] = forward(self.pixels[:size])

        self.graphs = capture_graphs(self.sizes, run, example.device)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = pixel_values.shape[0]
        size = pick_batch_size(self.sizes, n)
        if size is None or pixel_values.shape[1:] != self.pixels.shape[1:]:
            return self.forward(pixel_values)
        self.pixels[:n].copy_(pixel_values)
        self.graphs[size].replay()
        return self.outputs[size][:n].clone()
