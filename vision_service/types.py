"""The LLM → vision seam: `encode(images) -> embeddings`, local engine or gRPC client."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from protos import common_pb2


@dataclass
class ImageEmbedding:
    """One image's embedding: `rows` positions of the language model's hidden size."""

    embedding: torch.Tensor  # [rows, hidden], on CPU or the vision device
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL M-RoPE; None for other families

    @property
    def rows(self) -> int:
        return self.embedding.shape[0]


class VisionEncoder(Protocol):
    async def encode(self, images: Sequence[common_pb2.ImageInput]) -> list[ImageEmbedding]:
        """Embeddings in the order of `images`. Raises ValueError for an image that
        cannot be decoded or processed (the message says which and why)."""
        ...
