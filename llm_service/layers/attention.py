"""Attention over the paged KV cache: the plain-torch reference implementation.

The contract (shared with the Triton kernels in triton_attention.py, which CUDA uses
when they import):

- per layer `k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]`, in the
  model's dtype, or (quant_policy=8) int8 codes with `k_scale, v_scale: float32
  [num_blocks, block_size, num_kv_heads]`, one symmetric scale per token and kv head
  (`quantize_kv`); attention reads `dequantize_kv`'s values, in the query's dtype (the
  kernels do for fp32 queries; for 16-bit ones they fold the scales into the scores and the
  softmax weights instead: the same attention, rounded differently);
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


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales of x [..., head_dim], symmetric per row (LMDeploy's
    quant_policy=8 granularity: one scale per token and kv head): scale = max|x| / 127 (1 for
    an all-zero row, which then stores zeros), codes round(x / scale) half to even. The
    kernels repeat this op for op, so they store the same bits."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, 1.0)
    return torch.round(x / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What an int8 cache holds, in the attention's compute dtype: codes x scale in float32,
    rounded once to `dtype`."""
    return (codes.float() * scale[..., None]).to(dtype)


def kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device, int8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A zeroed K (or V) cache of one layer and its scales (None unless int8)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if not int8:
        return torch.zeros(shape, dtype=dtype, device=device), None
    return (torch.zeros(shape, dtype=torch.int8, device=device),
            torch.zeros(shape[:3], dtype=torch.float32, device=device))


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, dtype: torch.dtype, int8: bool) -> int:
    """Bytes one token's K (or V) takes in one layer's cache, its scales included."""
    return num_kv_heads * (head_dim + 4 if int8 else head_dim * dtype.itemsize)


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """With scales (an int8 cache) k and v are stored as quantize_kv's codes and scales."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for x, cache, scales in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
        if scales is not None:
            x, row_scales = quantize_kv(x)
            scales.view(-1, scales.shape[2])[slots] = row_scales
        cache.view(-1, *cache.shape[2:])[slots] = x


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_decodes: int = 0,
) -> torch.Tensor:
    """max_q_len and num_decodes are launch hints for the kernels; this reference does not need
    them. With scales the caches are int8 and attention reads their dequantized values."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, kv_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        blocks = block_tables[b, : -(-kv_len // block_size)].long()
        k, v = k_cache[blocks], v_cache[blocks]
        if k_scale is not None:
            k, v = dequantize_kv(k, k_scale[blocks], q.dtype), dequantize_kv(v, v_scale[blocks], q.dtype)
        k = k.flatten(0, 1)[:kv_len].repeat_interleave(group, dim=1)
        v = v.flatten(0, 1)[:kv_len].repeat_interleave(group, dim=1)
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
    num_decodes: int = 0  # the leading sequences of q_len 1 (the scheduler puts decodes first)


class Attention(nn.Module):
    """Rotates this step's q and k, stores K/V into its layer's cache, then attends over
    the cache. The runner assigns k_cache / v_cache (and k_scale / v_scale for an int8
    cache; None otherwise) after sizing the cache, before any CUDA graph captures them."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.kernels = None

    def use_kernels(self) -> bool:
        """Switch to the Triton kernels (CUDA only); False when triton is not installed."""
        from llm_service.layers import triton_attention

        self.kernels = triton_attention if triton_attention.AVAILABLE else None
        return self.kernels is not None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.kernels is not None:
            q = self.kernels.rope_store(q, k, v, rope, self.k_cache, self.v_cache, meta.slot_mapping,
                                        self.k_scale, self.v_scale)
        else:
            q, k = apply_rotary(q, k, *rope.gathered)
            store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return self.attend(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q, already rotated, over the cache that already holds this step's K/V
        (forward's second half; the QKV GEMV's epilogue may have done the first)."""
        attend = self.kernels.paged_attention if self.kernels is not None else paged_attention
        return attend(
            q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, self.scale,
            max_q_len=meta.max_q_len, k_scale=self.k_scale, v_scale=self.v_scale, num_decodes=meta.num_decodes,
        )
