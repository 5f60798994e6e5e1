"""LMDeploy's user-facing config and result types: GenerationConfig and Response.

GenerationConfig keeps LMDeploy's fields and defaults, with one deliberate change our
users asked for: decoding is greedy by default, and explicitly passing top_k, top_p or
temperature (or do_sample=True) turns random sampling on. LMDeploy instead ignores
those three unless do_sample=True, which silently made its own doc example greedy.
The engine configs are re-exported so `from gateway import TurbomindEngineConfig` works;
none of these modules import torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_service.config import PytorchEngineConfig, TurbomindEngineConfig  # noqa: F401  (re-export)
from protos import llm_pb2
from vision_service.config import VisionConfig  # noqa: F401  (re-export)

_SAMPLING_DEFAULTS = {"top_p": 1.0, "top_k": 50, "temperature": 0.8}


@dataclass
class GenerationConfig:
    """None for top_p / top_k / temperature means "not passed": LMDeploy's default value
    (1.0 / 50 / 0.8) is filled in and does not turn sampling on. After construction
    `do_sample` is always a bool."""

    n: int = 1
    max_new_tokens: int | None = 512  # None: up to the session length
    do_sample: bool | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float = 0.0
    temperature: float | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # accepted; fast tokenizers ignore it, as in transformers
    logprobs: int | None = None
    output_logits: str | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        explicit = [name for name in _SAMPLING_DEFAULTS if getattr(self, name) is not None]
        for name, default in _SAMPLING_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.do_sample is None:
            self.do_sample = bool(explicit)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.n != 1:
            raise ValueError(f"n={self.n!r} is not supported: only n=1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an int >= 1 (or None), got {self.max_new_tokens!r}")
        if self.min_new_tokens is not None and (not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0):
            raise ValueError(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        if self.output_logits not in (None, "generation"):
            hint = " ('all', prompt logits, is not supported)" if self.output_logits == "all" else ""
            raise ValueError(f"output_logits must be None or 'generation', got {self.output_logits!r}{hint}")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported; use output_logits='generation'")
        if self.random_seed is not None and (not isinstance(self.random_seed, int) or not 0 <= self.random_seed < 2**64):
            raise ValueError(f"random_seed must be an int in [0, 2**64), got {self.random_seed!r}")
        for name in ("stop_words", "bad_words"):
            words = getattr(self, name)
            if words is not None and (not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words)):
                raise ValueError(f"{name} must be a list of str, got {words!r}")
        for name in ("stop_token_ids", "bad_token_ids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in ids)):
                raise ValueError(f"{name} must be a list of non-negative ints, got {ids!r}")

    def template_stop_words(self, template_stop_words) -> list[str]:
        return [] if self.ignore_eos else list(template_stop_words or [])

    def to_sampling_params(self, tokenizer, template_stop_words: list[str] = ()) -> llm_pb2.SamplingParams:
        """What the LLM tier applies. Stop ids: every stop word (the template's and ours)
        that is a single token, plus stop_token_ids; the model's eos is added by the LLM
        tier unless ignore_eos, which also drops the template's stop words (they end a
        turn like eos does); the user's own stops still apply. Greedy forces top_k=1,
        temperature=1, repetition_penalty=1 as LMDeploy does; temperature 0 means greedy."""
        words = [*self.template_stop_words(template_stop_words), *(self.stop_words or [])]
        stop_ids = [tokenizer.single_token_id(w) for w in words]
        stop_ids = [i for i in stop_ids if i is not None] + list(self.stop_token_ids or [])
        bad_ids = list(self.bad_token_ids or [])
        for word in self.bad_words or []:
            token_id = tokenizer.single_token_id(word)
            if token_id is None:
                raise ValueError(f"bad word {word!r} is not a single token; only single-token bad_words are supported")
            bad_ids.append(token_id)
        vocab = tokenizer.vocab_size
        for name, ids in (("stop_token_ids", stop_ids), ("bad_token_ids", bad_ids)):
            if any(i >= vocab for i in ids):
                raise ValueError(f"{name} {sorted(i for i in ids if i >= vocab)} are outside the vocabulary ({vocab})")
        sample = bool(self.do_sample) and self.temperature > 0
        params = llm_pb2.SamplingParams(
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            top_k=self.top_k if sample else 1,
            top_p=self.top_p if sample else 1.0,
            min_p=self.min_p if sample else 0.0,
            repetition_penalty=self.repetition_penalty if sample else 1.0,
            stop_token_ids=list(dict.fromkeys(stop_ids)),
            min_new_tokens=self.min_new_tokens or 0,
            max_new_tokens=self.max_new_tokens or 0,
            ignore_eos=self.ignore_eos,
            output_logits=self.output_logits or "",
            bad_token_ids=list(dict.fromkeys(bad_ids)),
        )
        if sample and self.random_seed is not None:
            params.random_seed = self.random_seed
        return params


@dataclass
class Response:
    """One result (or, when streaming, one delta: new text and ids, with the running
    generate_token_len). `logits` is [len(token_ids), vocab] float32 when
    output_logits='generation': a numpy array from ChatService; the Python pipeline hands
    a torch tensor when torch is installed (as LMDeploy does), else the numpy array."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None  # 'stop', 'length', 'abort', 'error'; None mid-stream
    token_ids: list[int] = field(default_factory=list)
    logits: Any = None
    index: int = 0

    def __repr__(self) -> str:
        lines = [
            f"text={self.text!r}",
            f"input_token_len={self.input_token_len}",
            f"generate_token_len={self.generate_token_len}",
            f'finish_reason="{self.finish_reason}"',
            f"token_ids={self.token_ids}",
            f"index={self.index}",
        ]
        if self.logits is None:
            lines.append("logits=None")
        else:
            lines += [f"logits.shape={tuple(self.logits.shape)}", f"logits={self.logits}"]
        return "\n".join(lines)

    __str__ = __repr__
