"""Read a Hugging Face checkpoint's text model: config, eos ids and safetensors weights.

A LLaVA checkpoint stores the Llama weights under `language_model.model.*` and
`language_model.lm_head.*` (v4 / hub layout) or `model.language_model.*` and `lm_head.*`
(transformers v5 layout); a plain Llama under `model.*` and `lm_head.*`. All map onto
our LlamaForCausalLM; the vision tower and projector belong to vision_service and are
skipped.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llm_service.models.llama import LlamaArgs, LlamaForCausalLM

_TEXT_MODEL_TYPES = ("llama",)
_PREFIXES = (  # checkpoint prefix -> our prefix, first match wins
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("model.vision_tower.", None),
    ("model.multi_modal_projector.", None),
    ("model.", "model."),
    ("lm_head.", "lm_head."),
)


@dataclass
class ModelSpec:
    """What the engine needs to know about a checkpoint before and after loading it."""

    path: Path
    architecture: str
    args: LlamaArgs
    dtype: torch.dtype  # the checkpoint's own dtype
    eos_token_ids: list[int] = field(default_factory=list)
    image_token_id: int | None = None  # None: a text-only model


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _rope(text) -> dict:
    """rope_parameters (transformers v5) or rope_theta + rope_scaling (v4)."""
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(text, "rope_theta", 10000.0)
    return rope


def read_spec(path: str | Path) -> ModelSpec:
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config()
    if text.model_type not in _TEXT_MODEL_TYPES:
        raise ValueError(f"unsupported language model type {text.model_type!r} (supported: {_TEXT_MODEL_TYPES})")
    num_heads = text.num_attention_heads
    args = LlamaArgs(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        rope=_rope(text),
        attention_bias=getattr(text, "attention_bias", False),
        mlp_bias=getattr(text, "mlp_bias", False),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )
    eos = _ids(text.eos_token_id)
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        eos += [i for i in _ids(json.loads(gen_path.read_text()).get("eos_token_id")) if i not in eos]
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    architecture = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
    image_token_id = getattr(config, "image_token_id", None) if hasattr(config, "vision_config") else None
    return ModelSpec(path, architecture, args, dtype, eos, image_token_id)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, max_positions: int) -> LlamaForCausalLM:
    """Build the model directly in `dtype` on `device` and copy in this rank's weights."""
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(spec.args, max_positions)
    params = dict(model.named_parameters())
    loaded: set[str] = set()  # parameter names; fused ones as "name:shard"
    files = sorted(spec.path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {spec.path}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = _our_name(key)
                if name is not None:
                    loaded |= _load_one(model, params, name, CheckpointTensor(f.get_slice(key)))
    if spec.args.tie_word_embeddings and "lm_head.weight" not in loaded:
        model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data)  # same vocab shard per rank
        loaded.add("lm_head.weight")
    missing = sorted(_expected(model, params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {spec.path} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


class CheckpointTensor:
    """A safetensors tensor read on demand, so a tensor-parallel rank reads only its
    shard from disk: `narrow` reads one slice, `[...]` the whole tensor."""

    def __init__(self, lazy):
        self._lazy = lazy
        self.shape = torch.Size(lazy.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._lazy[(slice(None),) * dim + (slice(start, start + length),)]

    def __getitem__(self, index) -> torch.Tensor:
        return self._lazy[index]


def _our_name(key: str) -> str | None:
    for prefix, ours in _PREFIXES:
        if key.startswith(prefix):
            return None if ours is None else ours + key[len(prefix) :]
    return None


def _expected(model: LlamaForCausalLM, params: dict[str, nn.Parameter]) -> set[str]:
    """Every parameter name, fused ones once per shard, as _load_one reports them."""
    shards: dict[str, list] = {}
    for fused, shard_id in model.packed.values():
        shards.setdefault(fused, []).append(shard_id)
    out = set()
    for name in params:
        fused = next((f for f in shards if f".{f}." in name), None)
        out |= {f"{name}:{i}" for i in shards[fused]} if fused else {name}
    return out


def _load_one(
    model: LlamaForCausalLM, params: dict[str, nn.Parameter], name: str, tensor: CheckpointTensor
) -> set[str]:
    """Copy `tensor` into the parameter it belongs to; what was loaded (empty: skipped)."""
    for part, (fused, shard_id) in model.packed.items():
        if f".{part}." in name:
            target = name.replace(f".{part}.", f".{fused}.")
            param = params[target]
            param.weight_loader(param, tensor, shard_id)
            return {f"{target}:{shard_id}"}
    param = params.get(name)
    if param is None:  # e.g. rotary_emb.inv_freq of old checkpoints
        return set()
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        param.data.copy_(tensor[...])
    else:
        loader(param, tensor)
    return {name}
