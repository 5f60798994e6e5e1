"""Attention over the paged KV cache: the plain-torch reference implementation.

The contract (shared with the Triton kernels in triton_attention.py, which CUDA uses
when they import):

- per layer `k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]`;
- `store_kvcache` writes token t's K/V to slot `slot_mapping[t]` = block * block_size +
  offset, skipping slot -1;
- `paged_attention` takes sequences packed without padding: query j of sequence b
  (q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]) sits at absolute position
  seq_lens[b] - q_len_b + j and attends causally to cached keys 0..that position. GQA:
  query head h reads kv head h // (Hq // Hkv). One function covers prefill, chunked
  prefill, prefix-cache hits and decode.

This CPU path gathers each sequence's K/V and calls SDPA per sequence: slow, simple,
and the yardstick the kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.layers.rotary import Rope, apply_rotary


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    """max_q_len is a launch hint for the kernels; this reference does not need it."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, kv_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        blocks = block_tables[b, : -(-kv_len // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:kv_len].repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:kv_len].repeat_interleave(group, dim=1)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[start:end] = o.transpose(0, 1)
    return out




@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged cache (built once per step by the runner)."""

    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    max_q_len: int  # longest query of the batch (1: a pure decode step)


class Attention(nn.Module):
    """Rotates this step's q and k, stores K/V into its layer's cache, then attends over
    the cache. The runner assigns k_cache / v_cache after sizing the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)
        self.kernels = None

    def use_kernels(self) -> bool:
        """Switch to the Triton kernels (CUDA only); False when triton is not installed."""
        from llm_service.layers import triton_attention

        self.kernels = triton_attention if triton_attention.AVAILABLE else None
        return self.kernels is not None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.kernels is not None:
            q = self.kernels.rope_store(q, k, v, rope, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            q, k = apply_rotary(q, k, *rope.gathered)
            store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q, already rotated, over the cache that already holds this step's K/V
        (forward's second half; the QKV GEMV's epilogue may have done the first)."""
        attend = self.kernels.paged_attention if self.kernels is not None else paged_attention
        return attend(
            q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, self.scale,
            max_q_len=meta.max_q_len,
        )
