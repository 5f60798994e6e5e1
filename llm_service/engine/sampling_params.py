"""Per-request sampling settings, validated from the wire's SamplingParams."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from protos import llm_pb2


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    bad_token_ids: list[int] = field(default_factory=list)
    min_new_tokens: int = 0
    max_new_tokens: int = 0  # 0 = until session_len
    ignore_eos: bool = False
    output_logits: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @cached_property
    def argmax_only(self) -> bool:
        """Greedy with no processor but min_new_tokens (checked per step by the sampler)."""
        return self.greedy and self.repetition_penalty == 1.0 and not self.bad_token_ids

    @classmethod
    def from_proto(cls, p: llm_pb2.SamplingParams, vocab_size: int) -> SamplingParams:
        """Validate and convert; a proto left at its zero values means greedy decoding.
        Raises ValueError naming the offending field."""
        if not p.temperature >= 0:  # NaN-safe
            raise ValueError(f"temperature must be >= 0, got {p.temperature}")
        if p.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {p.top_k}")
        # 0.0 is proto3's "unset": harmless for greedy, meaningless for sampling
        if not 0.0 <= p.top_p <= 1.0 or (p.do_sample and p.top_p == 0.0):
            raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
        top_p = p.top_p or 1.0
        if not 0.0 <= p.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {p.min_p}")
        penalty = p.repetition_penalty or 1.0
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
        if p.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {p.max_new_tokens}")
        if p.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {p.min_new_tokens}")
        for name in ("stop_token_ids", "bad_token_ids"):
            bad = [i for i in getattr(p, name) if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if p.output_logits not in ("", "generation"):
            raise ValueError(f"output_logits must be '' or 'generation', got {p.output_logits!r}")
        return cls(
            do_sample=p.do_sample,
            temperature=p.temperature if p.do_sample else 1.0,
            top_k=p.top_k,
            top_p=top_p,
            min_p=p.min_p,
            repetition_penalty=penalty,
            seed=p.random_seed if p.HasField("random_seed") else None,
            stop_token_ids=list(dict.fromkeys(p.stop_token_ids)),
            bad_token_ids=list(dict.fromkeys(p.bad_token_ids)),
            min_new_tokens=p.min_new_tokens,
            max_new_tokens=p.max_new_tokens,
            ignore_eos=p.ignore_eos,
            output_logits=p.output_logits == "generation",
        )
