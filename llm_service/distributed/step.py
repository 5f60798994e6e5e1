"""The tensors of one forward step, the flat form they travel in, and the broadcasts.

Rank 0 packs a step's host-side lists into one int64 tensor described by a small header
of sizes, copies it to the device once, and every rank (rank 0 included) unpacks the
same views from it. Under tensor parallelism rank 0 broadcasts the fixed-size header
(the sizes the workers allocate from, or SHUTDOWN), the flat tensor and, when the step
has any, the image rows at full hidden size (every rank embeds every token, so every
rank fills the image positions): three broadcasts at most, nothing pickled. While idle,
rank 0 sends a PING header now and then, so the workers' wait for the next step never
reaches the collective timeout.
"""
from __future__ import annotations

from array import array

from dataclasses import dataclass

import torch
import torch.distributed as dist

from llm_service.layers.attention import AttentionMetadata

HEADER_LEN = 8
STEP, SHUTDOWN, PING = 1, 2, 3  # header[0]: what the workers are to do


@dataclass
class StepInputs:
    """What the model's forward reads; every rank builds the same one."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # int64 [L]: the rows whose logits are sampled
    image_index: torch.Tensor | None = None  # int64 [R]: packed positions image_rows replace
    image_rows: torch.Tensor | None = None  # [R, hidden] in the model's dtype


@dataclass
class PackedStep:
    """header = [kind, tokens, seqs, table width, logits rows, image rows, max_q_len, len(ints)]."""

    header: list[int]
    header_t: torch.Tensor  # the header on the device, for the broadcast
    ints: torch.Tensor  # int64: ids, positions, slots, block tables, cu_seqlens, seq_lens, logits rows, image index
    image_rows: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        cu_seqlens: list[int],
        seq_lens: list[int],
        logits_rows: list[int],
        image_index: list[int],
        image_rows: torch.Tensor | None,
        device: torch.device,
    ) -> "PackedStep":
        width = len(tables[0])
        flat = ids + positions + slots + [b for row in tables for b in row] + cu_seqlens + seq_lens + logits_rows
        if image_rows is not None:
            flat += image_index
        max_q_len = max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:]))
        n_rows = 0 if image_rows is None else image_rows.shape[0]
        header = [STEP, len(ids), len(seq_lens), width, len(logits_rows), n_rows, max_q_len, len(flat)]
        values = array("q", header)
        values.extend(flat)
        packed = _on_device(torch.frombuffer(values, dtype=torch.int64), device)  # one copy
        return cls(header, packed[:HEADER_LEN], packed[HEADER_LEN:], image_rows)

    def unpack(self) -> StepInputs:
        _, t, b, width, n_logits, n_rows, max_q_len, _ = self.header
        sizes = [t, t, t, b * width, b + 1, b, n_logits, n_rows]
        ids, positions, slots, tables, cu, lens, logits_rows, index = self.ints.split(sizes)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables.view(b, width).to(torch.int32),
            cu_seqlens_q=cu.to(torch.int32),
            seq_lens=lens.to(torch.int32),
            max_q_len=max_q_len,
        )
        if not n_rows:
            return StepInputs(ids, positions, meta, logits_rows)
        return StepInputs(ids, positions, meta, logits_rows, index, self.image_rows)


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Through pinned memory without blocking on CUDA: no wait for the GPU's queued work."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def send_step(step: PackedStep) -> None:
    """Rank 0: broadcast `step` (its tensors already on this rank's device)."""
    dist.broadcast(step.header_t, src=0)
    dist.broadcast(step.ints, src=0)
    if step.image_rows is not None:
        dist.broadcast(step.image_rows, src=0)


def send_control(kind: int, device: torch.device) -> None:
    """Rank 0: a header without a step (SHUTDOWN or PING)."""
    header = torch.tensor([kind] + [0] * (HEADER_LEN - 1), dtype=torch.int64)
    dist.broadcast(_on_device(header, device), src=0)


def recv_step(device: torch.device, dtype: torch.dtype, hidden_size: int) -> PackedStep | None:
    """Workers: the next step rank 0 broadcasts (PINGs skipped); None on shutdown."""
    header_t = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    while True:
        dist.broadcast(header_t, src=0)
        header = header_t.tolist()
        if header[0] != PING:
            break
    if header[0] == SHUTDOWN:
        return None
    if header[0] != STEP:
        raise RuntimeError(f"unknown step header {header}")
    ints = torch.empty(header[7], dtype=torch.int64, device=device)
    dist.broadcast(ints, src=0)
    rows = None
    if header[5]:
        rows = torch.empty(header[5], hidden_size, dtype=dtype, device=device)
        dist.broadcast(rows, src=0)
    return PackedStep(header, header_t, ints, rows)
