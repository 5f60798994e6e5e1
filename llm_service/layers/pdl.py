"""Programmatic dependent launch (Hopper and later): a kernel starts while the one before it ends.

A decode step is ~320 small kernels in a CUDA graph; each one normally waits for the previous
one to finish, drain and flush before its programs are even scheduled. With PDL our Triton
kernels are launched with `launch_pdl=True` and, in the kernel (`PDL: tl.constexpr`):
- every program calls `gdc_launch_dependents()` as it starts, so the next kernel is launched
  onto free SM slots during this one's tail;
- `gdc_wait()` comes before the first load or store of anything an earlier kernel wrote or
  still reads (activations, caches, metadata), except what no kernel of the forward writes:
  weights (the GEMV starts streaming its weight slice while the previous kernel finishes), and
  in the split attention kernel the step's metadata (written by copies before the forward) and
  the K/V (and an int8 cache's scales) of positions cached before this step (its predecessor
  writes only this step's).
The wait blocks until the previous grid has completed and flushed, and that grid itself waited
for its own predecessor, so ordering stays transitive. The barrier-free all-reduce kernels
(distributed/ll_allreduce.py) take part too. Kernels without PDL (cuBLAS, torch ops, NCCL) keep
the stream's usual full serialisation on both sides.

PRISM_PDL=0 turns it off. CPU runs (and Triton's interpreter, which has no inline asm) never use it.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA, compute capability >= 9, not disabled."""
    if device.type != "cuda" or os.environ.get("PRISM_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch: the kernel's PDL flag and, when on, `launch_pdl`."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
