"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous slice of the vocabulary. The embedding zeroes rows of ids
outside its slice and all-reduces; the LM head computes its slice of the logits and
gathers the full vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.distributed import (all_gather_last_dim, all_reduce, can_pick_greedy, greedy_ids, partial_sender,
                                     tp_rank, tp_size)
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

    def forward(self, ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """reduce=False returns this rank's rows (zero for ids of other shards), for a norm that
        sums them over the ranks (RMSNorm's reduce=True), as RowParallelLinear's partial sums."""
        if self.fused:
            sender = None if reduce else partial_sender(ids.shape[0], self.weight.shape[1], self.weight.dtype)
            out = triton_fused.embedding(ids, self.weight, self.start, send=sender)  # pending, if sent
            return all_reduce(out) if reduce else out
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.shard)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out) if reduce else out


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the full vocabulary (padding of the last shard dropped); in two
    halves for decode graphs, which pick greedy ids from this rank's shard (`greedy`) and
    gather the whole rows only when a step needs them."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.use_gemv = False

    def use_kernels(self) -> bool:
        self.use_gemv = triton_gemv.AVAILABLE
        return self.use_gemv

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gather(self.shard_logits(hidden))

    def shard_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's columns of the logits [rows, shard] (into `out` when given)."""
        if out is not None and self.use_gemv and hidden.shape[0] <= triton_gemv.MAX_ROWS:
            return triton_gemv.gemv(hidden, self.weight, out=out)
        logits = project(hidden, self.weight, None, self.use_gemv)
        return logits if out is None else out.copy_(logits)

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's `shard_logits` side by side: the logits over the vocabulary."""
        return all_gather_last_dim(shard)[..., : self.vocab_size]

    def can_pick(self, rows: int) -> bool:
        """Whether `greedy` takes `rows` rows (the same answer on every rank)."""
        return can_pick_greedy(rows, self.weight.device)

    def greedy(self, shard: torch.Tensor, out: torch.Tensor | None = None,
               host: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The argmax of each row of the gathered logits, from every rank's `shard_logits` (where
        `can_pick`): the ids of a greedy step without gathering the rows (host: greedy.argmax's)."""
        return greedy_ids(shard, self.start, min(self.shard, self.vocab_size - self.start), out, host)
