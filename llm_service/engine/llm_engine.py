"""The synchronous engine: one step = schedule, forward, sample, retire.

Not thread-safe: AsyncLLMEngine drives it from a single thread. With tp > 1 this process
is rank 0: it also starts the workers (distributed.launcher) and hands them each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from llm_service.config import EngineConfig
from llm_service.distributed import init_tp, tp_size
from llm_service.distributed.launcher import WorkerGroup
from llm_service.engine.block_manager import BlockManager
from llm_service.engine.model_runner import ModelRunner
from llm_service.engine.sampler import SamplingBatch, argmax_only, sample
from llm_service.engine.scheduler import Scheduler
from llm_service.engine.sequence import Sequence, Status
from llm_service.models.loader import read_spec
from vision_service.devices import DTYPES, resolve_device

@dataclass
class StepOutput:
    seq: Sequence
    token_id: int | None  # None when the sequence retires without a new token
    logits: torch.Tensor | None  # raw logits [vocab] of the step, when the request asked
    finish_reason: str | None


class LLMEngine:
    def __init__(self, model_path: str, config: EngineConfig):
        if tp_size() > 1:
            raise RuntimeError("a tensor-parallel engine is running in this process; close it first")
        self.spec = read_spec(model_path)
        self.spec.args.check_tp(config.tp)
        self.config = config
        self.device = resolve_device(config.device)  # with tp > 1, rank r runs on the r-th GPU after it
        if config.dtype != "auto":
            self.dtype = DTYPES[config.dtype]
        else:
            self.dtype = self.spec.dtype if self.device.type == "cuda" else torch.float32
        # LMDeploy lets session_len exceed max_position_embeddings; RoPE extends, as in transformers
        self.session_len = config.session_len or self.spec.args.max_position_embeddings
        self.max_batch_size = config.max_batch_size or (256 if self.device.type == "cuda" else 32)
        self.workers: WorkerGroup | None = None
        if config.tp > 1:
            self.workers = WorkerGroup.start(model_path, config, self.dtype, self.device, self.session_len,
                                             self.max_batch_size)
        else:
            init_tp(0, 1)
        try:
            self.runner = ModelRunner(self.spec, config, self.dtype, self.device, self.session_len, self.max_batch_size)
        except BaseException:
            if self.workers is not None:
                self.workers.stop(graceful=False)
            raise
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.max_batch_size, config.max_prefill_token_num)
        self.eos_token_ids = self.spec.eos_token_ids

    def on_worker_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` from a watchdog thread if a tensor-parallel worker dies."""
        if self.workers is not None:
            self.workers.on_failure(callback)

    @property
    def idle_ping_s(self) -> float | None:
        """How long the engine may stay idle before `ping` (None: no limit)."""
        return None if self.workers is None else self.workers.ping_s

    def ping(self) -> None:
        """While idle: keep the tensor-parallel workers' wait for the next step alive."""
        if self.workers is not None:
            self.workers.ping()

    def close(self) -> None:
        """Stop the tensor-parallel workers (idempotent). Only once no step is running."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    def add(self, seq: Sequence) -> None:
        p = seq.params
        seq.stop_ids = frozenset(p.stop_token_ids if p.ignore_eos else [*p.stop_token_ids, *self.eos_token_ids])
        seq.max_len = self.session_len
        if p.max_new_tokens:
            seq.max_len = min(seq.max_len, seq.num_prompt_tokens + p.max_new_tokens)
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.status != Status.FINISHED:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        batch, too_big = self.scheduler.schedule()
        outputs = []
        for seq in too_big:  # its tokens so far no longer fit in the whole cache
            self.scheduler.finish(seq, "length")
            outputs.append(StepOutput(seq, None, None, "length"))
        if not batch:
            return outputs
        if self.workers is not None:
            self.workers.check()
        logits = self.runner.run(batch)
        sampling = []
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            if item.samples:
                sampling.append(item.seq)
        if self.blocks.prefix_caching:
            for item in batch:
                self.blocks.commit(item.seq)
        if not sampling:
            return outputs
        tokens = self.sample(logits, sampling)
        for row, (seq, token) in enumerate(zip(sampling, tokens)):
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            row_logits = logits[row] if seq.params.output_logits else None
            outputs.append(StepOutput(seq, token, row_logits, reason))
        return outputs

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """The next token of each row, read back to the host (the step's one sync)."""
        if argmax_only(seqs):  # nothing to build or copy for the sampler
            return logits.argmax(dim=-1).tolist()
        params = SamplingBatch.build(seqs, self.eos_token_ids, self.spec.args.vocab_size, self.device)
        return sample(logits, params).tolist()

    @staticmethod
    def _stop_reason(seq: Sequence, token: int) -> str | None:
        if token in seq.stop_ids and len(seq.token_ids) - seq.num_prompt_tokens >= seq.params.min_new_tokens:
            return "stop"
        if len(seq.token_ids) >= seq.max_len:  # max_new_tokens or session_len
            return "length"
        return None
