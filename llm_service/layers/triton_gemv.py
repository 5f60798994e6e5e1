"""A Triton GEMV for decode: y = x W^T with a handful of rows of x.

At decode batch sizes a step reads every weight once, so a projection is as fast as its
weight streams from HBM. cuBLAS picks tile shapes made for GEMMs and reaches ~2.6 TB/s
of the H100's ~3.0 TB/s copy bandwidth on Llama-7B shapes (bench/gemv.py). Here every
program owns BLOCK_N full rows of W and walks K in wide, fully coalesced BLOCK_K slices,
so many independent loads are in flight per SM and only W comes from HBM.

One row of x: each K slice is multiplied and summed in fp32 right away (a few rows and a
wide slice per program measured best); 2..8 rows use tl.dot (IEEE for fp32, so fp32 models
stay exact to fp32 rounding). Under programmatic dependent launch (pdl.py) each program
loads its first K slice of W before waiting for the previous kernel, so the weight stream
starts while that kernel finishes; not the MLP's gate_up (`gated`), whose first wave would
load ~17 MB (tp=2) while the all-reduce + norm before it waits on its own few loads (2x H200,
`bench/tp_decode.py`: 13 us a step faster at tp=2 without that prefetch).

W is read with L2's evict-first policy: a decode step streams every weight through L2 once
(~13 GB at 7B, half of it a rank at tp=2), which under the default policy evicts what the next
kernels read again at once (the residual, activations, the KV cache's recent pages): ~65 us a
tp=2 step and ~50 a tp=1 step faster on 2x H200 (`bench/RESULTS.md`, eleventh session).

Fused epilogues (two launches fewer per decoder layer at decode): `gemv(..., gated=True)` is
the MLP's gate_up projection followed by SiLU(gate) * up, a program summing gate row j and up
row j in one K walk; `qkv_rope_store` is the QKV projection followed by rope_store (rotary on
q and k, k and v written to the paged cache), a program owning row pairs (d, d + D/2) of heads,
the two halves rotate-half RoPE mixes. Each row is summed exactly as the plain GEMV sums it
(same tiles, K slices and per-slice sum or tl.dot) and rounded to the output dtype before the
epilogue rounds as the unfused kernel does, so the results have the bits of the two launches.
"""
from __future__ import annotations

import torch

from llm_service.layers import pdl
from llm_service.layers.rotary import Rope

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE: bool = triton is not None
MAX_ROWS = 8  # beyond this a step is a GEMM: cuBLAS
# The models take the fused epilogues (gated, qkv_rope_store) up to this many rows: past one
# row their two W tiles a program spill registers (H100: 60 vs 45 us for qkv at 2 rows).
EPILOGUE_ROWS = 1


if AVAILABLE:
    from llm_service.distributed.ll_allreduce import send_args, send_partials
    from llm_service.layers.triton_attention import _cache_strides, _rotate
    from llm_service.layers.triton_fused import silu_mul

    @triton.jit
    def _dot(x, w, acc, IEEE: tl.constexpr):
        """acc + x W^T over one K slice; IEEE keeps fp32 models exact to fp32 rounding."""
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        return acc

    @triton.jit
    def _row_dot(x, w):
        """The one-row path's sum over one K slice: w [BLOCK_N, BLOCK_K] times x [BLOCK_K]."""
        return tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)

    @triton.jit
    def _w_slice(w_ptrs, u_ptrs, k0, mask, TWO: tl.constexpr):
        """The K slice at k0 of W's rows (and with TWO of the second rows; else the first again),
        evicted from L2 first (module docstring)."""
        w = tl.load(w_ptrs + k0, mask=mask, other=0.0, eviction_policy="evict_first")
        u = w
        if TWO:
            u = tl.load(u_ptrs + k0, mask=mask, other=0.0, eviction_policy="evict_first")
        return w, u

    @triton.jit
    def _project(
        x_ptr, w_ptr, b_ptr, rows, rows2, n_ok, M, K, stride_xm, stride_wn,
        HAS_BIAS: tl.constexpr, TWO: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """fp32 x W^T (+ b) [BLOCK_M, BLOCK_N] for W's rows `rows` (BLOCK_N of them, `n_ok` the real
        ones); with TWO also for the rows `rows2`, summed exactly as those are, so a fused epilogue
        starts from the plain GEMV's sums of both. EARLY: the first K slice of W streams in before
        the PDL wait (weights are never written by a kernel); else after it."""
        rk = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + rk[None, :]
        u_ptrs = w_ptr + rows2[:, None].to(tl.int64) * stride_wn + rk[None, :]
        first_ok = n_ok[:, None] & (rk < K)[None, :]
        if EARLY:
            w, u = _w_slice(w_ptrs, u_ptrs, 0, first_ok, TWO)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
        if not EARLY:
            w, u = _w_slice(w_ptrs, u_ptrs, 0, first_ok, TWO)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
            acc1 = _row_dot(x, w)
            up1 = acc1
            if TWO:
                up1 = _row_dot(x, u)
            for k0 in range(BLOCK_K, K, BLOCK_K):
                k_ok = k0 + rk < K
                w, u = _w_slice(w_ptrs, u_ptrs, k0, n_ok[:, None] & k_ok[None, :], TWO)
                x = tl.load(x_ptr + k0 + rk, mask=k_ok, other=0.0)
                acc1 += _row_dot(x, w)
                if TWO:
                    up1 += _row_dot(x, u)
            acc, up = acc1[None, :], up1[None, :]
        else:
            rm = tl.arange(0, BLOCK_M)
            x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk < K)[None, :], other=0.0)
            acc = _dot(x, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
            up = acc
            if TWO:
                up = _dot(x, u, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
            for k0 in range(BLOCK_K, K, BLOCK_K):
                k_ok = k0 + rk < K
                w, u = _w_slice(w_ptrs, u_ptrs, k0, n_ok[:, None] & k_ok[None, :], TWO)
                x = tl.load(x_ptrs + k0, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
                acc = _dot(x, w, acc, IEEE)
                if TWO:
                    up = _dot(x, u, up, IEEE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if TWO:
                up += tl.load(b_ptr + rows2, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        return acc, up

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, ptrs_ptr, epoch_ptr, rank,
        HAS_BIAS: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, SEND: tl.constexpr,
        WORLD: tl.constexpr, WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y = x W^T (+ b). GATED: W (and b) stack [gate; up], N rows each, and y = silu(gate) * up
        with gate and up first rounded to y's dtype, as silu_and_mul of the plain GEMV's output
        (and no W slice before the PDL wait: module docstring).
        SEND: y is a row-parallel layer's partial sums; its tile also goes to the other ranks as
        the next ll all-reduce's packets (ll_allreduce.send_partials; y contiguous)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc, up = _project(x_ptr, w_ptr, b_ptr, rn, rn + N, n_ok, M, K, stride_xm, stride_wn,
                           HAS_BIAS, GATED, IEEE, PDL, not GATED, BLOCK_M, BLOCK_N, BLOCK_K)
        DT = y_ptr.dtype.element_ty
        if GATED:
            acc = silu_mul(acc.to(DT).to(tl.float32), up.to(DT).to(tl.float32), DT)
        rm_out = tl.arange(0, BLOCK_M)
        y_ptrs = y_ptr + rm_out[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(DT), mask=(rm_out[:, None] < M) & n_ok[None, :])
        if SEND:
            send_partials(acc.to(DT), rm_out, rn, tl.program_id(0), M, N, ptrs_ptr, epoch_ptr, rank, WORLD,
                          WORLD_P2, MAX_WORDS, BLOCK_M, BLOCK_N, DT == tl.bfloat16)

    @triton.jit
    def _qkv_rope_kernel(
        x_ptr, w_ptr, b_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr, M, K,
        stride_xm, stride_wn, stride_qm, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        stride_rope,
        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """x W^T (+ b) for W = [q heads; k heads; v heads] with _rope_store_kernel as its epilogue:
        q rotated into q_out, k rotated and v stored at slot_mapping[m] unless that is -1. A program
        owns BLOCK_N row pairs (d, d + HALF) of the heads, the halves that rotate-half RoPE mixes;
        each row is summed as the plain GEMV sums it and rounded to its output dtype, then rotated
        with _rotate's roundings."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        p = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        p_ok = p < (HQ + 2 * HKV) * HALF
        head, d = p // HALF, p % HALF
        lo_row = head * 2 * HALF + d  # W's row for column d of the head; d + HALF is lo_row + HALF
        lo, hi = _project(x_ptr, w_ptr, b_ptr, lo_row, lo_row + HALF, p_ok, M, K, stride_xm, stride_wn,
                          HAS_BIAS, True, IEEE, PDL, True, BLOCK_M, BLOCK_N, BLOCK_K)
        OUT = q_ptr.dtype.element_ty  # the GEMV's output dtype (x's), which rope_store would read
        DT = kc_ptr.dtype.element_ty
        lo, hi = lo.to(OUT), hi.to(OUT)
        rm = tl.arange(0, BLOCK_M)[:, None]
        ok = (rm < M) & p_ok[None, :]
        d = d[None, :]
        rope = tl.load(pos_ptr + rm, mask=rm < M, other=0).to(tl.int64) * stride_rope + d
        c1 = tl.load(cos_ptr + rope, mask=ok, other=0.0).to(DT).to(tl.float32)
        c2 = tl.load(cos_ptr + rope + HALF, mask=ok, other=0.0).to(DT).to(tl.float32)
        s1 = tl.load(sin_ptr + rope, mask=ok, other=0.0).to(DT).to(tl.float32)
        s2 = tl.load(sin_ptr + rope + HALF, mask=ok, other=0.0).to(DT).to(tl.float32)
        r1, r2 = _rotate(lo, hi, c1, s1, c2, s2, DT)
        head = head[None, :]
        q_dst = q_ptr + rm * stride_qm + lo_row[None, :]  # q rows come first: row = h * D + d
        q_ok = ok & (head < HQ)
        tl.store(q_dst, r1, mask=q_ok)
        tl.store(q_dst + HALF, r2, mask=q_ok)
        slot = tl.load(slot_ptr + rm, mask=rm < M, other=-1).to(tl.int64)
        page, off = slot // PAGE, slot % PAGE
        ok = ok & (slot >= 0)
        hk = head - HQ
        k_dst = kc_ptr + page * stride_kcb + off * stride_kcs + hk * stride_kch + d
        k_ok = ok & (hk >= 0) & (hk < HKV)
        tl.store(k_dst, r1.to(DT), mask=k_ok)
        tl.store(k_dst + HALF, r2.to(DT), mask=k_ok)
        hv = hk - HKV
        v_dst = vc_ptr + page * stride_vcb + off * stride_vcs + hv * stride_vch + d
        v_ok = ok & (hv >= 0)
        tl.store(v_dst, lo.to(DT), mask=v_ok)
        tl.store(v_dst + HALF, hi.to(DT), mask=v_ok)


def one_row_tiles(K: int) -> tuple[int, int, int, int]:
    """(rows a program, K slice, warps, stages) for one row of x, from bench/gemv.py's sweep on an
    H200 over Llama-7B shapes at tp 1 and 2 (each within 2% of that shape's best, 4.0-4.4 TB/s):
    short K (o_proj at tp 2) wants more rows a program and small slices so every program still
    streams a few loads at once; a K that 4096 leaves a short tail of (down_proj at tp 2) 2048."""
    if K <= 2048:
        return 8, 1024, 8, 1
    if K > 4096:  # down_proj
        return 4, 2048 if K < 8192 and K % 4096 else 4096, 4, 1
    return 4, 4096, 8, 1


def _tiles(x: torch.Tensor, two: bool = False, block_n: int | None = None, block_k: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, launch options) for x [M, K]; the knobs, where given, override.
    Every variant of the GEMV takes its tiles from here, so a row is summed alike in all of them.
    two: a program streams two W tiles (the fused variants)."""
    M, K = x.shape
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {M}")
    if M == 1:
        tiles = one_row_tiles(K)
        block_m, block_n, block_k = 1, block_n or tiles[0], block_k or tiles[1]
        num_warps, num_stages = tiles[2:] if num_warps is None else (num_warps, num_stages)
    else:  # from bench/gemv.py's sweep on an H100 at 2 and 8 rows (Llama-7B shapes): 3% under cuBLAS
        block_m, block_n, block_k = 16, block_n or 32, block_k or 512
        num_warps, num_stages = (4, 3) if num_warps is None else (num_warps, num_stages)
    if x.element_size() > 2 and block_m > 1:  # fp32 tiles of 1024 would overflow shared memory
        block_k = min(block_k, 128)
    block_k = min(block_k, triton.next_power_of_2(K))
    if two and block_m > 1:  # one pipeline stage fewer fits shared memory (2 x 32x1024 bf16: 160 KB)
        num_stages = min(num_stages, 2)
    # fp32 (the exact test models) launches without contracted multiply-adds, so the plain GEMV
    # sums as the RoPE-fused one, which never contracts (qkv_rope_store). 16-bit types keep them
    # here: a product of two 16-bit floats is exact in fp32, so a contracted sum has the same bits.
    return block_m, block_n, block_k, dict(
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=x.dtype != torch.float32,
        IEEE=x.dtype == torch.float32, **pdl.launch(x.device))


def _rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight contiguous along K")
    return x if x.stride(1) == 1 else x.contiguous()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gated: bool = False,
         send=None, out: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with M <= MAX_ROWS. gated: weight (and bias) stack
    [gate; up] and the result is silu(gate) * up [M, N / 2], the bits of
    triton_fused.silu_and_mul(gemv(x, weight, bias)) in one launch. send: an
    ll_allreduce.LLAllReduce whose next call sums the result over the ranks; the kernel sends
    this rank's packets itself, as its programs finish. out: a contiguous [M, N] tensor of x's
    dtype to write the result into. The keyword knobs exist for bench/gemv.py's sweeps."""
    M, K = x.shape
    x = _rows(x, weight)
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    block_m, block_n, block_k, launch = _tiles(x, gated, block_n, block_k, num_warps, num_stages)
    if out is None:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gemv: out must be a contiguous [{M}, {N}] {x.dtype} tensor")
    else:
        y = out
    if send is not None and x.dtype == torch.bfloat16 and block_n % 2:
        raise ValueError("gemv: sending bf16 partial sums needs an even block_n")
    (ptrs, epoch, rank), consts = send_args(send, y)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        ptrs, epoch, rank, HAS_BIAS=bias is not None, GATED=gated, SEND=send is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, **consts, **launch,
    )
    return y


def qkv_rope_store(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rope: Rope,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """triton_attention.rope_store of (q, k, v) = gemv(x, weight, bias) split into heads, in one
    launch and with its bits: returns q [M, Hq, D] rotated, stores k (rotated) and v at
    slot_mapping (-1 skips). weight: [q heads; k heads; v heads] rows, as QKVParallelLinear's;
    rope: rotate-half over the whole head_dim (rotary.py's tables), what rope_store applies.
    Not for int8 caches (quant_policy=8): a head's scale needs its max over head_dim, whose
    rows several programs own; those take gemv + rope_store."""
    M, K = x.shape
    x = _rows(x, weight)
    D = k_cache.shape[-1]
    if k_cache.dtype == torch.int8:
        raise ValueError("qkv_rope_store stores into 16/32-bit caches; an int8 cache takes gemv + rope_store")
    if D % 2 or weight.shape[0] != (num_heads + 2 * num_kv_heads) * D or rope.cos.shape[-1] != D:
        raise ValueError("qkv_rope_store: weight rows, cache and rope tables disagree on the heads")
    block_m, block_n, block_k, launch = _tiles(x, two=True)
    # rope_store's roundings need uncontracted products in every dtype: on sm_90 the compiler
    # otherwise turns the epilogue's bf16 multiply + add into one bf16 FMA (measured on an H100:
    # 1-ulp differences in a fifth of q). The GEMV's sums keep their bits (exact 16-bit products).
    launch["enable_fp_fusion"] = False
    q = torch.empty((M, num_heads, D), dtype=x.dtype, device=x.device)
    pairs = (num_heads + 2 * num_kv_heads) * D // 2
    _qkv_rope_kernel[(triton.cdiv(pairs, block_n),)](
        x, weight, bias if bias is not None else weight, q, k_cache, v_cache, slot_mapping, rope.positions,
        rope.cos, rope.sin, M, K, x.stride(0), weight.stride(0), q.stride(0), *_cache_strides(k_cache, v_cache),
        rope.cos.stride(0),
        HQ=num_heads, HKV=num_kv_heads, HALF=D // 2, PAGE=k_cache.shape[1], HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )
    return q
