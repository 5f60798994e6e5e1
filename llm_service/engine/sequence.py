"""A request inside the engine: its tokens, image spans, KV blocks and progress."""
from __future__ import annotations

import enum
import itertools
from array import array
from dataclasses import dataclass, field

import torch

from llm_service.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ImageSpan:
    """An image's rows occupying positions [start, start + rows) of the prompt."""

    start: int
    embedding: torch.Tensor  # [rows, hidden] in the model's dtype, on the CPU
    key: str  # sha256 (+ options): identifies the rows for prefix caching

    @property
    def end(self) -> int:
        return self.start + self.embedding.shape[0]


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """token_ids holds prompt then output ids; image positions carry the image token id,
    so repetition penalty sees what transformers sees. num_computed_tokens counts
    positions whose K/V are in the cache; the rest are computed by upcoming steps."""

    token_ids: list[int]
    params: SamplingParams
    images: list[ImageSpan] = field(default_factory=list)
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt positions served by the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # one per full, computed block
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    stop_ids: frozenset[int] = frozenset()  # set by the engine on add: stop ids, eos included unless ignored
    max_len: int = 0  # set by the engine on add: length at which it stops (max_new_tokens, session_len)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def block_content(self, index: int, block_size: int) -> bytes:
        """What block `index` holds, as bytes for the prefix-cache hash: its token ids,
        and for image positions the image key and row offset (image rows differ between
        images although their token ids are equal)."""
        start, end = index * block_size, (index + 1) * block_size
        content = array("q", self.token_ids[start:end]).tobytes()  # fixed width: no separator needed
        for img in self.images:
            lo, hi = max(start, img.start), min(end, img.end)
            if lo < hi:
                content += f"|{img.key}@{lo - img.start}:{hi - img.start}+{lo - start}".encode()
        return content

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone and everything so far is prefilled again."""
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.block_table = []
        self.block_hashes = []
