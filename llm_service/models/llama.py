"""Llama (and the Llama text model inside LLaVA) over packed tokens and a paged KV cache.

Tokens of all sequences in a step are packed into one [T] batch; AttentionMetadata says
where each sequence's keys live. Image rows replace the token embedding at their
positions, which is how LLaVA splices vision features into the text stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_service.distributed import tp_size
from llm_service.layers import triton_gemv
from llm_service.layers.activation import SiluAndMul
from llm_service.layers.attention import Attention, AttentionMetadata
from llm_service.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llm_service.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from llm_service.layers.norm import RMSNorm
from llm_service.layers.rotary import Rope, RotaryEmbedding


@dataclass
class LlamaArgs:
    """The text-config fields the model needs (read from config.json by models.loader)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def check_tp(self, tp: int) -> None:
        """ValueError unless the layers split evenly over `tp` ranks (checked before any
        worker starts; KV heads may also be fewer than tp and are then replicated)."""
        if self.num_heads % tp:
            raise ValueError(f"tp={tp} does not divide the {self.num_heads} attention heads")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ValueError(f"tp={tp} is neither a divisor nor a multiple of the {self.num_kv_heads} key/value heads")
        if self.intermediate_size % tp:
            raise ValueError(f"tp={tp} does not divide the MLP width {self.intermediate_size}")


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(a.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads, a.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = a.head_dim
        self.o_proj = RowParallelLinear(a.num_heads * a.head_dim, a.hidden_size, a.attention_bias)
        self.attn = Attention(self.num_heads, self.num_kv_heads, a.head_dim, a.head_dim**-0.5)

    def forward(self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata, reduce: bool = True) -> torch.Tensor:
        if (self.attn.kernels is not None and self.attn.k_scale is None and self.qkv_proj.use_gemv
                and x.shape[0] <= triton_gemv.EPILOGUE_ROWS):
            # decode: projection, rotary and the K/V cache write are one launch (not into an int8
            # cache: a head's scale needs its max over head_dim, which spans several programs)
            q = triton_gemv.qkv_rope_store(x, self.qkv_proj.weight, self.qkv_proj.bias, rope, self.attn.k_cache,
                                           self.attn.v_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
            return self.o_proj(self.attn.attend(q, meta).flatten(1), reduce)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, rope, meta).flatten(1), reduce)


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(a.hidden_size, [a.intermediate_size] * 2, a.mlp_bias)
        self.down_proj = RowParallelLinear(a.intermediate_size, a.hidden_size, a.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        if self.gate_up_proj.use_gemv and x.shape[0] <= triton_gemv.EPILOGUE_ROWS:  # SiLU * up in the GEMV's epilogue
            h = triton_gemv.gemv(x, self.gate_up_proj.weight, self.gate_up_proj.bias, gated=True)
        else:
            h = self.act(self.gate_up_proj(x))
        return self.down_proj(h, reduce)


def sums_in_norms(a: LlamaArgs) -> bool:
    """Whether the row-parallel projections (o_proj, down_proj) leave their all-reduce to the
    next RMSNorm, which fuses it with the residual add and the norm: under TP, without biases."""
    return tp_size() > 1 and not a.attention_bias and not a.mlp_bias


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.partial = sums_in_norms(a)
        self.self_attn = LlamaAttention(a)
        self.mlp = LlamaMLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(
        self, rope: Rope, h: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata, partial: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous sublayer's output, not yet added to `residual` (None before the
        first layer; then h is the embeddings). Each norm adds it, so the adds fuse into the
        norm kernels; `partial`: h holds this rank's partial sums (a row-parallel layer's, or
        the vocab shard's embeddings), and the norm all-reduces them too (the embeddings in place)."""
        if residual is None:
            x, residual = self.input_layernorm(h, reduce=partial), h
        else:
            x, residual = self.input_layernorm(h, residual, reduce=partial)
        h = self.self_attn(rope, x, meta, reduce=not self.partial)
        x, residual = self.post_attention_layernorm(h, residual, reduce=self.partial)
        return self.mlp(x, reduce=not self.partial), residual


class LlamaModel(nn.Module):
    def __init__(self, a: LlamaArgs, max_positions: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size)
        self.rotary = RotaryEmbedding(a.head_dim, max_positions, a.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.partial = sums_in_norms(a)  # the last layer's output: partial sums for the final norm

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        image_index: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        partial = self.partial and image_index is None  # image rows replace whole, summed embeddings
        h = self.embed_tokens(input_ids, reduce=not partial)
        if image_index is not None:  # an index, not a bool mask: masked writes sync with the host
            h.index_copy_(0, image_index, image_rows.to(h.dtype))
        rope = self.rotary(positions)
        residual = None
        for layer in self.layers:
            h, residual = layer(rope, h, residual, meta, partial)
            partial = self.partial
        return self.norm(h, residual, reduce=self.partial)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (our fused parameter's module, shard id)
    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, a: LlamaArgs, max_positions: int):
        """max_positions: the longest sequence served (the engine's session_len)."""
        super().__init__()
        self.args = a
        self.model = LlamaModel(a, max_positions)
        self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        image_index: torch.Tensor | None = None,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of the packed tokens; image_rows [n, hidden]
        replace the embeddings at positions image_index [n]."""
        return self.model(input_ids, positions, meta, image_index, image_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
