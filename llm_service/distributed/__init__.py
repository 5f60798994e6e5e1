"""Tensor-parallel state: which rank of how many this process is.

One process per rank; each rank holds a 1/tp_size shard of every parallel layer.
With tp_size == 1 (the only size wired up today) every collective is a no-op, so the
layers can be written TP-aware now and the multi-process launcher added later.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPState:
    rank: int = 0
    size: int = 1


_TP = TPState()


def init_tp(rank: int, size: int) -> None:
    """Record this process's rank; the process group must already exist when size > 1."""
    if not 0 <= rank < size:
        raise ValueError(f"tp rank {rank} out of range for tp size {size}")
    if size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tensor parallelism needs torch.distributed initialised first")
    _TP.rank, _TP.size = rank, size


def tp_rank() -> int:
    return _TP.rank


def tp_size() -> int:
    return _TP.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel layer across ranks (in place)."""
    if _TP.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard of the last dimension (vocab-parallel logits)."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
