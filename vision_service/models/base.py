"""What every vision family provides to the engine, and small shared pieces.

A family turns one decoded image into a `PreparedImage` (CPU, any thread) and a
batch of them into embeddings (the engine's worker thread, on the device). The
engine batches by `tiles`, so families that split images (anyres, dynamic tiling)
fit the same batcher as LLaVA-1.5's one tile per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from vision_service.types import ImageEmbedding


@dataclass
class PreparedImage:
    """An image ready for the vision tower: float32 pixel values on CPU."""

    pixel_values: torch.Tensor  # [tiles, channels, height, width]
    grid_thw: tuple[int, int, int] | None = None

    @property
    def tiles(self) -> int:
        return self.pixel_values.shape[0]


class VisionModel(Protocol):
    architecture: str
    hidden_size: int  # embedding width (= the language model's hidden size)
    device: torch.device
    dtype: torch.dtype

    def prepare(self, image: Image.Image, options: Mapping[str, str]) -> PreparedImage:
        """Preprocess one image on CPU; ValueError if it cannot be processed."""
        ...

    def encode(self, batch: list[PreparedImage]) -> list[ImageEmbedding]:
        """One forward over the batch; embeddings stay on the model's device."""
        ...


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a HF config names (`hidden_act`, `projector_hidden_act`)."""
    acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu": F.gelu,
        "quick_gelu": quick_gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }
    if name not in acts:
        raise ValueError(f"activation {name!r} is not supported (known: {sorted(acts)})")
    return acts[name]
