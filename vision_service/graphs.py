"""Small vision batches replayed from CUDA graphs.

A LLaVA-1.5 tower and projector are some 300 kernels. Launched one by one from Python they took
9 ms of the H100 bench host's time for one image, whose forward needs a few ms of GPU: a lone
request's first token waited on the launches (bench.py --profile, "W1 new image"). Batches of up
to `SIZES[-1]` images therefore replay a graph captured once per size (the smallest that holds
the batch; the rows past it recompute the previous batch's pixels, and nothing reads them).
Larger batches keep the GPU busy for longer than their launches take and run eagerly.
PRISM_EAGER=1 turns the graphs off, as it does the LLM tier's.
"""
from __future__ import annotations

import bisect
import os
from typing import Callable

import torch

SIZES = (1, 2, 4, 8)


def graphs_wanted(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("PRISM_EAGER", "0") in ("", "0")


class GraphedForward:
    """`forward(pixel_values)` for pixel batches of one shape, replayed from a graph per size
    up to SIZES[-1] and eager beyond. The output is the caller's own tensor (a copy out of the
    graph's static one, which the next replay overwrites while the finisher may still read)."""

    @torch.inference_mode()
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor):
        """example: one image's pixel_values [1, ...] on the device, in the forward's dtype."""
        self.forward = forward
        self.sizes = list(SIZES)
        self.pixels = example.expand(self.sizes[-1], *example.shape[1:]).clone()
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller ones fit in its pool
            forward(self.pixels[:size])  # outside the capture first: cuBLAS and friends set up
            graph = torch.cuda.CUDAGraph()
            # thread_local: the embedded LLM tier's work on other threads is no capture error
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[size] = forward(self.pixels[:size])
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize(example.device)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = pixel_values.shape[0]
        i = bisect.bisect_left(self.sizes, n)
        if i == len(self.sizes) or pixel_values.shape[1:] != self.pixels.shape[1:]:
            return self.forward(pixel_values)
        size = self.sizes[i]
        self.pixels[:n].copy_(pixel_values)
        self.graphs[size].replay()
        return self.outputs[size][:n].clone()
