"""Tensor-parallel state: which rank of how many this process is, and its collectives.

One process per rank (rank 0 is the engine; launcher.py starts the workers); each rank
holds a 1/tp_size shard of every parallel layer. With tp_size == 1 every collective is a
no-op. The process group is gloo on CPU and NCCL on CUDA; on CUDA, small all-reduces (decode's
[bs, hidden] partial sums) take symm_allreduce's one-kernel path instead of NCCL. Beside it, a
gloo group of the same ranks carries the step headers on the host (step.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llm_service.distributed import greedy, symm_allreduce


@dataclass
class TPState:
    rank: int = 0
    size: int = 1
    fast: symm_allreduce.SymmAllReduce | None = None  # CUDA groups only; set up by start_group
    control: dist.ProcessGroup | None = None  # gloo, for the step headers; set up by start_group
    device: torch.device | None = None  # this rank's, while in a group


_TP = TPState()


def init_tp(rank: int, size: int) -> None:
    """Record this process's rank; the process group must already exist when size > 1."""
    if not 0 <= rank < size:
        raise ValueError(f"tp rank {rank} out of range for tp size {size}")
    if size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tensor parallelism needs torch.distributed initialised first")
    _TP.rank, _TP.size = rank, size


def start_group(store: dist.Store, rank: int, size: int, device: torch.device, timeout: timedelta) -> None:
    """Join the tensor-parallel process group (the default group) and, beside it, the gloo group
    of the step headers (on CPU too, so CPU runs take the same two channels); record the rank.
    `timeout` bounds every collective of both, so a hung peer becomes an error."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    init_tp(rank, size)
    _TP.device = device
    if size > 1:  # every rank, in the same order: new_group is collective
        _TP.control = dist.new_group(backend="gloo", timeout=timeout)
    if device.type == "cuda" and size > 1 and symm_allreduce.enabled():
        # once per process, before any CUDA graph is captured: graphs bake in the buffer's address
        _TP.fast = symm_allreduce.start(device)


def stop_group() -> None:
    """Leave the process groups (if any) and go back to a single rank. Graphs that captured an
    all-reduce must be gone first: the symmetric buffer they read is freed here. On CUDA it first
    waits for this rank's queued work (a worker's host runs ahead of its GPU), so no collective is
    in flight when its communicator goes. So only in a clean shutdown, where every peer runs its
    side of what this rank queued; never after a peer died mid-step (the wait would not end)."""
    _TP.fast = None
    _TP.control = None
    device, _TP.device = _TP.device, None
    if dist.is_available() and dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.destroy_process_group()
    _TP.rank, _TP.size = 0, 1


def control_group() -> dist.ProcessGroup:
    """The gloo group the step headers travel on (start_group's; tensor parallelism only)."""
    if _TP.control is None:
        raise RuntimeError("no tensor-parallel group: start_group first")
    return _TP.control


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value`, e.g. the KV-cache blocks all ranks can hold."""
    if _TP.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def tp_rank() -> int:
    return _TP.rank


def tp_size() -> int:
    return _TP.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel layer across ranks (in place). Small CUDA tensors
    take the symmetric-memory kernel (bit-identical on every rank), the rest NCCL or gloo."""
    if _TP.size > 1:
        if _TP.fast is not None and _TP.fast.fits(x):
            _TP.fast.reduce_(x)
        else:
            dist.all_reduce(x)
    return x


def ll_exchange():
    """The barrier-free exchange (an ll_allreduce.LLAllReduce) under tensor parallelism, where set
    up; None alone or without it."""
    return None if _TP.size == 1 or _TP.fast is None else _TP.fast.ll


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> torch.Tensor | None:
    """all_reduce(x), residual += x, RMSNorm(residual) * weight as one kernel (without a residual:
    RMSNorm(x) of the summed x), when the barrier-free path (PRISM_ALLREDUCE=ll) is set up and x
    is a decode-sized [rows, hidden]; None otherwise (the caller does the steps). Same answer on
    every rank."""
    ll = ll_exchange()
    if ll is None or not ll.fits_rms_norm(x, residual):
        return None
    return ll.reduce_rms_norm_(x, residual, weight, eps)


def partial_sender(rows: int, hidden: int, dtype: torch.dtype):
    """The ll all-reduce (an ll_allreduce.LLAllReduce) when the next norm will sum a row-parallel
    layer's (or the vocab shard embedding's) [rows, hidden] partial sums through it
    (`all_reduce_rms_norm`), so that the kernel making them can send them itself
    (triton_gemv.gemv's and triton_fused.embedding's `send`); None otherwise."""
    ll = ll_exchange()
    return ll if ll is not None and ll.fits_norm_rows(rows, hidden, dtype) else None


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard of the last dimension (vocab-parallel logits)."""
    if _TP.size == 1:
        return x
    ll = ll_exchange()
    if ll is not None and ll.fits_gather(x):  # decode's few rows: one launch
        return ll.all_gather_last_dim(x)
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def can_pick_greedy(rows: int, device: torch.device) -> bool:
    """Whether `greedy_ids` takes `rows` rows of vocab-parallel logits on `device`: CUDA with
    Triton and, under tensor parallelism, the ll all-reduce set up and the rows within it."""
    if device.type != "cuda":
        return False
    ll = ll_exchange()
    return (_TP.size == 1 or ll is not None) and greedy.fits(rows, ll)


def greedy_ids(shard: torch.Tensor, start: int, valid: int, out: torch.Tensor | None = None,
               host: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Each row's argmax over the whole vocabulary (int64), from this rank's shard of the logits
    (columns start..start+valid of it real) and every other rank's (greedy.py), where
    `can_pick_greedy`; the same ids on every rank. host: see greedy.argmax."""
    return greedy.argmax(shard, start, valid, ll_exchange(), out, host)
