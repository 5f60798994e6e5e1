"""The Triton attention module imports on CPU-only machines without triton."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from llm_service.layers import triton_attention


def test_available_flag_matches_triton():
    assert triton_attention.AVAILABLE is (importlib.util.find_spec("triton") is not None)


@pytest.mark.skipif(triton_attention.AVAILABLE, reason="only meaningful without triton")
def test_calls_without_triton_raise_a_clear_error():
    q = torch.zeros(1, 2, 16)
    cache = torch.zeros(1, 16, 2, 16)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        triton_attention.paged_attention(q, cache, cache, one.view(1, 1), torch.tensor([0, 1], dtype=torch.int32),
                                         one, 0.25)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        triton_attention.store_kvcache(q, q, cache, cache, torch.zeros(1, dtype=torch.int64))
