"""Rotary position embedding (rotate-half form, as transformers' Llama).

cos/sin are tabulated once in fp32 for every position up to max_positions and cast to
the activation dtype at use, which is what transformers does, so bf16 results match.
Attention applies them (layers/attention.py): on CUDA fused with the KV-cache write.
Supported rope types: default, linear and llama3; anything else is refused at load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies for `rope` = {"rope_theta", "rope_type", ...scaling keys}."""
    base = float(rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope["factor"]
    if rope_type == "llama3":
        return _llama3(inv_freq, rope)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")


def _llama3(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    ramp in between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, ramp, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: dict):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope)
        if inv_freq.numel() * 2 != head_dim:
            raise ValueError("partial rotary embeddings are not supported")
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rope:
        """What every layer's attention needs to rotate the step's tokens at `positions` [T]."""
        return Rope(self.cos, self.sin, positions)


@dataclass
class Rope:
    """fp32 cos/sin tables [max_positions, D] and the step's int64 positions [T]. The
    Triton path reads the tables by position inside its kernel; `gathered` is the torch path's."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor

    @cached_property
    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] of the step's positions, gathered once per step for every layer."""
        return self.cos[self.positions].unsqueeze(1), self.sin[self.positions].unsqueeze(1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in their own dtype."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
