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
starts while that kernel finishes.

Fused epilogue (one launch fewer per decoder layer at decode): `gemv(..., gated=True)` is the
MLP's gate_up projection followed by SiLU(gate) * up; a program sums gate row j and up row j
in one K walk. Each row is summed exactly as the plain GEMV sums it (same tiles, K slices and
per-slice sum or tl.dot) and rounded to the output dtype before the epilogue rounds as the
unfused kernel does, so the result has the bits of the two launches.
"""
from __future__ import annotations

import torch

from llm_service.layers import pdl

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE: bool = triton is not None
MAX_ROWS = 8  # beyond this a step is a GEMM: cuBLAS


if AVAILABLE:
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
    def _walk(
        x_ptr, w_ptrs, u_ptrs, n_ok, M, K, stride_xm,
        TWO: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """fp32 x W^T [BLOCK_M, BLOCK_N] over all of K for the rows of W at `w_ptrs` (pointers to
        their first K slice); with TWO also for the rows at `u_ptrs`, summed exactly as those are,
        so a fused epilogue starts from the plain GEMV's sums of both. The first K slice of W
        streams in before the PDL wait: weights are never written by a kernel."""
        rk = tl.arange(0, BLOCK_K)
        w_ok = n_ok[:, None] & (rk < K)[None, :]
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        u = w
        if TWO:
            u = tl.load(u_ptrs, mask=w_ok, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
        if BLOCK_M == 1:
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
            acc1 = _row_dot(x, w)
            up1 = acc1
            if TWO:
                up1 = _row_dot(x, u)
            for k0 in range(BLOCK_K, K, BLOCK_K):
                k_ok = k0 + rk < K
                w_ok = n_ok[:, None] & k_ok[None, :]
                w = tl.load(w_ptrs + k0, mask=w_ok, other=0.0)
                if TWO:
                    u = tl.load(u_ptrs + k0, mask=w_ok, other=0.0)
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
                w_ok = n_ok[:, None] & k_ok[None, :]
                w = tl.load(w_ptrs + k0, mask=w_ok, other=0.0)
                if TWO:
                    u = tl.load(u_ptrs + k0, mask=w_ok, other=0.0)
                x = tl.load(x_ptrs + k0, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
                acc = _dot(x, w, acc, IEEE)
                if TWO:
                    up = _dot(x, u, up, IEEE)
        return acc, up

    @triton.jit
    def _bias(acc, b_ptr, rows, ok):
        return acc + tl.load(b_ptr + rows, mask=ok, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y = x W^T (+ b). GATED: W (and b) stack [gate; up], N rows each, and y = silu(gate) * up
        with gate and up first rounded to y's dtype, as silu_and_mul of the plain GEMV's output."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)[None, :]
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk
        acc, up = _walk(x_ptr, w_ptrs, w_ptr + (rn + N)[:, None].to(tl.int64) * stride_wn + rk, n_ok,
                        M, K, stride_xm, GATED, IEEE, PDL, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc = _bias(acc, b_ptr, rn, n_ok)
            if GATED:
                up = _bias(up, b_ptr, rn + N, n_ok)
        DT = y_ptr.dtype.element_ty
        if GATED:
            acc = silu_mul(acc.to(DT).to(tl.float32), up.to(DT).to(tl.float32), DT)
        rm_out = tl.arange(0, BLOCK_M)
        y_ptrs = y_ptr + rm_out[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(DT), mask=(rm_out[:, None] < M) & n_ok[None, :])


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


def _tiles(x: torch.Tensor, K: int, block_n: int | None, block_k: int | None, num_warps: int | None,
           num_stages: int | None) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, launch options) for x [M, K]; the knobs, where given, override.
    Every variant of the GEMV takes its tiles from here, so a row is summed alike in all of them."""
    M = x.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {M}")
    if M == 1:
        tiles = one_row_tiles(K)
        block_m, block_n, block_k = 1, block_n or tiles[0], block_k or tiles[1]
        num_warps, num_stages = tiles[2:] if num_warps is None else (num_warps, num_stages)
    else:  # tiles from bench/gemv.py's sweep on an H100 (Llama-7B shapes)
        block_m, block_n, block_k = 16, block_n or 32, block_k or 1024
        num_warps, num_stages = (4, 3) if num_warps is None else (num_warps, num_stages)
    if x.element_size() > 2 and block_m > 1:  # fp32 tiles of 1024 would overflow shared memory
        block_k = min(block_k, 128)
    block_k = min(block_k, triton.next_power_of_2(K))
    return block_m, block_n, block_k, dict(num_warps=num_warps, num_stages=num_stages,
                                           IEEE=x.dtype == torch.float32, **pdl.launch(x.device))


def _rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight contiguous along K")
    return x if x.stride(1) == 1 else x.contiguous()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gated: bool = False,
         block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with M <= MAX_ROWS. gated: weight (and bias) stack
    [gate; up] and the result is silu(gate) * up [M, N / 2], the bits of
    triton_fused.silu_and_mul(gemv(x, weight, bias)) in one launch. The keyword knobs exist for
    bench/gemv.py's sweeps."""
    M, K = x.shape
    x = _rows(x, weight)
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    block_m, block_n, block_k, launch = _tiles(x, K, block_n, block_k, num_warps, num_stages)
    if gated and block_m > 1:  # two W tiles a program: one fewer pipeline stage fits shared memory
        launch["num_stages"] = min(launch["num_stages"], 2)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch,
    )
    return y
