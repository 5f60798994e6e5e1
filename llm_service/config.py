"""LLM tier settings, with LMDeploy's engine config names and defaults."""
from __future__ import annotations

from dataclasses import dataclass

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_QUANT_POLICIES = (0, 8)


@dataclass
class EngineConfig:
    """What the LLM engine reads. session_len None: the model's max_position_embeddings.
    max_batch_size None: 256 on CUDA, 32 on CPU. cache_max_entry_count: fraction of free
    memory after weights for the KV cache (on CPU: of a budget sized by session_len ×
    max_batch_size), or, when > 1, a number of blocks. quant_policy: LMDeploy's KV-cache
    format, 0 the model's dtype, 8 int8 with a scale per token and kv head (half the bytes,
    about 1.9x the blocks; outputs no longer token-identical to transformers)."""

    dtype: str = "auto"
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    block_size: int = 64
    enable_prefix_caching: bool = False
    max_prefill_token_num: int = 8192
    device: str | None = None  # None: cuda if available, else cpu
    embedding_cache_entries: int = 256
    quant_policy: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be an int >= 1, got {self.tp!r}")
        if self.session_len is not None and self.session_len < 1:
            raise ValueError(f"session_len must be >= 1, got {self.session_len!r}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size!r}")
        if not self.cache_max_entry_count > 0:
            raise ValueError(f"cache_max_entry_count must be > 0, got {self.cache_max_entry_count!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two, got {self.block_size!r}")
        if self.max_prefill_token_num < 1:
            raise ValueError(f"max_prefill_token_num must be >= 1, got {self.max_prefill_token_num!r}")
        if self.quant_policy not in _QUANT_POLICIES:
            raise ValueError(f"quant_policy must be 0 (KV cache in the model's dtype) or 8 (int8 KV cache), "
                             f"got {self.quant_policy!r} (4, LMDeploy's int4 KV cache, is not supported)")


@dataclass
class PytorchEngineConfig(EngineConfig):
    """LMDeploy's PytorchEngineConfig names; the engine is Prism's own either way."""

    eager_mode: bool = False
    device_type: str = "cuda"


@dataclass
class TurbomindEngineConfig(EngineConfig):
    """LMDeploy's TurbomindEngineConfig names: cache_block_seq_len is the block size."""

    cache_block_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.cache_block_seq_len is not None:
            self.block_size = self.cache_block_seq_len
        super().__post_init__()
