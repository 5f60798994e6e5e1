"""Read a Hugging Face checkpoint folder: its config and the safetensors we need.

The vision tier only wants the vision tower and projector, so we open the
safetensors lazily and materialise just the tensors under the requested prefixes.
LLaVA checkpoints exist in several key layouts (hub files written by transformers
v4, files written by v5, v5's in-memory names); `canonical_name` maps them all to
one layout so the model code sees a single naming.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

# (layout prefix, canonical prefix), first match wins; order matters (longest first).
_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def canonical_name(key: str) -> str:
    """The checkpoint-layout-independent name of tensor `key`.

    Canonical is what transformers 5 writes for LLaVA: `vision_tower.<clip module>`
    (no `vision_model.` infix) and `multi_modal_projector.*`."""
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@dataclass
class Checkpoint:
    """A checkpoint folder: `config.json` plus one or more safetensors files."""

    path: Path
    config: dict
    files: dict[str, list[str]] = field(default_factory=dict)  # file name -> stored keys

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not a checkpoint folder: config.json is missing")
        config = json.loads(config_file.read_text())
        index = path / "model.safetensors.index.json"
        files: dict[str, list[str]] = {}
        if index.is_file():
            for key, name in json.loads(index.read_text())["weight_map"].items():
                files.setdefault(name, []).append(key)
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", framework="pt") as f:
                files["model.safetensors"] = list(f.keys())
        else:
            raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")
        return cls(path, config, files)

    def keys(self) -> list[str]:
        """Canonical names of every tensor in the checkpoint."""
        return [canonical_name(k) for keys in self.files.values() for k in keys]

    def load(self, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors whose canonical name starts with one of `prefixes`, keyed by
        canonical name, on CPU in their stored dtype. Only the shards that hold them
        are opened."""
        prefixes = tuple(prefixes)
        out: dict[str, torch.Tensor] = {}
        for name, keys in self.files.items():
            wanted = [(k, canonical_name(k)) for k in keys if canonical_name(k).startswith(prefixes)]
            if not wanted:
                continue
            with safe_open(self.path / name, framework="pt", device="cpu") as f:
                for key, canon in wanted:
                    if canon in out:
                        raise ValueError(f"{self.path}: tensor {canon} is stored twice (as {key})")
                    out[canon] = f.get_tensor(key)
        return out
