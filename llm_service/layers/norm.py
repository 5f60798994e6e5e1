"""RMSNorm, computed in fp32 like transformers' LlamaRMSNorm so logits match bit for bit.

With a residual it is the pre-norm of the next sublayer: residual + x first (rounded to
the model dtype, as transformers' `residual + hidden_states`), then the norm of that.
On CUDA both are one Triton launch (`use_kernels`) that updates the residual in place.
Under tensor parallelism the norm can also take a row-parallel layer's partial sums
(`reduce=True`) and all-reduce them first: with the barrier-free all-reduce the three
steps are one kernel (distributed.all_reduce_rms_norm).
"""
from __future__ import annotations

import torch
from torch import nn

from llm_service.distributed import all_reduce, all_reduce_rms_norm
from llm_service.layers import triton_fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.fused = False

    def use_kernels(self) -> bool:
        self.fused = triton_fused.AVAILABLE
        return self.fused

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`: (norm(residual + x), residual + x). reduce: x holds this
        rank's partial sums (of a row-parallel layer, or the vocab shard's embeddings), to be
        summed over the ranks first (in place)."""
        if reduce:
            if self.fused:
                out = all_reduce_rms_norm(x, residual, self.weight, self.eps)
                if out is not None:
                    return out if residual is None else (out, residual)
            all_reduce(x)
        if self.fused:
            out = triton_fused.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
