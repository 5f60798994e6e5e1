"""Owns the model and its paged KV cache; turns a scheduled batch into logits.

Each step packs the scheduled tokens of all sequences into flat tensors (ids, positions,
cache slots, image rows) plus the attention metadata, runs one forward and returns the
logits of the sequences that sample this step. Under tensor parallelism every rank has a
runner over its shard: rank 0 `prepare`s the step and sends it to the workers, and every
rank runs the same `forward` on it.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch

from llm_service.config import EngineConfig
from llm_service.distributed import min_over_ranks, tp_size
from llm_service.distributed.step import PackedStep, StepInputs, send_step
from llm_service.engine.cuda_graph import (MAX_GRAPH_PREFILLS, SHORT_PREFILL_SIZES, DecodeGraphs, PrefillGraphs,
                                           graphs_enabled, prefill_graph_sizes)
from llm_service.engine.memory_profile import free_memory_after_peak_step
from llm_service.engine.scheduler import Scheduled
from llm_service.layers.attention import Attention, kv_bytes_per_token, kv_cache
from llm_service.models.llama import LlamaForCausalLM
from llm_service.models.loader import ModelSpec, load_model
from vision_service.staging import PinnedStaging


@dataclass
class StepLogits:
    """A step's outcome for its sampling rows, in batch order: float32 logits over the whole
    vocabulary unless a decode graph picked the greedy ids and the step did not ask for them
    (PackedStep.need_logits), and those ids (int64 [B]) where the graph picked them, on rank 0
    also in pinned host memory (`host_greedy`, valid once the step is done). Views of a graph's
    static outputs are valid until its next replay."""

    full: torch.Tensor | None
    greedy: torch.Tensor | None
    host_greedy: torch.Tensor | None = None


class ModelRunner:
    def __init__(
        self,
        spec: ModelSpec,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
        session_len: int,
        max_batch_size: int,
    ):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.block_size = config.block_size
        self.kv_int8 = config.quant_policy == 8  # every rank reads it from the same config
        self.model: LlamaForCausalLM = load_model(spec, dtype, device, session_len)
        self.attention = [m for m in self.model.modules() if isinstance(m, Attention)]
        # Triton kernels for attention, norms, activation and decode GEMVs (every module that has one)
        self.uses_kernels = device.type == "cuda" and all(
            [m.use_kernels() for m in self.model.modules() if hasattr(m, "use_kernels")]
        )
        self.num_blocks = min_over_ranks(self._num_blocks(config, session_len, max_batch_size), device)
        a = self.attention[0]
        cache = (self.num_blocks, self.block_size, a.num_kv_heads, a.head_dim, dtype, device, self.kv_int8)
        for attn in self.attention:
            attn.k_cache, attn.k_scale = kv_cache(*cache)
            attn.v_cache, attn.v_scale = kv_cache(*cache)
        eager = getattr(config, "eager_mode", False)  # PytorchEngineConfig's switch
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: list[PrefillGraphs] = []  # short ones of one sequence first
        self.stage_rows = PinnedStaging(buffers=1)  # a step's image rows, in the model's dtype (the workers' too)
        if device.type == "cuda" and spec.image_token_id is not None:  # a step holds <= max_prefill_token_num rows
            self.stage_rows.reserve(config.max_prefill_token_num * spec.args.hidden_size, dtype)
        if graphs_enabled(device, self.uses_kernels, eager):
            max_blocks = -(-session_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, max_batch_size, max_blocks, device)
            largest = config.max_prefill_token_num + max_batch_size + 1  # every running sequence's decode too
            self.prefill_graphs = [
                PrefillGraphs(self.model, list(SHORT_PREFILL_SIZES), 0, 1, max_blocks, device, images=False),
                PrefillGraphs(self.model, prefill_graph_sizes(largest), max_batch_size, MAX_GRAPH_PREFILLS,
                              max_blocks, device, images=spec.image_token_id is not None),
            ]

    def drop_graphs(self) -> None:
        """Free the CUDA graphs (eager from here on). A graph that captured a collective must be
        gone before its process group: NCCL's teardown hangs while one holds the communicator."""
        self.graphs, self.prefill_graphs = None, []
        gc.collect()

    def _block_bytes(self) -> int:
        a = self.attention[0]
        per_token = 2 * len(self.attention) * kv_bytes_per_token(a.num_kv_heads, a.head_dim, self.dtype, self.kv_int8)
        return per_token * self.block_size

    def _num_blocks(self, config: EngineConfig, session_len: int, max_batch_size: int) -> int:
        """cache_max_entry_count > 1 is a block count; otherwise a fraction of the budget:
        on CPU session_len x max_batch_size tokens, on CUDA the memory free after the weights
        and a warm-up of the largest step (measured, see memory_profile)."""
        if config.cache_max_entry_count > 1:
            return int(config.cache_max_entry_count)
        if self.device.type != "cuda":
            tokens = session_len * max_batch_size * config.cache_max_entry_count
            return max(1, math.ceil(tokens / self.block_size))
        free = free_memory_after_peak_step(
            self.model, self.attention, self.block_size, config.max_prefill_token_num + max_batch_size,
            max_batch_size, session_len, self.dtype, self.device, self.kv_int8,
        )
        num = int(free * config.cache_max_entry_count // self._block_bytes())
        if num < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free after weights)")
        return num

    def prepare(self, batch: list[Scheduled], input_ids: torch.Tensor | None = None,
                need_logits: bool = True) -> PackedStep:
        """Rank 0, host side: the step's tensors, packed and copied to the device (or, for a step
        a decode graph replays, staged in its pinned ring: DecodeGraphs). `input_ids` (int64 [T],
        on the device): the ids of a decode-only batch whose last ids are not on the host yet
        (the previous step's samples): copied into the device ints where those travel to the
        workers, else read from where they are. need_logits: see PackedStep."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        image_index: list[int] = []  # packed positions the image rows replace
        image_rows: list[torch.Tensor] = []
        logits_rows: list[int] = []
        bs = self.block_size
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            table = seq.block_table
            if item.num_tokens == 1:  # a decode: no slices, no ranges
                ids.append(0 if input_ids is not None else seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids += seq.token_ids[start:end]
                positions += range(start, end)
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if seq.images and start < seq.images[-1].end:
                for img in seq.images:
                    lo, hi = max(start, img.start), min(end, img.end)
                    if lo < hi:
                        image_index += range(cu[-1] + lo - start, cu[-1] + hi - start)
                        image_rows.append(img.embedding[lo - img.start : hi - img.start])
            cu.append(cu[-1] + item.num_tokens)
            seq_lens.append(end)
            if item.samples:
                logits_rows.append(cu[-1] - 1)
        width = max(len(item.seq.block_table) for item in batch)
        tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch]
        rows = self.stage_rows.to_device(image_rows, self.device, self.dtype) if image_rows else None
        slot = pinned = None  # a step a decode graph will replay: its host slot and staging (DecodeGraphs)
        max_q_len = max(item.num_tokens for item in batch)
        if self.graphs is not None and self.graphs.covers(len(ids), len(batch), width, len(logits_rows),
                                                          len(image_index), max_q_len):
            slot, pinned = self.graphs.claim(len(ids), width)
        step = PackedStep.build(ids, positions, slots, tables, cu, seq_lens, logits_rows, image_index, rows,
                                need_logits, self.device, pinned)
        step.slot = slot
        if input_ids is not None:
            if step.ints is not None and tp_size() > 1:  # the workers' copy travels in the ints
                step.ints[: len(ids)].copy_(input_ids)
            else:
                step.ids_from = input_ids
        return step

    def run(self, batch: list[Scheduled], input_ids: torch.Tensor | None = None,
            need_logits: bool = True) -> StepLogits:
        """Rank 0: one step over the batch: the logits of its sampling rows, in batch order."""
        step = self.prepare(batch, input_ids, need_logits)
        if tp_size() > 1:
            send_step(step)
        return self.forward(step)

    @torch.inference_mode()
    def forward(self, packed: PackedStep) -> StepLogits:
        """Every rank: the model over the step's tokens and the LM head."""
        if self.graphs is not None and self.graphs.can_run(packed):
            shard, greedy, host = self.graphs.run(packed)
            if greedy is not None and not packed.need_logits:
                return StepLogits(None, greedy, host)
            return StepLogits(self.model.lm_head.gather(shard).float(), greedy, host)
        return StepLogits(self._forward(packed.unpack()), None)

    def _forward(self, step: StepInputs) -> torch.Tensor:
        """float32 logits [n_sampling, vocab] of a step no decode graph covers."""
        ids, meta, logits_rows = step.input_ids, step.meta, step.logits_rows
        num_image_rows = step.image_rows.shape[0] if step.image_rows is not None else 0
        for graphs in self.prefill_graphs:
            if graphs.can_run(ids.shape[0], meta, num_image_rows):
                return graphs.run(ids, step.positions, meta, logits_rows, step.image_index, step.image_rows)
        hidden = self.model(ids, step.positions, meta, step.image_index, step.image_rows)
        return self.model.compute_logits(hidden[logits_rows]).float()
