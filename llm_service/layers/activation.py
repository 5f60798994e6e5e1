"""SiLU-gated MLP activation over a fused [gate | up] projection (one Triton launch on CUDA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.layers import triton_fused


class SiluAndMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fused = False

    def use_kernels(self) -> bool:
        self.fused = triton_fused.AVAILABLE
        return self.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return triton_fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
