"""The synchronous engine: one step = schedule, forward, sample, retire.

Not thread-safe: AsyncLLMEngine drives it from a single thread. With tp > 1 this process
is rank 0: it also starts the workers (distributed.launcher) and hands them each step.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from llm_service.config import EngineConfig
from llm_service.distributed import init_tp, tp_size
from llm_service.distributed.launcher import WorkerGroup
from llm_service.engine.block_manager import BlockManager
from llm_service.engine.model_runner import ModelRunner, StepLogits
from llm_service.engine.sampler import SamplingBatch, argmax_only, sample
from llm_service.engine.scheduler import Scheduled, Scheduler
from llm_service.engine.sequence import Sequence, Status
from llm_service.models.loader import read_spec
from vision_service.devices import DTYPES, resolve_device


def _can_run_ahead(seqs: list[Sequence]) -> bool:
    """Whether the next step may be sampled before this one's ids reach the host: not when
    a repetition penalty reads the ids so far, or min_new_tokens counts them."""
    return all(s.params.repetition_penalty == 1.0 and not s.params.min_new_tokens for s in seqs)


@dataclass
class _Launched:
    """A step queued on the device whose sampled ids are not read yet."""

    sampling: list[Sequence]  # the rows that sample, in logits order
    tokens: torch.Tensor | None  # int64 [len(sampling)] on the device
    host: torch.Tensor | None  # their copy on the host (pinned on CUDA; valid after `event`)
    event: torch.cuda.Event | None
    logits: torch.Tensor | None  # float32 [len(sampling), vocab], kept when a row asked for them


@dataclass(slots=True)
class StepRecord:
    """One launched step, for profiling a workload's schedule (LLMEngine.step_log)."""

    launched_at: float  # time.perf_counter() when the step was launched
    prefill_tokens: int  # positions of prompt chunks (q_len > 1) in the step
    decode_rows: int
    running: int
    waiting: int


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
        self.inflight: _Launched | None = None
        # Running ahead hides the host's per-step work behind the GPU's; where the forward
        # itself runs on the host (CPU) it would only hand each token out one step later.
        self.run_ahead = self.device.type == "cuda"
        self.step_log: deque[StepRecord] = deque(maxlen=4096)  # the latest steps, oldest first

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
            self.runner.drop_graphs()  # before the group goes (ModelRunner.drop_graphs)
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
        return self.inflight is not None or self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        """Advance by one forward. With run_ahead, a step whose rows all sample is read back
        one call later, after the next decode step is launched with its input ids taken
        straight from this step's samples on the device: the host reads, delivers and
        schedules while the GPU already runs the next step."""
        if self.inflight is not None:
            ahead = self._launch_ahead(self.inflight)
            outputs = self._complete(self.inflight)
            self.inflight = ahead
            return outputs
        batch, too_big = self.scheduler.schedule()
        outputs = []
        for seq in too_big:  # its tokens so far no longer fit in the whole cache
            self.scheduler.finish(seq, "length")
            outputs.append(StepOutput(seq, None, None, "length"))
        if not batch:
            return outputs
        launched = self._launch(batch)
        ahead = self.run_ahead and all(item.samples for item in batch) and _can_run_ahead(launched.sampling)
        if ahead and launched.sampling:
            self.inflight = launched  # completed by the next call, after launching the one after it
            return outputs
        return outputs + self._complete(launched)

    def reset(self) -> None:
        """Forget a launched step (after a failed step, or when closing)."""
        self.inflight = None

    def _launch(self, batch: list[Scheduled], input_ids: torch.Tensor | None = None) -> _Launched:
        """Forward + sampling queued on the device; the sampled ids start their copy home."""
        if self.workers is not None:
            self.workers.check()
        decodes = sum(1 for item in batch if item.num_tokens == 1)
        self.step_log.append(StepRecord(time.perf_counter(), sum(item.num_tokens for item in batch) - decodes,
                                        decodes, len(self.scheduler.running), len(self.scheduler.waiting)))
        sampling = [item.seq for item in batch if item.samples]
        greedy = argmax_only(sampling)  # then the decode graph's own pick will do
        wants_logits = any(seq.params.output_logits for seq in sampling)
        out = self.runner.run(batch, input_ids, need_logits=not greedy or wants_logits)
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
        if self.blocks.prefix_caching:
            for item in batch:
                self.blocks.commit(item.seq)
        if not sampling:
            return _Launched([], None, None, None, None)
        tokens = self._sample(out, sampling, greedy)
        # a copy: a graph's output buffer is overwritten by the next replay
        logits = out.full.clone() if wants_logits else None
        if self.device.type != "cuda":
            return _Launched(sampling, tokens, tokens, None, logits)
        if tokens is out.greedy and out.host_greedy is not None:  # the graph wrote them home itself
            host = out.host_greedy
        else:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Launched(sampling, tokens, host, event, logits)

    def _launch_ahead(self, prev: _Launched) -> _Launched | None:
        """The next decode of every sequence `prev` samples, launched before prev's ids
        reach the host; None when that step is not the scheduler's next one (requests
        waiting, a sequence not in prev, a length limit reached, no free block)."""
        seqs = prev.sampling
        if not seqs or self.scheduler.waiting or len(seqs) != len(self.scheduler.running):
            return None
        if any(seq.status != Status.RUNNING or len(seq.token_ids) + 1 >= seq.max_len for seq in seqs):
            return None  # prev's token makes len(token_ids) + 1 positions
        # all of them at once: sequences of equal length cross a block boundary together
        needed = sum(self.blocks.blocks_needed(seq, seq.num_computed_tokens + 1) for seq in seqs)
        if needed > self.blocks.num_free_blocks:
            return None
        for seq in seqs:
            self.blocks.grow(seq, seq.num_computed_tokens + 1)
        return self._launch([Scheduled(seq, 1, True) for seq in seqs], input_ids=prev.tokens)

    def _complete(self, launched: _Launched) -> list[StepOutput]:
        """Read the sampled ids back (the step's one sync), append them, retire the done."""
        if not launched.sampling:
            return []
        if launched.event is not None:
            launched.event.synchronize()
        tokens = launched.host.tolist()
        outputs = []
        for row, (seq, token) in enumerate(zip(launched.sampling, tokens)):
            if seq.status == Status.FINISHED:  # aborted, or stopped while this step ran ahead
                continue
            seq.token_ids.append(token)
            if self.blocks.prefix_caching:
                self.blocks.commit(seq)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            row_logits = launched.logits[row] if seq.params.output_logits else None
            outputs.append(StepOutput(seq, token, row_logits, reason))
        return outputs

    def _sample(self, out: StepLogits, seqs: list[Sequence], greedy: bool) -> torch.Tensor:
        """The next token of each row, int64 on the device (no sync). greedy: every row takes the
        plain argmax (sampler.argmax_only), which a decode graph may have picked already."""
        if greedy:  # nothing to build or copy for the sampler
            return out.greedy if out.greedy is not None else out.full.argmax(dim=-1)
        params = SamplingBatch.build(seqs, self.eos_token_ids, self.spec.args.vocab_size, self.device)
        return sample(out.full, params)

    @staticmethod
    def _stop_reason(seq: Sequence, token: int) -> str | None:
        if token in seq.stop_ids and len(seq.token_ids) - seq.num_prompt_tokens >= seq.params.min_new_tokens:
            return "stop"
        if len(seq.token_ids) >= seq.max_len:  # max_new_tokens or session_len
            return "length"
        return None
