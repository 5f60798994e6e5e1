"""Linear layers that shard across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, checkpoint_tensor[, shard_id])` that copies
in only this rank's slice (the tensor may be a lazy models.loader.CheckpointTensor: only
`narrow`, `[...]`, `shape` and `dim` are used), so a rank never reads more than its
shard. Column-parallel layers split the output features (no communication); row-parallel
layers split the input features and all-reduce their partial sums.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.distributed import all_reduce, partial_sender, tp_rank, tp_size
from llm_service.layers import triton_gemv


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_gemv: bool) -> torch.Tensor:
    """x W^T + b: the Triton GEMV for decode-sized x when enabled, else cuBLAS / CPU."""
    if use_gemv and x.shape[0] <= triton_gemv.MAX_ROWS:
        return triton_gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.use_gemv = False

    def use_kernels(self) -> bool:
        """Decode-sized inputs (<= triton_gemv.MAX_ROWS rows) take the Triton GEMV."""
        self.use_gemv = triton_gemv.AVAILABLE
        return self.use_gemv

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded[...])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias, self.use_gemv)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (output features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, _divide(out_features, tp_size(), "output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * shard, shard))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate+up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        shard = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, shard).copy_(loaded.narrow(0, self.tp_rank * shard, shard))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads (not features) are split so GQA stays intact.
    With fewer KV heads than ranks each rank holds one KV head, replicated on the
    tp_size // num_kv_heads ranks whose query heads read it."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "key/value heads")
            self.kv_head = tp_rank() * self.num_kv_heads
        else:
            if tp % num_kv_heads:
                raise ValueError(f"the tensor-parallel size ({tp}) is not a multiple of the "
                                 f"key/value heads ({num_kv_heads})")
            self.num_kv_heads = 1
            self.kv_head = tp_rank() * num_kv_heads // tp
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        offset, shard = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        start = self.tp_rank * q if shard_id == "q" else self.kv_head * self.head_dim
        param.data.narrow(0, offset, shard).copy_(loaded.narrow(0, start, shard))


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (input features) split; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(_divide(in_features, tp_size(), "input features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(loaded[...])
            return
        shard = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """reduce=False returns this rank's partial sums, for a next layer that sums them
        (a norm with reduce=True); only without a bias, which is added after the sum."""
        if not reduce:
            if self.bias is not None:
                raise ValueError("a row-parallel layer with a bias must reduce its own output")
            sender = partial_sender(x.shape[0], self.weight.shape[0], x.dtype)
            if sender is not None and self.use_gemv and x.shape[0] <= triton_gemv.MAX_ROWS:
                return triton_gemv.gemv(x, self.weight, send=sender)  # pending: the norm only receives
            return project(x, self.weight, None, self.use_gemv)
        y = project(x, self.weight, None, self.use_gemv)
        all_reduce(y)
        return y if self.bias is None else y + self.bias
