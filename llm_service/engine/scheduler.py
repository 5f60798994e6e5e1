"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step mixes decodes (one token each) with prefill chunks, the prefill tokens
bounded by max_prefill_token_num; a prompt longer than what is left of that budget is
prefilled in chunks over several steps. Running sequences go first, oldest first; when
the cache cannot hold their next tokens the newest running sequence is preempted (its
blocks freed, to be recomputed later). Waiting sequences are admitted while blocks,
budget and batch slots last, reusing prefix-cached blocks when enabled. Single-token items
(the decodes) lead the batch: attention runs them through the decode kernel and the rest
through the prefill kernel, whose programs hold 64 queries each.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.sequence import Sequence, Status


@dataclass(slots=True)
class Scheduled:
    seq: Sequence
    num_tokens: int  # positions computed this step, from seq.num_computed_tokens on
    samples: bool  # this step reaches the end of the sequence, so a token is sampled


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Scheduled], list[Sequence]]:
        """This step's batch, plus sequences that can never fit the cache (to be failed)."""
        budget = self.max_prefill_tokens
        block_size = self.blocks.block_size
        batch: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            todo = len(seq.token_ids) - seq.num_computed_tokens
            if todo == 1 and seq.num_computed_tokens < len(seq.block_table) * block_size:
                batch.append(Scheduled(seq, 1, True))  # a decode with room in its last block: the common case
                i += 1
                continue
            n = 1 if todo == 1 else min(todo, budget)
            if n == 0:
                i += 1
                continue
            while not self.blocks.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_computed_tokens + n)
                batch.append(Scheduled(seq, n, n == todo))
                budget -= n if todo > 1 else 0
                i += 1
        too_big: list[Sequence] = []
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if self.blocks.blocks_for(len(seq)) > self.blocks.num_blocks:
                too_big.append(self.waiting.popleft())
                continue
            hits = self.blocks.match_prefix(seq)
            cached = len(hits) * self.blocks.block_size
            n = min(len(seq) - cached, budget)
            if not self.blocks.can_admit(hits, cached + n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hits, cached + n)
            if seq.num_output_tokens == 0:  # not a recompute after preemption
                seq.num_cached_tokens = cached
            seq.num_computed_tokens = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(Scheduled(seq, n, cached + n == len(seq)))
            budget -= n
        batch.sort(key=lambda item: item.num_tokens != 1)  # stable: decodes first, each group in order
        return batch, too_big

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.blocks.release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire seq (finished or aborted) wherever it is and free its blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
