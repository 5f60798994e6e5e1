"""Small all-reduces in one kernel, through PyTorch's symmetric memory.

Why: at tp=2 a bs=1 decode step of a 7B model does 64 all-reduces of 8 KB, and NCCL (NVLS off)
spends 15-20 us on each back to back. `torch.ops.symm_mem.one_shot_all_reduce_copy_out` does it in
one launch: it copies x into this rank's buffer, which every rank has mapped (CUDA IPC over NVLink,
peer to peer), meets the peers at a barrier of flags in the buffers' signal pads, sums the ranks'
buffers into x, and meets them again so that nobody overwrites a buffer still being read.

- CUDA graphs: the buffers, the peers' mappings and the signal pads are made once (`start`) and
  never move, and the barrier leaves every flag as it found it, so a captured call replays as is.
- Determinism: every rank adds the ranks' values in rank order, 0 + 1 + ..., in the tensor's dtype,
  so all ranks get the same bits (and at tp=2 the bits NCCL gives: one rounding of a + b).
- NVLink multicast (NVLS) stays off: TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is set before any buffer
  is shared, and only peer-to-peer ops run.

PRISM_ALLREDUCE picks the path: `auto` (default, = `ll`), `ll` (ll_allreduce.py's barrier-free
Triton kernel up to LL_MAX_BYTES, 3.3 us at 8 KB on 2 H200s, and the one-shot op above), `symm`
(the one-shot op up to MAX_BYTES), `nccl` (off). What does not fit (other dtypes, views off a
16-byte boundary, larger tensors) goes to NCCL; the choice depends only on shape, dtype and layout,
the same on every rank.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llm_service.distributed import ll_allreduce

logger = logging.getLogger(__name__)

# Decode all-reduces are [bs, hidden]: 8 KB at bs 1 .. 2 MiB at bs 256 in bf16. On 2 H200s, 64 back to
# back in a CUDA graph, the one-shot op took 6.6 us at 8 KB, 11 at 512 KB, 21 at 2 MiB; NCCL 14-20, 19,
# 38; at 4 MiB 36 against 41, at 8 MiB NCCL wins (bench/README.md).
MAX_BYTES = 2 * 1024 * 1024
LL_MAX_BYTES = 512 * 1024  # the Triton kernel's packets double the bytes sent
ALIGN = 16  # the op loads 16 bytes a thread; views must keep that alignment
DTYPES = (torch.bfloat16, torch.float32)  # what the op is built for
MODES = ("auto", "symm", "ll", "nccl")


@dataclass
class SymmAllReduce:
    """One symmetric buffer of `max_bytes` per rank, the name of the group that shares it, and
    the barrier-free kernel for the smaller tensors when PRISM_ALLREDUCE=ll."""

    buffer: torch.Tensor  # uint8 [max_bytes], symmetric: the same size on every rank
    handle: object  # the rendezvous result; keeps the peers' mappings alive
    group_name: str
    max_bytes: int
    ll: ll_allreduce.LLAllReduce | None = None

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` takes this path; the same answer on every rank for the same call."""
        nbytes = x.numel() * x.element_size()
        return (x.is_cuda and x.dtype in DTYPES and 0 < nbytes <= self.max_bytes and nbytes % ALIGN == 0
                and x.is_contiguous() and x.storage_offset() * x.element_size() % ALIGN == 0)

    def reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (x must `fit`)."""
        if self.ll is not None and self.ll.fits(x):
            return self.ll.reduce_(x)
        symm = self.buffer.view(x.dtype)[: x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, x, "sum", self.group_name, x)


def mode() -> str:
    value = os.environ.get("PRISM_ALLREDUCE", "auto").strip().lower()
    if value not in MODES:
        raise ValueError(f"PRISM_ALLREDUCE must be one of {', '.join(MODES)}, got {value!r}")
    return "ll" if value == "auto" else value


def enabled() -> bool:
    """Off with PRISM_ALLREDUCE=nccl; otherwise used on CUDA when every rank can set it up."""
    return mode() != "nccl"


def start(device: torch.device, max_bytes: int | None = None) -> SymmAllReduce | None:
    """Share a buffer of `max_bytes` (default MAX_BYTES) with every rank of the default (NCCL)
    group, and with PRISM_ALLREDUCE=ll the Triton kernel's buffers; None, on every rank alike,
    when any rank cannot (no peer access, an old torch): all-reduces then stay with NCCL. The
    Triton kernel alone is dropped, on every rank alike, when it cannot be set up. Collective."""
    group, max_bytes = dist.group.WORLD, max_bytes or MAX_BYTES
    with torch.cuda.device(device):
        buffer = _try(lambda: _register(group) or _prepare(device, max_bytes, torch.uint8), "set-up")
        if not _all_ranks(buffer is not None, device):
            return None
        handle = _try(lambda: _rendezvous(buffer, group), "rendezvous")
        if not _all_ranks(handle is not None, device):
            return None
        fast = SymmAllReduce(buffer, handle, group.group_name, max_bytes)
        if mode() == "ll":
            fast.ll = _start_ll(group, device)
    return fast


def _start_ll(group: dist.ProcessGroup, device: torch.device) -> ll_allreduce.LLAllReduce | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    words = 2 * world * (LL_MAX_BYTES // 4)

    def prepare():
        if not ll_allreduce.AVAILABLE:
            raise RuntimeError("triton is not installed")
        return _prepare(device, words, torch.int64).zero_()  # flag 0: nobody wrote here

    recv = _try(prepare, "Triton kernel set-up")
    if not _all_ranks(recv is not None, device):
        return None
    handle = _try(lambda: _rendezvous(recv, group), "Triton kernel rendezvous")
    ll = _try(lambda: ll_allreduce.make(recv, handle, rank, world, LL_MAX_BYTES), "Triton kernel") if handle else None
    torch.cuda.synchronize(device)  # every buffer zeroed before a peer may write into it
    return ll if _all_ranks(ll is not None, device) else None


def _try(fn, what: str):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure means: stay with what works
        logger.warning("symmetric-memory all-reduce: %s failed on rank %d: %s", what, dist.get_rank(), e)
        return None


def _register(group: dist.ProcessGroup) -> None:
    """Once per group, before its first buffer."""
    from torch.distributed import _symmetric_memory as symm_mem

    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        raise RuntimeError(f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy_out")
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # read at each rendezvous; never use NVLS
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None and not getattr(enable, "__deprecated__", None):
        # torch versions that still need the group registered (newer ones resolve it themselves)
        getattr(symm_mem, "_group_name_to_store", {}).pop(group.group_name, None)  # a restarted group
        enable(group.group_name)


def _prepare(device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This rank's buffer, before any peer maps it."""
    from torch.distributed import _symmetric_memory as symm_mem

    return symm_mem.empty(numel, dtype=dtype, device=device)


def _rendezvous(buffer: torch.Tensor, group: dist.ProcessGroup) -> object:
    from torch.distributed import _symmetric_memory as symm_mem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        handle = symm_mem.rendezvous(buffer, group.group_name)
    if getattr(handle, "multicast_ptr", 0):
        logger.warning("symmetric memory got a multicast mapping although it was disabled; not used")
    return handle


def _all_ranks(ok: bool, device: torch.device) -> bool:
    """True when `ok` holds on every rank (one small NCCL all-reduce)."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
