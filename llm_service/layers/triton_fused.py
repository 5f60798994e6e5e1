"""Fused elementwise kernels of a decoder layer: residual add + RMSNorm, SiLU * up, and the
vocabulary shard's embedding lookup.

In torch each of these is 3 to 8 small kernels; at decode batch sizes a launch costs more
than the work, and a 7B step has 32 layers of them. Each kernel here is one launch and
rounds where transformers rounds (the residual sum, the normalised row, the SiLU output
are cast to the model dtype before the next multiply), so bf16 results match transformers
to fp32 summation order. The module imports without triton; `AVAILABLE` says whether
the kernels can run. Both launch with programmatic dependent launch where available (pdl.py).
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


if AVAILABLE:
    from llm_service.distributed.ll_allreduce import send_args, send_partials

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_res, stride_out,
        HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # a weight: safe before the wait
        if PDL:
            tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:  # residual <- x + residual, rounded to the model dtype, then normalised
            r = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_res + cols, x, mask=ok)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        y = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def silu_mul(gate, up, DT: tl.constexpr):
        """silu(gate) * up in DT from fp32 values already rounded to DT, the SiLU rounded to DT
        before the multiply; shared with the gated GEMV (triton_gemv.py) so both round alike."""
        act = (gate / (1.0 + tl.exp(-gate))).to(DT).to(tl.float32)
        return (act * up).to(DT)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_out, PDL: tl.constexpr, BLOCK: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < I
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + I + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _embedding_kernel(ids_ptr, w_ptr, out_ptr, start, rows, T, H, stride_w, stride_out, ptrs_ptr, epoch_ptr,
                          rank, SEND: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr,
                          MAX_WORDS: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
        """SEND: the rows are partial sums over the ranks' shards, also sent as the next ll
        all-reduce's packets (ll_allreduce.send_partials; out contiguous), as a row-parallel GEMV sends."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        local = tl.load(ids_ptr + t) - start
        mine = (local >= 0) & (local < rows)
        x = tl.load(w_ptr + tl.where(mine, local, 0) * stride_w + cols, mask=ok & mine, other=0.0)
        tl.store(out_ptr + t * stride_out + cols, x, mask=ok)
        if SEND:
            send_partials(x[None, :], t + tl.arange(0, 1), cols, tl.program_id(1), T, H, ptrs_ptr, epoch_ptr, rank,
                          WORLD, WORLD_P2, MAX_WORDS, 1, BLOCK, x.dtype == tl.bfloat16)


def embedding(ids: torch.Tensor, weight: torch.Tensor, start: int = 0, send=None) -> torch.Tensor:
    """Rows of `weight` [rows, H] for ids [T] offset by `start`, zero for ids outside start..start+rows
    (a vocabulary shard): one launch where F.embedding with the shard's mask took ~7. send: an
    ll_allreduce.LLAllReduce whose next call sums the rows over the ranks (as triton_gemv.gemv's)."""
    T, (rows, H) = ids.shape[0], weight.shape
    out = torch.empty((T, H), dtype=weight.dtype, device=weight.device)
    if T == 0:
        return out
    if weight.stride(1) != 1:
        raise ValueError("embedding needs rows contiguous along the hidden dimension")
    block = min(1024, triton.next_power_of_2(H))
    (ptrs, epoch, rank), consts = send_args(send, out)
    _embedding_kernel[(T, triton.cdiv(H, block))](
        ids, weight, out, start, rows, T, H, weight.stride(0), out.stride(0), ptrs, epoch, rank,
        SEND=send is not None, BLOCK=block, num_warps=4, **consts, **pdl.launch(weight.device))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [T, H]; with `residual`, first residual += x (in place) and normalise that."""
    T, H = x.shape
    out = torch.empty_like(x)
    if T == 0:
        return out
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm needs rows contiguous along the hidden dimension")
    res = residual if residual is not None else x
    _rms_norm_kernel[(T,)](
        x, res, weight, out, H, eps, x.stride(0), res.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(H), num_warps=4 if H <= 4096 else 8,
        **pdl.launch(x.device),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [T, 2I]; returns [T, I]."""
    T, two_i = x.shape
    inter = two_i // 2
    out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    if x.stride(1) != 1:
        raise ValueError("silu_and_mul needs rows contiguous along the feature dimension")
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](x, out, inter, x.stride(0), out.stride(0), BLOCK=block,
                                                         **pdl.launch(x.device))
    return out
