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

    @triton.jit
    def _dot(x, w, acc, IEEE: tl.constexpr):
        """acc + x W^T over one K slice; IEEE keeps fp32 models exact to fp32 rounding."""
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        # the first K slice of W streams in before the wait: weights are never written by a kernel
        w = tl.load(w_ptrs, mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
        if BLOCK_M == 1:
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
            acc1 = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            for k0 in range(BLOCK_K, K, BLOCK_K):
                k_ok = k0 + rk < K
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_ptr + k0 + rk, mask=k_ok, other=0.0)
                acc1 += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            acc = acc1[None, :]
        else:
            rm = tl.arange(0, BLOCK_M)
            x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk < K)[None, :], other=0.0)
            acc = _dot(x, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
            for k0 in range(BLOCK_K, K, BLOCK_K):
                k_ok = k0 + rk < K
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_ptrs + k0, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
                acc = _dot(x, w, acc, IEEE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        rm_out = tl.arange(0, BLOCK_M)
        y_ptrs = y_ptr + rm_out[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm_out[:, None] < M) & n_ok[None, :])

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


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with M <= MAX_ROWS; the keyword knobs exist
    for bench/gemv.py's sweeps."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {M}")
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight contiguous along K")
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
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
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(x.device),
    )
    return y
