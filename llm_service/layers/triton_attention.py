"""Triton kernels for paged attention on CUDA: rotary + KV-cache store, prefill and split-K decode.

Same semantics as the CPU reference in `attention.py`:
- caches are `[num_blocks, block_size, num_kv_heads, head_dim]`; slot = block * block_size + offset,
  and slot -1 is skipped (padded tokens under CUDA graphs);
- sequences are packed: query j of sequence b sits at absolute position
  `seq_lens[b] - q_len_b + j` and attends causally to cached keys 0..that position;
- GQA: query head h reads kv head `h // (Hq // Hkv)`.
Softmax runs online in fp32 (exp2 domain); the output has q's dtype. fp32 inputs use IEEE dots, not
tf32, so the fp32 test models match transformers. Nothing here syncs with the host: decode (every
q_len 1) is safe to capture in a CUDA graph with fixed batch size and block-table width.

The module imports without triton (CPU CI); `AVAILABLE` says whether the kernels can run.
"""
from __future__ import annotations

import functools

import torch

from llm_service.layers.rotary import Rope

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE: bool = triton is not None

_LOG2E = 1.4426950408889634


if AVAILABLE:
    _M_INIT = tl.constexpr(-1.0e30)  # finite running-max start: a masked row never computes inf - inf

    @triton.jit
    def _rotate(x1, x2, c1, s1, c2, s2, DT: tl.constexpr):
        """Rotate-half RoPE of the halves x1, x2, rounding to DT after each multiply and
        the add, as transformers' `x * cos + rotate_half(x) * sin` does in DT."""
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        o1 = (x1 * c1).to(DT).to(tl.float32) + (-(x2 * s1)).to(DT).to(tl.float32)
        o2 = (x2 * c2).to(DT).to(tl.float32) + (x1 * s2).to(DT).to(tl.float32)
        return o1.to(DT), o2.to(DT)

    @triton.jit
    def _rope_store_kernel(
        q_ptr, k_ptr, v_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr,
        stride_qt, stride_qh, stride_qot, stride_qoh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_rope,
        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, ROPE: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        """Token t: (with ROPE) q rotated into q_out; k (rotated with ROPE) and v stored at
        slot_mapping[t] unless that is -1. One program per token, both halves of head_dim."""
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)[None, :]
        d_ok = d < HALF
        DT = kc_ptr.dtype.element_ty
        if ROPE:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            c1 = tl.load(cos_ptr + pos * stride_rope + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            c2 = tl.load(cos_ptr + pos * stride_rope + HALF + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            s1 = tl.load(sin_ptr + pos * stride_rope + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * stride_rope + HALF + d, mask=d_ok, other=0.0).to(DT).to(tl.float32)
            hq = tl.arange(0, BLOCK_HQ)[:, None]
            q_ok = (hq < HQ) & d_ok
            src = q_ptr + t * stride_qt + hq * stride_qh + d
            q1, q2 = _rotate(tl.load(src, mask=q_ok), tl.load(src + HALF, mask=q_ok), c1, s1, c2, s2, DT)
            dst = q_out_ptr + t * stride_qot + hq * stride_qoh + d
            tl.store(dst, q1, mask=q_ok)
            tl.store(dst + HALF, q2, mask=q_ok)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            page = slot // PAGE
            off = slot % PAGE
            hk = tl.arange(0, BLOCK_HKV)[:, None]
            kv_ok = (hk < HKV) & d_ok
            k_src = k_ptr + t * stride_kt + hk * stride_kh + d
            k1, k2 = tl.load(k_src, mask=kv_ok), tl.load(k_src + HALF, mask=kv_ok)
            if ROPE:
                k1, k2 = _rotate(k1, k2, c1, s1, c2, s2, DT)
            v_src = v_ptr + t * stride_vt + hk * stride_vh + d
            kc = kc_ptr + page * stride_kcb + off * stride_kcs + hk * stride_kch + d
            vc = vc_ptr + page * stride_vcb + off * stride_vcs + hk * stride_vch + d
            tl.store(kc, k1.to(DT), mask=kv_ok)
            tl.store(kc + HALF, k2.to(DT), mask=kv_ok)
            tl.store(vc, tl.load(v_src, mask=kv_ok).to(DT), mask=kv_ok)
            tl.store(vc + HALF, tl.load(v_src + HALF, mask=kv_ok).to(DT), mask=kv_ok)

    @triton.jit
    def _prefill_kernel(
        q_ptr, kc_ptr, vc_ptr, o_ptr, bt_ptr, cu_ptr, lens_ptr, qk_scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program: BLOCK_M queries of one sequence and one query head."""
        mblk = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        if mblk * BLOCK_M >= q_len:
            return
        seq_len = tl.load(lens_ptr + b)
        ctx = seq_len - q_len
        kvh = h // GROUP

        offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < D
        q = tl.load(
            q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :], other=0.0,
        )
        pos = ctx + offs_m

        m_i = tl.full([BLOCK_M], _M_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(seq_len, ctx + (mblk + 1) * BLOCK_M)
        for start in range(0, kv_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < kv_end
            page = tl.load(bt_ptr + b * stride_bt + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            off = offs_n % PAGE
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_ptr + page[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where((offs_n[None, :] <= pos[:, None]) & n_mask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vc_ptr + page[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            o_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :],
        )

    @triton.jit
    def _decode_kernel(
        q_ptr, kc_ptr, vc_ptr, o_ptr, mpart_ptr, lpart_ptr, apart_ptr,
        bt_ptr, cu_ptr, lens_ptr, qk_scale, num_splits, num_q_heads,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program: all GROUP query heads of one kv head, one split of one sequence's keys.

        Each kv tile is read once for the whole GQA group; the group is padded to 16 rows so both
        products run on tensor cores (measured faster than a CUDA-core dot even for MHA). Splits cut the keys into equal,
        BLOCK_N-aligned ranges sized on device from seq_len, so a graph captured once serves any
        lengths. DIRECT (one split) writes the output; otherwise partial (max, sum, acc) go to
        scratch for `_decode_reduce_kernel`.
        """
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        q_row = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_row
        if q_len == 0:
            return
        seq_len = tl.load(lens_ptr + b)
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)
        if not DIRECT:
            if start >= end:
                return

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kvh * GROUP + offs_g
        g_mask = offs_g < GROUP
        d_mask = offs_d < D
        q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_G], _M_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            page = tl.load(bt_ptr + b * stride_bt + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            off = offs_n % PAGE
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_ptr + page[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + page[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if DIRECT:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            part = (b * num_q_heads + heads) * num_splits + split
            tl.store(mpart_ptr + part, m_i, mask=g_mask)
            tl.store(lpart_ptr + part, l_i, mask=g_mask)
            tl.store(apart_ptr + part[:, None] * D + offs_d[None, :], acc,
                     mask=g_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _decode_reduce_kernel(
        o_ptr, mpart_ptr, lpart_ptr, apart_ptr, cu_ptr, lens_ptr, num_splits, num_q_heads,
        stride_ot, stride_oh,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Merge the splits of one (sequence, query head); seq_len 0 gives zeros."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        q_row = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_row
        if q_len == 0:
            return
        seq_len = tl.load(lens_ptr + b)
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        active = tl.cdiv(seq_len, tl.maximum(split_len, 1))  # splits that wrote partials

        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < active
        d_mask = offs_d < D
        part = (b * num_q_heads + h) * num_splits + offs_s
        m = tl.load(mpart_ptr + part, mask=s_mask, other=_M_INIT)
        l = tl.load(lpart_ptr + part, mask=s_mask, other=0.0)
        a = tl.load(apart_ptr + part[:, None] * D + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.where(s_mask, tl.exp2(m - tl.max(m, 0)), 0.0)
        den = tl.sum(w * l, 0)
        out = tl.sum(w[:, None] * a, 0) / tl.where(den > 0, den, 1.0)
        tl.store(o_ptr + q_row * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
                 mask=d_mask)


def _require_triton() -> None:
    if not AVAILABLE:
        raise RuntimeError("triton is not installed: use the torch paths in llm_service.layers.attention")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write k, v `[T, Hkv, D]` into the caches at `slot_mapping` (int64 `[T]`; -1 skips)."""
    _rope_store(None, k, v, None, k_cache, v_cache, slot_mapping)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary embedding and cache write in one launch: returns q `[T, Hq, D]` rotated, and
    stores k (rotated) and v at `slot_mapping`. rope: the cos and sin tables and the positions,
    fp32 `[max_positions, D]` tables and int64 positions `[T]`."""
    return _rope_store(q, k, v, rope, k_cache, v_cache, slot_mapping)


def _rope_store(q, k, v, rope, k_cache, v_cache, slot_mapping):
    _require_triton()
    T, Hkv, D = k.shape
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    if q is None:  # store only: the q arguments are placeholders the kernel never reads
        q_in = q_out = k
        cos = sin = positions = slot_mapping
    else:
        q_in = _last_dim_contiguous(q)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        cos, sin, positions = rope.cos, rope.sin, rope.positions
    if T == 0:
        return q_out
    Hq = q_in.shape[1]
    _rope_store_kernel[(T,)](
        q_in, k, v, q_out, k_cache, v_cache, slot_mapping, positions, cos, sin,
        q_in.stride(0), q_in.stride(1), q_out.stride(0), q_out.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_cache_strides(k_cache, v_cache), cos.stride(0) if q is not None else 0,
        HQ=Hq, HKV=Hkv, HALF=D // 2, PAGE=k_cache.shape[1], ROPE=q is not None,
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HALF=triton.next_power_of_2(D // 2),
        enable_fp_fusion=False,  # a contracted multiply-add would skip the product's rounding
    )
    return q_out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    scale: float, max_q_len: int | None = None) -> torch.Tensor:
    """Causal attention of packed queries `[T, Hq, D]` over the paged caches; returns `[T, Hq, D]`.

    Decode (`max_q_len == 1`, or `max_q_len is None` and T == B, which means every q_len is 1) takes
    the split-K kernel; anything else (prefill, chunked prefill, prefix hits, mixed batches) the
    prefill kernel, whose grid is sized by `max_q_len` (T when not given).
    """
    _require_triton()
    T = q.shape[0]
    B = seq_lens.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    q = _last_dim_contiguous(q)
    if max_q_len == 1 or (max_q_len is None and T == B):
        _decode(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out)
    else:
        _prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out,
                 T if max_q_len is None else max_q_len)
    return out


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))


def _prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out, max_q_len, *,
             block_m: int | None = None, block_n: int | None = None, num_warps: int = 4,
             num_stages: int = 2) -> None:
    """The general kernel; the keyword knobs exist for bench/kernels_check.py's sweeps."""
    _, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    wide = q.element_size() * D > 256  # fp32 with D 128: smaller tiles to fit shared memory
    block_m = block_m or (32 if wide else 64)
    block_n = block_n or (32 if wide else 64)
    grid = (triton.cdiv(max_q_len, block_m), seq_lens.shape[0], Hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), block_tables.stride(0),
        GROUP=Hq // Hkv, D=D, PAGE=k_cache.shape[1], IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D),
        num_warps=num_warps, num_stages=num_stages,
    )


def _num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, sm_count: int) -> int:
    """Enough splits for ~2 programs per SM, each with at least one kv tile at full context."""
    splits = 1
    most = min(64, max(1, max_context // block_n))
    while batch * num_kv_heads * splits < 2 * sm_count and splits * 2 <= most:
        splits *= 2
    return splits


def _decode(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out, *,
            num_splits: int | None = None, block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> None:
    """Split-K decode; the keyword knobs exist for bench/kernels_check.py's sweeps."""
    B = seq_lens.shape[0]
    _, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    page = k_cache.shape[1]
    if num_splits is None:
        num_splits = _num_splits(B, Hkv, block_tables.shape[1] * page, block_n, _sm_count(q.device))
    block_d = triton.next_power_of_2(D)
    direct = num_splits == 1
    if direct:
        mpart = lpart = apart = out  # unused by the DIRECT kernel
    else:
        mpart = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
        lpart = torch.empty_like(mpart)
        apart = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, out, mpart, lpart, apart,
        block_tables, cu_seqlens_q, seq_lens, scale * _LOG2E, num_splits, Hq,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), block_tables.stride(0),
        GROUP=group, D=D, PAGE=page, IEEE=q.dtype == torch.float32, DIRECT=direct,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        _decode_reduce_kernel[(B, Hq)](
            out, mpart, lpart, apart, cu_seqlens_q, seq_lens, num_splits, Hq,
            out.stride(0), out.stride(1),
            D=D, BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=4,
        )
