"""Decode steps replayed from CUDA graphs.

A decode step of a 7B model is a few hundred small kernels; launched one by one from Python
they cost more host time than the GPU needs at small batches. Pure decode steps (every
sequence q_len 1, no image rows) are therefore captured once per batch size of a ladder and
replayed: the step's tensors are copied into static buffers, the rows past the batch are
padding (slot -1: nothing stored; seq_len 0: attention gives zeros) and the smallest
captured size that holds the batch replays. Everything else runs eagerly.

The graph covers the model forward and the LM head, so with tensor parallelism each rank
replays its own graph of the same size and the collectives (NCCL) are part of the graph.
PrefillGraphs does the same for short prefills of one sequence (a follow-up turn's new tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_service.layers.attention import AttentionMetadata
from llm_service.models.llama import LlamaForCausalLM
from vision_service.graphs import capture_graphs, eager_requested, pick_batch_size


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The ladder: 1, 2, 4, 8, 16, 24, 32, then every 16, capped by (and ending at)
    max_batch_size. Padding costs at most 1/3 extra rows past 16."""
    ladder = [1, 2, 4, 8, 16, 24, 32]
    while ladder[-1] < max_batch_size:
        ladder.append(ladder[-1] + 16)
    return sorted({min(bs, max_batch_size) for bs in ladder})


def graphs_enabled(device: torch.device, uses_kernels: bool, eager_mode: bool) -> bool:
    """Graphs need CUDA and the Triton kernels (the torch attention reads lengths on the host);
    eager_mode or PRISM_EAGER=1 turns them off."""
    return device.type == "cuda" and uses_kernels and not eager_mode and not eager_requested()


@dataclass
class _Buffers:
    """Static inputs and output at the largest size; a graph of size bs uses rows [:bs]."""

    ids: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    slot_mapping: torch.Tensor  # int64 [N]
    block_tables: torch.Tensor  # int32 [N, max_blocks]
    cu_seqlens_q: torch.Tensor  # int32 [N + 1], always 0..N (every q_len is 1)
    seq_lens: torch.Tensor  # int32 [N]
    logits: torch.Tensor  # float32 [N, vocab]

    def meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            max_q_len=1,
        )


class DecodeGraphs:
    """One captured decode graph per ladder size, sharing a memory pool and the buffers.
    Build it after the KV cache exists: the graphs bake in the addresses of the cache (and of
    an int8 cache's scales, which the attention modules hold next to it)."""

    def __init__(self, model: LlamaForCausalLM, max_batch_size: int, max_blocks: int, device: torch.device):
        self.model = model
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_blocks = max_blocks
        n = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        with torch.inference_mode():
            self.buf = _Buffers(
                ids=torch.zeros(n, **i64),
                positions=torch.zeros(n, **i64),
                slot_mapping=torch.full((n,), -1, **i64),
                block_tables=torch.zeros(n, max_blocks, **i32),
                cu_seqlens_q=torch.arange(n + 1, **i32),
                seq_lens=torch.zeros(n, **i32),
                logits=torch.zeros(n, model.args.vocab_size, dtype=torch.float32, device=device),
            )
        self.graphs = capture_graphs(self.sizes, self._forward, device)  # captured with the padding values

    def _forward(self, bs: int) -> None:
        b = self.buf
        hidden = self.model(b.ids[:bs], b.positions[:bs], b.meta(bs))
        b.logits[:bs] = self.model.compute_logits(hidden)


    def can_run(self, num_rows: int, num_logits: int, meta: AttentionMetadata, has_images: bool) -> bool:
        """Whether a step is a pure decode a graph covers: q_len 1 everywhere, every row
        sampling, no image rows, and within the captured batch and block-table sizes."""
        return (
            meta.max_q_len == 1
            and not has_images
            and num_logits == num_rows
            and num_rows <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """float32 logits [B, vocab]: a view of the static output, valid until the next replay."""
        n = ids.shape[0]
        bs = pick_batch_size(self.sizes, n)
        b = self.buf
        b.ids[:n].copy_(ids, non_blocking=True)
        b.positions[:n].copy_(positions, non_blocking=True)
        b.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        b.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        if n < bs:  # padding rows
            b.slot_mapping[n:bs].fill_(-1)
            b.seq_lens[n:bs].zero_()
        b.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)
        self.graphs[bs].replay()
        return b.logits[:n]


PREFILL_SIZES = (16, 32, 64)  # query lengths of the captured short prefills


class PrefillGraphs:
    """Short prefills of one sequence, replayed from CUDA graphs: a follow-up turn whose
    history is in the prefix cache prefills only its new tokens, and eagerly that forward
    is bound by launching some 400 kernels from Python, not by the GPU.

    A graph of size T runs the sequence's n <= T tokens as sequence 0 and the T - n padding
    rows as a sequence 1 of length 0 (slot -1, position 0: nothing stored, attention gives
    zeros); the logits are the sequence's last token's. Shares nothing with DecodeGraphs but
    the model and the KV cache."""

    def __init__(self, model: LlamaForCausalLM, max_blocks: int, device: torch.device):
        self.model = model
        self.sizes = list(PREFILL_SIZES)
        self.max_blocks = max_blocks
        n = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        with torch.inference_mode():
            self.ids = torch.zeros(n, **i64)
            self.positions = torch.zeros(n, **i64)
            self.slot_mapping = torch.full((n,), -1, **i64)
            self.block_tables = torch.zeros(2, max_blocks, **i32)
            self.cu_seqlens_q = torch.zeros(3, **i32)
            self.seq_lens = torch.zeros(2, **i32)
            self.last_row = torch.zeros(1, **i64)
            self.logits = torch.zeros(1, model.args.vocab_size, dtype=torch.float32, device=device)
        self.graphs = capture_graphs(self.sizes, self._forward, device, before=self._padding_only)

    def _forward(self, size: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables,
            cu_seqlens_q=self.cu_seqlens_q,
            seq_lens=self.seq_lens,
            max_q_len=size,
        )
        hidden = self.model(self.ids[:size], self.positions[:size], meta)
        self.logits.copy_(self.model.compute_logits(hidden.index_select(0, self.last_row)))

    def _padding_only(self, size: int) -> None:
        """Before capturing size: all rows in sequence 0 of length 0 (nothing is stored)."""
        self.cu_seqlens_q.copy_(torch.tensor([0, size, size]))

    def can_run(self, num_rows: int, logits_rows: torch.Tensor, meta: AttentionMetadata, has_images: bool) -> bool:
        """One sequence of 2..max size new tokens, no image rows, sampling (then its one
        logits row is its last token)."""
        return (
            meta.seq_lens.shape[0] == 1
            and not has_images
            and 1 < num_rows <= self.sizes[-1]
            and logits_rows.shape[0] == 1
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            logits_rows: torch.Tensor) -> torch.Tensor:
        """float32 logits [1, vocab]: a view of the static output, valid until the next replay."""
        n = ids.shape[0]
        size = pick_batch_size(self.sizes, n)
        self.ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(-1)
        self.block_tables[0, : meta.block_tables.shape[1]].copy_(meta.block_tables[0], non_blocking=True)
        self.seq_lens[:1].copy_(meta.seq_lens, non_blocking=True)
        self.cu_seqlens_q[1:].fill_(n)  # sequence 0 is rows [0, n), the padding rows [n, size)
        self.cu_seqlens_q[2:].fill_(size)
        self.last_row.copy_(logits_rows, non_blocking=True)
        self.graphs[size].replay()
        return self.logits
