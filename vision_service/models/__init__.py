"""Vision families, one file each; `load_vision_model` picks one by architecture."""
from __future__ import annotations

import torch

from vision_service.checkpoint import Checkpoint
from vision_service.models.base import PreparedImage, VisionModel

__all__ = ["PreparedImage", "VisionModel", "load_vision_model"]


def load_vision_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> VisionModel:
    """The vision part of checkpoint `ckpt`, loaded on `device` in `dtype`."""
    archs = ckpt.config.get("architectures") or []
    if "LlavaForConditionalGeneration" in archs or ckpt.config.get("model_type") == "llava":
        from vision_service.models.llava import LlavaVision

        return LlavaVision(ckpt, device, dtype)
    raise ValueError(f"{ckpt.path}: no vision model for architectures {archs} (model_type {ckpt.config.get('model_type')!r})")
