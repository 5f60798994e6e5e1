"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous slice of the vocabulary. The embedding zeroes rows of ids
outside its slice and all-reduces; the LM head computes its slice of the logits and
gathers the full vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_size
from llm_service.layers import triton_fused, triton_gemv
from llm_service.layers.linear import project


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // self.tp_size)  # ceil: the last shard may be padded
        self.start = self.tp_rank * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.fused = False

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = min(self.shard, loaded.shape[0] - self.start)  # the last shard may be padded
        if rows > 0:
            param.data[:rows].copy_(loaded.narrow(0, self.start, rows))

    def use_kernels(self) -> bool:
        """The lookup, the shard's mask and the zeroing in one Triton launch (triton_fused.embedding)."""
        self.fused = triton_fused.AVAILABLE
        return self.fused

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return all_reduce(triton_fused.embedding(ids, self.weight, self.start))
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.shard)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the full vocabulary (padding of the last shard dropped)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.use_gemv = False

    def use_kernels(self) -> bool:
        self.use_gemv = triton_gemv.AVAILABLE
        return self.use_gemv

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(project(hidden, self.weight, None, self.use_gemv))
        return logits[..., : self.vocab_size]
