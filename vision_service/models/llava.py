"""LLaVA-1.5 (llava-hf layout): CLIP vision transformer + multi-modal projector.

Only the layers up to the deepest `vision_feature_layer` are built and loaded:
LLaVA reads the second-to-last layer by default, so the last CLIP layer and the
post-layernorm never run. Sizes come from the weight shapes, the rest from
config.json with transformers' defaults, so hub configs that omit fields work.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vision_service.checkpoint import Checkpoint
from vision_service.graphs import GraphedForward, eager_requested
from vision_service.models.base import PreparedImage, activation, lookup_pixels
from vision_service.preprocess import ImageProcessorConfig, lookup, pixel_table, to_pixels
from vision_service.staging import PinnedStaging
from vision_service.types import ImageEmbedding


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"CLIP hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional; scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, intermediate)
        self.fc2 = nn.Linear(intermediate, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, dim: int, channels: int, patch: int, positions: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(positions, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer, returning the hidden states LLaVA selects.
    Hidden state 0 is the pre-layernormed embedding, state i the output of layer i."""

    def __init__(self, dim, channels, patch, positions, heads, intermediate, act, eps, layers: int):
        super().__init__()
        self.embeddings = CLIPEmbeddings(dim, channels, patch, positions)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(CLIPEncoderLayer(dim, heads, intermediate, act, eps) for _ in range(layers))

    def forward(self, pixel_values: torch.Tensor, select: list[int]) -> list[torch.Tensor]:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if i in select:
                states[i] = x
        return [states[i] for i in select]


class LlavaProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVisionModule(nn.Module):
    """pixel_values [batch, 3, H, W] -> embeddings [batch, rows, text hidden]."""

    def __init__(self, tower: CLIPVisionTower, projector: LlavaProjector, select: list[int], keep_cls: bool):
        super().__init__()
        self.vision_tower = tower
        self.multi_modal_projector = projector
        self.select = select
        self.keep_cls = keep_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        states = self.vision_tower(pixel_values.to(dtype), self.select)
        if not self.keep_cls:
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))


def _feature_layers(config: dict, num_layers: int) -> list[int]:
    """`vision_feature_layer` (int or list, negative from the end) as hidden-state indices."""
    spec = config.get("vision_feature_layer", -2)
    layers = [spec] if isinstance(spec, int) else list(spec)
    out = []
    for layer in layers:
        idx = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= idx <= num_layers:
            raise ValueError(f"vision_feature_layer {layer} is out of range for {num_layers} CLIP layers")
        out.append(idx)
    return out


class LlavaVision:
    """The LLaVA-1.5 vision family: preprocessing + tower + projector on one device."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        config = ckpt.config
        vcfg = config.get("vision_config", {})
        self.architecture = (config.get("architectures") or ["LlavaForConditionalGeneration"])[0]
        self.device, self.dtype = device, dtype
        self.processor = ImageProcessorConfig.from_pretrained(ckpt.path)
        self.table = pixel_table(self.processor)
        # Off the CPU, images travel as uint8 and rescale + normalize run there, batched.
        self.lookup_on_device = device.type != "cpu"
        self._staging = PinnedStaging()  # the batch's uint8 pixels on their way to the device
        self.device_table = torch.from_numpy(self.table).to(device, dtype)

        keys = ckpt.keys()
        layer_ids = {int(k.split(".")[3]) for k in keys if k.startswith("vision_tower.encoder.layers.")}
        num_layers = len(layer_ids)
        if num_layers == 0 or layer_ids != set(range(num_layers)):
            raise ValueError(f"{ckpt.path}: no complete CLIP vision tower found in the checkpoint")
        select = _feature_layers(config, num_layers)
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
        run = max(select)

        prefixes = ["vision_tower.embeddings.", "vision_tower.pre_layrnorm.", "multi_modal_projector."]
        prefixes += [f"vision_tower.encoder.layers.{i}." for i in range(run)]
        weights = {  # old checkpoints also store CLIP's position_ids buffer, which we do not need
            k.replace("vision_tower.encoder.", "vision_tower."): v
            for k, v in ckpt.load(prefixes).items()
            if not k.endswith("position_ids")
        }
        patch_w = weights["vision_tower.embeddings.patch_embedding.weight"]
        dim, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
        positions = weights["vision_tower.embeddings.position_embedding.weight"].shape[0]
        grid = math.isqrt(positions - 1)
        if grid * grid != positions - 1:
            raise ValueError(f"{ckpt.path}: {positions} CLIP positions are not 1 + a square grid")
        self.image_size = grid * patch
        self.rows = grid * grid + (strategy == "full")
        proj_w = weights["multi_modal_projector.linear_1.weight"]
        self.hidden_size = proj_w.shape[0]
        intermediate = (
            weights["vision_tower.layers.0.mlp.fc1.weight"].shape[0] if run else vcfg.get("intermediate_size", 3072)
        )

        with torch.device("meta"):
            tower = CLIPVisionTower(
                dim, channels, patch, positions,
                heads=vcfg.get("num_attention_heads", 12),
                intermediate=intermediate,
                act=vcfg.get("hidden_act", "quick_gelu"),
                eps=vcfg.get("layer_norm_eps", 1e-5),
                layers=run,
            )
            projector = LlavaProjector(
                proj_w.shape[1], self.hidden_size, config.get("projector_hidden_act", "gelu"),
                bias="multi_modal_projector.linear_1.bias" in weights,
            )
            module = LlavaVisionModule(tower, projector, select, keep_cls=strategy == "full")
        if proj_w.shape[1] != dim * len(select):
            raise ValueError(f"{ckpt.path}: projector input {proj_w.shape[1]} != {len(select)} x CLIP hidden {dim}")
        module.load_state_dict(weights, strict=True, assign=True)
        self.module = module.to(device=device, dtype=dtype).eval()
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.module  # graphed by reserve()
        self.channels = channels

    def prepare(self, image: Image.Image, options: Mapping[str, str]) -> PreparedImage:
        """LLaVA-1.5 takes no per-image options; one tile per image."""
        pixels = to_pixels(image, self.processor)
        expected = (self.image_size, self.image_size, 3)
        if pixels.shape != expected:
            raise ValueError(f"preprocessed image is {pixels.shape}, the vision tower needs {expected}")
        if not self.lookup_on_device:
            return PreparedImage(torch.from_numpy(lookup(pixels, self.table)).unsqueeze(0))
        return PreparedImage(torch.from_numpy(pixels.copy()).unsqueeze(0))  # pageable: encode stages the batch

    def reserve(self, tiles: int) -> None:
        """Also captures the forward's CUDA graphs for batches up to `tiles` (vision_service/graphs.py)."""
        if self.lookup_on_device:
            self._staging.reserve(tiles * self.image_size * self.image_size * 3, torch.uint8)
        if self.device.type == "cuda" and not eager_requested():
            example = lookup_pixels(torch.zeros((1, self.image_size, self.image_size, self.channels),
                                                dtype=torch.uint8, device=self.device), self.device_table)
            self.forward = GraphedForward(self.module, example, tiles)

    @torch.inference_mode()
    def encode(self, batch: list[PreparedImage]) -> list[ImageEmbedding]:
        if self.lookup_on_device:
            pixels = self._staging.to_device([p.pixel_values for p in batch], self.device)
            pixel_values = lookup_pixels(pixels, self.device_table)
        else:
            pixel_values = torch.cat([p.pixel_values for p in batch])
        out = self.forward(pixel_values)
        return [ImageEmbedding(e.flatten(0, 1)) for e in out.split([p.tiles for p in batch])]
