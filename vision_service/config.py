"""Vision tier settings (LMDeploy's VisionConfig, plus where and how long to batch)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VisionConfig:
    """max_batch_size: images (or tiles) per vision forward, across all callers.
    batch_window_ms: how long the batcher waits for more images once one is queued.
    preprocess_threads: threads decoding and preprocessing images; 0 is one per usable core, at most
    DEFAULT_PREP_THREADS (vision_service/engine.py).
    thread_safe: accepted for LMDeploy compatibility; it has no effect there either."""

    max_batch_size: int = 1
    thread_safe: bool = False
    batch_window_ms: float = 2.0
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str = "auto"
    preprocess_threads: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"VisionConfig.max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.preprocess_threads, int) or self.preprocess_threads < 0:
            raise ValueError(f"VisionConfig.preprocess_threads must be an int >= 0, got {self.preprocess_threads!r}")
        if self.batch_window_ms < 0:
            raise ValueError(f"VisionConfig.batch_window_ms must be >= 0, got {self.batch_window_ms!r}")
