"""Batched token selection with transformers' semantics.

Processors run on the whole batch at once, in transformers' order: repetition penalty
(over prompt + generated ids), banned ids, stop ids suppressed until min_new_tokens;
then for sampled rows temperature, top-k, top-p and min-p, and a draw. Greedy rows take
the exact argmax. Rows with a seed draw their noise from their own torch.Generator, so
a seeded request samples the same tokens whatever it is batched with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_service.engine.sequence import Sequence


@dataclass
class SamplingBatch:
    """Per-row tensors of one step's sampling settings (built once per step)."""

    greedy: torch.Tensor  # bool [B]
    temperature: torch.Tensor  # [B]
    top_k: torch.Tensor  # int64 [B], vocab size when off
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    penalty: torch.Tensor | None  # [B], None when no row penalises
    history: torch.Tensor | None  # int64 [B, L] prompt + output ids (padded with row's first id)
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids) to set to -inf
    generators: list[tuple[int, torch.Generator]]  # seeded rows
    any_sampled: bool

    @classmethod
    def build(cls, seqs: list[Sequence], eos_ids: list[int], vocab_size: int, device: torch.device) -> SamplingBatch:
        """Per-row settings travel in one host tensor (plus history and banned ids when used),
        copied asynchronously: building it overlaps the forward still running on the GPU."""
        ps = [s.params for s in seqs]
        settings = _to_device(torch.tensor([
            [float(p.greedy) for p in ps],
            [p.temperature if not p.greedy else 1.0 for p in ps],
            [p.top_k or vocab_size for p in ps],  # exact in float32 below 2**24
            [p.top_p for p in ps],
            [p.min_p for p in ps],
            [p.repetition_penalty for p in ps],
        ], dtype=torch.float32), device)
        penalty = history = None
        if any(p.repetition_penalty != 1.0 for p in ps):
            penalty = settings[5]
            width = max(len(s) for s in seqs)
            history = _to_device(torch.tensor([s.token_ids + [s.token_ids[0]] * (width - len(s)) for s in seqs]), device)
        rows: list[int] = []
        ids: list[int] = []
        for r, (s, p) in enumerate(zip(seqs, ps)):
            banned = list(p.bad_token_ids)
            if s.num_output_tokens < p.min_new_tokens:
                banned += p.stop_token_ids + ([] if p.ignore_eos else eos_ids)
            rows += [r] * len(banned)
            ids += banned
        banned_t = None
        if ids:
            pairs = _to_device(torch.tensor([rows, ids]), device)
            banned_t = (pairs[0], pairs[1])
        return cls(
            greedy=settings[0] > 0,
            temperature=settings[1],
            top_k=settings[2].long(),
            top_p=settings[3],
            min_p=settings[4],
            penalty=penalty,
            history=history,
            banned=banned_t,
            generators=[(r, s.generator) for r, s in enumerate(seqs) if s.generator is not None and not s.params.greedy],
            any_sampled=not all(p.greedy for p in ps),
        )


def argmax_only(seqs: list[Sequence]) -> bool:
    """Whether every row takes the plain argmax this step (greedy, no penalty, nothing
    banned): then `sample` would be one argmax, and no settings need building."""
    for s in seqs:
        p = s.params
        if not p.argmax_only or (p.min_new_tokens and len(s.token_ids) - s.num_prompt_tokens < p.min_new_tokens):
            return False
    return True


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA through pinned memory without blocking: a copy from pageable memory would
    wait for the GPU to finish the step's forward first."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Processors that apply to greedy and sampled rows alike (on a copy, when any applies)."""
    if b.penalty is None and b.banned is None:
        return logits
    logits = logits.clone()
    if b.penalty is not None:
        seen = logits.gather(1, b.history)
        pen = b.penalty[:, None]
        logits.scatter_(1, b.history, torch.where(seen < 0, seen * pen, seen / pen))
    if b.banned is not None:  # a flat index_fill: indexing with (rows, ids) syncs with the host on CUDA
        rows, ids = b.banned
        logits.view(-1).index_fill_(0, rows * logits.shape[1] + ids, float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masking, all rows at once."""
    logits = logits / b.temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    drop = rank >= b.top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # transformers' rule: drop tokens whose mass together with all less likely ones is
    # <= 1 - top_p, summed from the least likely up as it does; top_p = 1 is off
    tail = probs.flip(-1).cumsum(dim=-1).flip(-1)
    drop = (tail <= 1 - b.top_p[:, None]) & (rank > 0) & (b.top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop = probs < b.min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Next token id per row, int64 [B], from raw float32 logits [B, vocab]."""
    logits = apply_penalties(logits, b)
    chosen = logits.argmax(dim=-1)
    if not b.any_sampled:
        return chosen
    probs = filter_logits(logits, b).softmax(dim=-1)
    # a categorical draw as argmax(p / E) with E ~ Exp(1): one batched op, no host sync
    noise = torch.empty_like(probs).exponential_()
    for row, gen in b.generators:
        noise[row].exponential_(generator=gen)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(b.greedy, chosen, drawn)
