"""Decode, prefill and mixed steps replayed from CUDA graphs.

A decode step of a 7B model is a few hundred small kernels; launched one by one from Python
they cost more host time than the GPU needs at small batches. Pure decode steps (every
sequence q_len 1, no image rows) are therefore captured once per batch size of a ladder and
replayed: one kernel writes the step's ints into static buffers (DecodeGraphs says from where),
the rows past the batch are padding (slot -1: nothing stored; seq_len 0: attention gives zeros)
and the smallest captured size that holds the batch replays. PrefillGraphs does the same for prefill and mixed
steps (up to 16 prompts beside the running decodes) over a ladder of token counts. A step that
fits no graph runs eagerly.

The graph covers the model forward and the LM head, so with tensor parallelism each rank
replays its own graph of the same size and the collectives (NCCL) are part of the graph.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from llm_service.distributed import ll_exchange, tp_rank, tp_size
from llm_service.distributed.ll_allreduce import MAX_PROGRAMS, exchange_args
from llm_service.distributed.step import STEP, PackedStep

from llm_service.layers.attention import AttentionMetadata
from llm_service.models.llama import LlamaForCausalLM
from vision_service.graphs import capture_graphs, eager_requested, pick_batch_size

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The ladder: 1, 2, 4, 8, 16, 24, 32, then every 16, capped by (and ending at)
    max_batch_size. Padding costs at most 1/3 extra rows past 16."""
    ladder = [1, 2, 4, 8, 16, 24, 32]
    while ladder[-1] < max_batch_size:
        ladder.append(ladder[-1] + 16)
    return sorted({min(bs, max_batch_size) for bs in ladder})


def graphs_enabled(device: torch.device, uses_kernels: bool, eager_mode: bool) -> bool:
    """Graphs need CUDA and the Triton kernels (the torch attention reads lengths on the host);
    eager_mode or PRISM_EAGER=1 turns them off."""
    return device.type == "cuda" and uses_kernels and not eager_mode and not eager_requested()


@dataclass
class _Buffers:
    """Static inputs and outputs at the largest size; a graph of size bs uses rows [:bs]."""

    ids: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    slot_mapping: torch.Tensor  # int64 [N]
    block_tables: torch.Tensor  # int32 [N, max_blocks]
    cu_seqlens_q: torch.Tensor  # int32 [N + 1], always 0..N (every q_len is 1)
    seq_lens: torch.Tensor  # int32 [N]
    shard_logits: torch.Tensor  # [N, vocab shard] in the model dtype: the LM head's, this rank's columns
    greedy: torch.Tensor  # int64 [N]: each row's argmax over the whole vocabulary, where the size picks it
    host_off: torch.Tensor  # int64 [1]: where in DecodeGraphs.host_ids the greedy ids go, set by `fill`

    def meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            max_q_len=1,
        )

    def fill(self, step: PackedStep, bs: int, host_off: int) -> None:
        """The inputs of a graph of size bs from a decode step's packed ints, in one kernel where
        unpacking them and copying each in took ten; rows past the step's are padding. A staged
        step's ints are read from rank 0's pinned host memory and, under tensor parallelism, sent
        to the workers, whose kernel receives them (an ll call on every rank). host_off: where in
        the host ring the graph's greedy ids go (stored for the graph's kernel to read)."""
        n, width = step.header[1], step.header[3]
        starts = list(itertools.accumulate(step.sizes(), initial=0))  # ids, positions, slots, tables, cu, lens
        ll = ll_exchange() if step.staged else None
        (ptrs, epoch, done, rank), consts = exchange_args(ll, self.ids)
        exchange = 0 if ll is None else 1 if rank == 0 else 2
        src = step.host if step.staged else step.ints
        src = self.ids if src is None else src  # a worker's staged step: read from the packets instead
        ids_from = step.ids_from
        _decode_inputs_kernel[(bs,)](
            src.data_ptr(), self.ids if ids_from is None else ids_from, self.ids,
            self.positions, self.slot_mapping, self.seq_lens, self.block_tables, self.host_off, n, width,
            starts[1], starts[2], starts[3], starts[5], self.block_tables.stride(0), host_off, ptrs, epoch, done,
            rank, IDS_FROM=ids_from is not None, EXCHANGE=exchange,
            BLOCK=min(1024, triton.next_power_of_2(self.block_tables.shape[1])), num_warps=1, **consts,
        )


if triton is not None:
    from llm_service.distributed.ll_allreduce import _call_flag, _end_call, _receive, _send, _table

    @triton.jit
    def _int64s(words, k, field):
        """The int64 value of a row's `field` among its fields' (low, high) word pairs."""
        lo = tl.sum(tl.where(k == 2 * field, words, 0).to(tl.int64)) & 0xFFFFFFFF
        return lo | (tl.sum(tl.where(k == 2 * field + 1, words, 0).to(tl.int64)) << 32)

    @triton.jit(do_not_specialize=["src_addr", "n", "width", "pos_at", "slot_at", "table_at", "lens_at", "host_off"])
    def _decode_inputs_kernel(src_addr, ids_from_ptr, ids_ptr, pos_ptr, slot_ptr, lens_ptr, bt_ptr, host_off_ptr,
                              n, width, pos_at, slot_at, table_at, lens_at, stride_bt, host_off,
                              ptrs_ptr, epoch_ptr, done_ptr, rank,
                              IDS_FROM: tl.constexpr, EXCHANGE: tl.constexpr, WORLD: tl.constexpr,
                              WORLD_P2: tl.constexpr, MAX_WORDS: tl.constexpr, BLOCK: tl.constexpr):
        """Row r of a step's packed ints (PackedStep's sections, at their offsets; read as 4-byte
        words from src_addr, on the device or in pinned host memory) into the static buffers; rows
        n.. of the graph's size are padding: slot -1, seq_len 0. EXCHANGE 1 (rank 0): the words
        the row needs also go to every other rank as the packets of an ll call; 2 (the others):
        they come from those packets instead (ll_allreduce.py; a broadcast is safe there because
        the call after it, the graph's first norm, has rank 0 receive from every rank, which they
        send only once done with this one). Block ids travel as their low word."""
        r = tl.program_id(0)
        if r == 0:
            tl.store(host_off_ptr, host_off.to(tl.int64))
        words_ptr = src_addr.to(tl.pointer_type(tl.int32))
        table = _table(ptrs_ptr, WORLD, WORLD_P2)
        call, half, flag = _call_flag(epoch_ptr)
        if r < n:
            k = tl.arange(0, 8)  # (low, high) words of: the id, the position, the slot, the seq_len
            field = k // 2
            at = tl.where(field == 0, r, tl.where(field == 1, pos_at + r, tl.where(field == 2, slot_at + r,
                                                                                    lens_at + r)))
            offs = 2 * at + k % 2
            if EXCHANGE != 2:
                words = tl.load(words_ptr + offs)  # in flight while the block ids load (host memory: a PCIe trip)
            cols = tl.arange(0, BLOCK)
            for c0 in range(0, width, BLOCK):
                ok = c0 + cols < width
                block_offs = 2 * (table_at + r * width + c0 + cols)
                if EXCHANGE == 2:
                    blocks = _receive(block_offs, ok, table, half, flag, rank, 0, WORLD, WORLD_P2, MAX_WORDS)
                else:
                    blocks = tl.load(words_ptr + block_offs, mask=ok, other=0)
                    if EXCHANGE == 1:
                        _send(blocks, block_offs, ok, table, half, flag, rank, WORLD, WORLD_P2, MAX_WORDS)
                tl.store(bt_ptr + r * stride_bt + c0 + cols, blocks, mask=ok)
            if EXCHANGE == 2:
                words = _receive(offs, k < 8, table, half, flag, rank, 0, WORLD, WORLD_P2, MAX_WORDS)
            else:
                if IDS_FROM:
                    mine = tl.load(ids_from_ptr.to(tl.pointer_type(tl.int32)) + 2 * r + k, mask=k < 2, other=0)
                    words = tl.where(k < 2, mine, words)
                if EXCHANGE == 1:
                    _send(words, offs, k < 8, table, half, flag, rank, WORLD, WORLD_P2, MAX_WORDS)
            tl.store(ids_ptr + r, _int64s(words, k, 0))
            tl.store(pos_ptr + r, _int64s(words, k, 1))
            tl.store(slot_ptr + r, _int64s(words, k, 2))
            tl.store(lens_ptr + r, _int64s(words, k, 3).to(tl.int32))
        else:
            tl.store(slot_ptr + r, -1)
            tl.store(lens_ptr + r, 0)
        if EXCHANGE > 0:
            _end_call(epoch_ptr, done_ptr, call)


RING = 4  # slots of DecodeGraphs' host rings (see there)


class DecodeGraphs:
    """One captured decode graph per ladder size, sharing a memory pool and the buffers.
    Build it after the KV cache exists: the graphs bake in the addresses of the cache (and of
    an int8 cache's scales, which the attention modules hold next to it).

    A graph ends with the LM head's shard of the logits and, where the size allows
    (ParallelLMHead.can_pick: always alone, up to greedy.MAX_PROGRAMS rows under tensor
    parallelism), each row's greedy id picked from the shards (greedy.py): a greedy step then
    needs nothing more, and the whole logits are gathered after the replay only for a step
    that samples or returns them.

    Nothing is copied between host and device around a replay. Rank 0 packs a step's ints into
    a slot of a pinned staging ring (`claim`), the input kernel (`_Buffers.fill`) reads them from
    there (and under tensor parallelism sends them on to the workers' input kernels), and the
    greedy kernel writes the ids into the same slot of a pinned ring of ids, which the engine
    reads once the step is done. A slot is written again RING steps later: by then the host has
    read that step's ids (it reads each decode step's before launching the second after it),
    so its GPU work, and the kernels that read the slot, are done."""

    def __init__(self, model: LlamaForCausalLM, max_batch_size: int, max_blocks: int, device: torch.device):
        self.model = model
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_blocks = max_blocks
        self.picks = {bs: model.lm_head.can_pick(bs) for bs in self.sizes}
        n = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        head = model.lm_head.weight
        with torch.inference_mode():
            self.buf = _Buffers(
                ids=torch.zeros(n, **i64),
                positions=torch.zeros(n, **i64),
                slot_mapping=torch.full((n,), -1, **i64),
                block_tables=torch.zeros(n, max_blocks, **i32),
                cu_seqlens_q=torch.arange(n + 1, **i32),
                seq_lens=torch.zeros(n, **i32),
                shard_logits=torch.zeros(n, head.shape[0], dtype=head.dtype, device=device),
                greedy=torch.zeros(n, **i64),
                host_off=torch.zeros(1, **i64),
            )
        self.host_ids = torch.zeros(RING, n, dtype=torch.int64, pin_memory=True)
        length = -(-PackedStep.decode_length(n, max_blocks) // 16) * 16  # the longest; slots 128-byte aligned
        self.staging = torch.zeros(RING, length, dtype=torch.int64, pin_memory=True)
        self.next_slot = 0
        self._compile_fill(n)
        self.graphs = capture_graphs(self.sizes, self._forward, device)  # captured with the padding values

    def _compile_fill(self, n: int) -> None:
        """The input kernel's variants compiled now, not in the first request's step: every row
        padding. Under tensor parallelism each rank makes two ll calls of its own kind, as many
        as every other rank, so the call counters stay in step."""
        empty = PackedStep([STEP, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0], self.buf.ids)
        staged = PackedStep([STEP, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0], None, host=self.buf.ids)
        for step in (empty, staged):
            for ids_from in (None, self.buf.ids if tp_rank() == 0 else None):
                self.buf.fill(dataclasses.replace(step, ids_from=ids_from), n, 0)

    def _forward(self, bs: int) -> None:
        b = self.buf
        hidden = self.model(b.ids[:bs], b.positions[:bs], b.meta(bs))
        shard = self.model.lm_head.shard_logits(hidden, out=b.shard_logits[:bs])
        if self.picks[bs]:
            self.model.lm_head.greedy(shard, out=b.greedy[:bs], host=(self.host_ids.data_ptr(), b.host_off))

    def covers(self, tokens: int, seqs: int, width: int, num_logits: int, image_rows: int, max_q_len: int) -> bool:
        """Whether a step is a pure decode a graph covers: q_len 1 everywhere, every row
        sampling, no image rows, and within the captured batch and block-table sizes."""
        return (max_q_len == 1 and not image_rows and num_logits == tokens == seqs and tokens <= self.sizes[-1]
                and width <= self.max_blocks)

    def can_run(self, step: PackedStep) -> bool:
        return self.covers(*step.header[1:7])

    def claim(self, tokens: int, width: int) -> tuple[int, torch.Tensor | None]:
        """Rank 0, for a step the graphs cover: its slot of the host rings, and the pinned memory
        to stage its ints in, or None where they cannot travel in the input kernel (under tensor
        parallelism: more rows than programs that may wait on the exchange, or ints past its buffer)."""
        slot = self.next_slot % RING
        self.next_slot += 1
        if tp_size() > 1:
            ll = ll_exchange()
            words = 2 * PackedStep.decode_length(tokens, width)
            if ll is None or pick_batch_size(self.sizes, tokens) > MAX_PROGRAMS or words > ll.max_bytes // 4:
                return slot, None
        return slot, self.staging[slot]

    def run(self, step: PackedStep) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(this rank's shard of the logits [B, shard], the greedy ids [B] or None where the size
        does not pick them, and on rank 0 their copy in pinned host memory, valid once the step is
        done): views of the static outputs, valid until the next replay (the host's until RING
        steps later)."""
        n = step.header[1]
        bs = pick_batch_size(self.sizes, n)
        slot = step.slot if step.slot is not None else 0  # a worker's ids are not read
        b = self.buf
        b.fill(step, bs, slot * self.host_ids.shape[1])
        self.graphs[bs].replay()
        if not self.picks[bs]:
            return b.shard_logits[:n], None, None
        return b.shard_logits[:n], b.greedy[:n], (self.host_ids[slot, :n] if step.slot is not None else None)


SHORT_PREFILL_SIZES = (16, 32, 64)  # one sequence's new tokens (a follow-up turn after a prefix-cache hit)
MAX_GRAPH_PREFILLS = 16  # prompts (chunks) a batched prefill graph holds, beside its decodes


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts of the batched prefill graphs: every 64 up to 1024 (a lone image prompt
    pads by < 64 rows), then 1536, 2048, 3072, 4096, 6144, ... below `max_tokens`, the largest
    step's (the prefill budget, every running sequence's decode and the spare row)."""
    sizes = list(range(64, 1025, 64))
    while sizes[-1] < max_tokens:
        sizes.append(sizes[-1] * 3 // 2 if sizes[-1] & (sizes[-1] - 1) == 0 else sizes[-1] * 4 // 3)
    return [size for size in sizes if size < max_tokens] + [max_tokens]


class PrefillGraphs:
    """Prefill and mixed steps replayed from CUDA graphs, one per token count of a ladder.

    Eagerly, a prefill forward launches ~30 torch ops and kernels a layer from Python, and each
    re-takes the GIL: alone that bounds a short prefill (a follow-up turn's new tokens), and
    under a burst of requests, whose intake keeps other threads on the GIL, it made W2's first
    steps crawl (0.4-0.8 s each for ~0.2 s of GPU work). A graph is one launch.

    A graph of size T has `decode_slots[T]` decode sequences (q_len 1, the split kernel) and
    then `max_prefills` prompt sequences (the prefill kernel); a step's nd decodes and p prompts
    take the first nd and p of them, and the others have no queries and no keys. The step's n
    tokens sit in rows [0, n), decodes first as the scheduler orders them; rows [n, T) belong to
    no sequence (slot -1: nothing stored; no query of them is attended, and nothing reads their
    rows). Graphs captured with image rows keep row T - 1 spare (n < T): the image rows a step
    does not have are written there. The logits are the sampling rows' (the first L rows of the
    output). Shares nothing with DecodeGraphs but the model and the KV cache."""

    def __init__(self, model: LlamaForCausalLM, sizes: list[int], max_decodes: int, max_prefills: int,
                 max_blocks: int, device: torch.device, images: bool):
        self.model = model
        self.sizes = sizes
        # fewer decode slots in the smaller graphs (each empty slot is still a program per head);
        # the largest holds every decode the step may have
        self.decode_slots = {size: min(max_decodes, size // 8) for size in sizes[:-1]} | {sizes[-1]: max_decodes}
        self.max_prefills = max_prefills
        self.max_blocks = max_blocks
        self.spare = 1 if images else 0
        n, a = self.sizes[-1], model.args
        seqs = max(self.decode_slots.values()) + max_prefills
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        dtype = next(model.parameters()).dtype
        with torch.inference_mode():
            self.ids = torch.zeros(n, **i64)
            self.positions = torch.zeros(n, **i64)
            self.slot_mapping = torch.full((n,), -1, **i64)
            self.block_tables = torch.zeros(seqs, max_blocks, **i32)
            self.cu_seqlens_q = torch.zeros(seqs + 1, **i32)
            self.seq_lens = torch.zeros(seqs, **i32)
            self.logits_rows = torch.zeros(seqs, **i64)
            self.image_index = torch.full((n,), n - 1, **i64) if images else None
            self.image_rows = torch.zeros(n, a.hidden_size, dtype=dtype, device=device) if images else None
            self.logits = torch.zeros(seqs, a.vocab_size, dtype=torch.float32, device=device)
        # captured on CUDA; elsewhere (the CPU tests of this layout) each step runs _forward eagerly
        self.graphs = capture_graphs(self.sizes, self._forward, device, before=self._spare_rows) \
            if device.type == "cuda" else None

    def _forward(self, size: int) -> None:
        seqs = self.decode_slots[size] + self.max_prefills
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:seqs],
            cu_seqlens_q=self.cu_seqlens_q[: seqs + 1],
            seq_lens=self.seq_lens[:seqs],
            max_q_len=size,
            num_decodes=self.decode_slots[size],
        )
        images = (self.image_index[:size], self.image_rows[:size]) if self.image_index is not None else (None, None)
        hidden = self.model(self.ids[:size], self.positions[:size], meta, *images)
        self.logits.copy_(self.model.compute_logits(hidden.index_select(0, self.logits_rows)))

    def _spare_rows(self, size: int) -> None:
        """Before capturing size: image rows to its spare row (the warm-up stores nothing)."""
        if self.image_index is not None:
            self.image_index[:size].fill_(size - 1)

    def _size(self, num_rows: int, num_decodes: int) -> int | None:
        """The smallest graph with room for the rows (and the spare one) and the decodes."""
        return next((size for size in self.sizes
                     if size >= num_rows + self.spare and self.decode_slots[size] >= num_decodes), None)

    def can_run(self, num_rows: int, meta: AttentionMetadata, num_image_rows: int) -> bool:
        """Whether a step fits a graph: not a pure decode, at most max_prefills prompts, a size
        with room for its rows and decodes, no image rows unless captured with them, and within
        the captured block-table width."""
        return (
            meta.max_q_len > 1
            and meta.seq_lens.shape[0] - meta.num_decodes <= self.max_prefills
            and self._size(num_rows, meta.num_decodes) is not None
            and (num_image_rows == 0 or self.image_index is not None)
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, logits_rows: torch.Tensor,
            image_index: torch.Tensor | None = None, image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [L, vocab]: a view of the static output, valid until the next replay."""
        n, nd = ids.shape[0], meta.num_decodes
        size = self._size(n, nd)
        slots = self.decode_slots[size]
        b, width = meta.block_tables.shape
        p = b - nd
        self.ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        # sequences: the decodes in slots [0, nd), the prompts in [slots, slots + p); the rest empty
        cu, lens, tables = meta.cu_seqlens_q, meta.seq_lens, meta.block_tables
        if nd:
            self.block_tables[:nd, :width].copy_(tables[:nd], non_blocking=True)
            self.cu_seqlens_q[1 : nd + 1].copy_(cu[1 : nd + 1], non_blocking=True)
            self.seq_lens[:nd].copy_(lens[:nd], non_blocking=True)
        self.cu_seqlens_q[nd + 1 : slots + 1].fill_(nd)
        self.seq_lens[nd:slots].zero_()
        self.block_tables[slots : slots + p, :width].copy_(tables[nd:], non_blocking=True)
        self.cu_seqlens_q[slots + 1 : slots + p + 1].copy_(cu[nd + 1 :], non_blocking=True)
        self.cu_seqlens_q[slots + p + 1 :].fill_(n)
        self.seq_lens[slots : slots + p].copy_(lens[nd:], non_blocking=True)
        self.seq_lens[slots + p :].zero_()
        num_logits = logits_rows.shape[0]
        self.logits_rows[:num_logits].copy_(logits_rows, non_blocking=True)
        self.logits_rows[num_logits:].zero_()  # a larger graph's rows may lie past this one's
        if self.image_index is not None:
            r = 0 if image_index is None else image_index.shape[0]
            if r:
                self.image_index[:r].copy_(image_index, non_blocking=True)
                self.image_rows[:r].copy_(image_rows, non_blocking=True)
            self.image_index[r:size].fill_(size - 1)
        if self.graphs is None:
            self._forward(size)
        else:
            self.graphs[size].replay()
        return self.logits[:num_logits]
