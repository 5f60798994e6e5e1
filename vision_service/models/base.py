"""What every vision family provides to the engine, and small shared pieces.

A family turns one decoded image into a `PreparedImage` (CPU, any thread) and a
batch of them into embeddings (the engine's worker thread, on the device). The
engine batches by `tiles`, so families that split images (anyres, dynamic tiling)
fit the same batcher as LLaVA-1.5's one tile per image.

On an accelerator, families hand over uint8 pixels and finish preprocessing there
with `lookup_pixels`: a quarter of the bytes to copy, and one gather for the batch
instead of float work per image on the host.
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
    """An image ready for its family's `encode`: pixels on CPU, one row per tile."""

    pixel_values: torch.Tensor  # float32 [tiles, channels, height, width], or uint8 [tiles, height, width, channels]
    grid_thw: tuple[int, int, int] | None = None

    @property
    def tiles(self) -> int:
        return self.pixel_values.shape[0]


class VisionModel(Protocol):
    architecture: str
    hidden_size: int  # embedding width (= the language model's hidden size)
    rows: int  # embedding rows per tile
    device: torch.device
    dtype: torch.dtype

    def prepare(self, image: Image.Image, options: Mapping[str, str]) -> PreparedImage:
        """Preprocess one image on CPU; ValueError if it cannot be processed."""
        ...

    def encode(self, batch: list[PreparedImage]) -> list[ImageEmbedding]:
        """One forward over the batch; embeddings stay on the model's device."""
        ...

    def reserve(self, tiles: int) -> None:
        """Allocate, before serving, the pinned host memory batches of up to `tiles` tiles need."""
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


def lookup_pixels(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [batch, height, width, channels] -> table[channel, value] as [batch, channels,
    height, width], on the pixels' device and in the table's dtype. Exact: nothing is computed."""
    channels = table.shape[0]
    offsets = torch.arange(0, 256 * channels, 256, device=pixels.device).view(1, channels, 1, 1)
    return torch.take(table, pixels.permute(0, 3, 1, 2).long() + offsets)
