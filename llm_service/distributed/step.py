"""The tensors of one forward step, the flat form they travel in, and the broadcasts.

Rank 0 packs a step's host-side lists into one int64 tensor described by a small header
of sizes, copies it to the device once, and every rank (rank 0 included) unpacks the
same views from it. Nothing is pickled.

Two channels. Under tensor parallelism rank 0 sends each step as
1. the fixed-size header (STEP and the sizes the workers allocate from; or SHUTDOWN; or
   PING, sent now and then while idle) as a host tensor, broadcast on the gloo control
   group (distributed.control_group);
2. the flat ints and, when the step has any, the image rows at full hidden size (every
   rank embeds every token, so every rank fills the image positions), broadcast from the
   device on the default group (NCCL on CUDA): queued on the stream, no host wait. A decode
   step that a CUDA graph replays (`staged`) skips this: its ints go from rank 0's pinned host
   memory to every rank in the graph's input kernel, over the ll exchange, also queued.
The ints stay on the device because, when decode runs ahead (LLMEngine.run_ahead), rank 0
writes the previous step's sampled ids into them there before they reach its host. The
header must not: a worker reading a header from its device (.tolist()) waits for all that
is queued on its stream, i.e. its previous step, so it could queue step N+1 only once its
GPU had finished N, and rank 0's first all-reduce of N+1 would wait out the worker's whole
host turn (wake-up, broadcasts, unpack, graph inputs, launch). With the header on the host
a worker's loop (recv_step, then ModelRunner.forward, which reads no device value) never
waits for its GPU: it queues step N+1 while its GPU still runs N, as rank 0 does. Folding
the ints into the gloo message would save nothing where it matters: the running-ahead decode
has its ids only on the device, and elsewhere each worker would need its own copy to the device.

Order. Rank 0 sends header, ints, rows, step after step, from one thread (the engine's:
PINGs only while no step is in flight) and each worker receives them in that order on one
thread. Each channel delivers in order (gloo: one collective after the other on the control
group; NCCL: in the order the calls queue them), and a worker queues step N's device
broadcasts right after reading header N, so every rank's i-th device broadcast is the same
one, and the model's own collectives follow in the same order on every rank.

No deadlock. Only two things make a host wait: a gloo broadcast (gloo does not buffer:
rank 0's returns once every worker has posted its receive, a worker's once rank 0 has sent),
and rank 0 reading a step's sampled ids (its GPU must finish the step, whose collectives wait
for the workers' GPUs). NCCL broadcasts and collectives are only queued; no host waits in one.
- A worker's host, between two headers, only queues work and is back at the next receive in
  bounded time, so rank 0's send returns: rank 0 never waits in gloo on a worker that waits
  on rank 0.
- Rank 0 sends header N (and queues its side of step N right after, waiting on nothing) before
  it reads step N's ids, and a worker queues its side of step N as soon as header N arrives,
  so the collectives rank 0's GPU waits in are queued on every worker, behind only earlier
  steps, which complete the same way (induction over the steps).
- Even a host wait on the GPU inside a worker's step (the CPU-torch attention's .tolist(), the
  allocator freeing its cache) costs only time: it waits on steps whose every side is queued.
How far ahead: a worker's host trails rank 0's, and the GPUs move together (collectives),
so a worker's queue is never longer than rank 0's. Decoding, that is two steps at most: rank 0
sends header N+2 only after reading step N's ids, i.e. after every GPU passed step N's last
collective. (Steps that sample nothing, a long prompt's chunks before its last, are not read
back, so rank 0 and with it the workers may queue a few of those.)

Failure. A gloo broadcast fails at once when a peer's process is gone (its connection
closes), and after the group timeout when a peer is silent: the PINGs keep an idle worker's
wait for the next header within it. A worker whose rank 0 is gone fails in its receive.
"""
from __future__ import annotations

from array import array

from dataclasses import dataclass

import torch
import torch.distributed as dist

from llm_service.distributed import control_group
from llm_service.layers.attention import AttentionMetadata

HEADER_LEN = 11
STEP, SHUTDOWN, PING = 1, 2, 3  # header[0]: what the workers are to do


@dataclass
class StepInputs:
    """What the model's forward reads; every rank builds the same one."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # int64 [L]: the rows whose logits are sampled
    image_index: torch.Tensor | None = None  # int64 [R]: packed positions image_rows replace
    image_rows: torch.Tensor | None = None  # [R, hidden] in the model's dtype


def _sections(tokens: int, seqs: int, width: int, logits_rows: int, image_rows: int) -> list[int]:
    """The lengths of PackedStep.ints' sections, in order."""
    return [tokens, tokens, tokens, seqs * width, seqs + 1, seqs, logits_rows, image_rows]


@dataclass
class PackedStep:
    """header = [kind, tokens, seqs, table width, logits rows, image rows, max_q_len, num_decodes,
    need_logits, staged, len(ints)]. need_logits: whether rank 0 samples from the whole logits (or
    returns them), which a decode graph that picks greedy ids gathers only then, on every rank.
    staged: the ints stay in rank 0's pinned host memory (`host`), where the decode graph's input
    kernel reads them and, under tensor parallelism, sends them on to the workers
    (cuda_graph._Buffers.fill): no copy to the device and no device broadcast."""

    header: list[int]  # on the host: it travels on the control group
    # int64: ids, positions, slots, block tables, cu_seqlens, seq_lens, logits rows, image index;
    # on the device, or None when staged
    ints: torch.Tensor | None
    image_rows: torch.Tensor | None = None
    # rank 0 alone: the step's ids on the device (a running-ahead decode's, the previous step's
    # samples), read from there instead of from the ints, which hold placeholders for them
    ids_from: torch.Tensor | None = None
    host: torch.Tensor | None = None  # rank 0, staged: the ints in pinned host memory
    slot: int | None = None  # rank 0, a decode graph's step: its slot of the graph's host rings

    @classmethod
    def build(
        cls,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        cu_seqlens: list[int],
        seq_lens: list[int],
        logits_rows: list[int],
        image_index: list[int],
        image_rows: torch.Tensor | None,
        need_logits: bool,
        device: torch.device,
        pinned: torch.Tensor | None = None,
    ) -> "PackedStep":
        """pinned: int64 pinned host memory to stage the ints in (`staged`) instead of copying them
        to the device; at least as long as they are."""
        width = len(tables[0])
        flat = ids + positions + slots + [b for row in tables for b in row] + cu_seqlens + seq_lens + logits_rows
        if image_rows is not None:
            flat += image_index
        q_lens = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
        max_q_len = max(q_lens)
        num_decodes = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
        n_rows = 0 if image_rows is None else image_rows.shape[0]
        header = [STEP, len(ids), len(seq_lens), width, len(logits_rows), n_rows, max_q_len, num_decodes,
                  int(need_logits), int(pinned is not None), len(flat)]
        packed = torch.frombuffer(array("q", flat), dtype=torch.int64)
        if pinned is not None:
            return cls(header, None, image_rows, host=pinned[: len(flat)].copy_(packed))
        return cls(header, _on_device(packed, device), image_rows)  # one copy

    @property
    def staged(self) -> bool:
        return bool(self.header[9])

    @property
    def need_logits(self) -> bool:
        return bool(self.header[8])

    def sizes(self) -> list[int]:
        """The lengths of the sections of `ints`, in order (see its comment)."""
        return _sections(*self.header[1:6])

    @staticmethod
    def decode_length(rows: int, width: int) -> int:
        """len(ints) of a decode step of `rows` sequences, each sampling, over `width` blocks."""
        return sum(_sections(rows, rows, width, rows, 0))

    def unpack(self) -> StepInputs:
        if self.ints is None:
            raise RuntimeError("a step staged for a decode graph has no ints on the device to unpack")
        b, width, _, n_rows, max_q_len, num_decodes = self.header[2:8]
        ids, positions, slots, tables, cu, lens, logits_rows, index = self.ints.split(self.sizes())
        if self.ids_from is not None:
            ids = self.ids_from
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables.view(b, width).to(torch.int32),
            cu_seqlens_q=cu.to(torch.int32),
            seq_lens=lens.to(torch.int32),
            max_q_len=max_q_len,
            num_decodes=num_decodes,
        )
        if not n_rows:
            return StepInputs(ids, positions, meta, logits_rows)
        return StepInputs(ids, positions, meta, logits_rows, index, self.image_rows)


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Through pinned memory without blocking on CUDA: no wait for the GPU's queued work."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def send_step(step: PackedStep) -> None:
    """Rank 0: send `step` (its tensors already on this rank's device): the header from the
    host, then the device tensors, queued on the stream."""
    _send_header(step.header)
    if not step.staged:  # else the decode graph's input kernel sends them
        dist.broadcast(step.ints, src=0)
    if step.image_rows is not None:
        dist.broadcast(step.image_rows, src=0)


def send_control(kind: int) -> None:
    """Rank 0: a header without a step (SHUTDOWN or PING)."""
    _send_header([kind] + [0] * (HEADER_LEN - 1))


def _send_header(header: list[int]) -> None:
    dist.broadcast(torch.tensor(header, dtype=torch.int64), src=0, group=control_group())


def recv_step(device: torch.device, dtype: torch.dtype, hidden_size: int) -> PackedStep | None:
    """Workers: the next step rank 0 sends (PINGs skipped); None on shutdown. Reads no value
    from `device`: the header arrives on the host, the rest is only queued."""
    header_t = torch.empty(HEADER_LEN, dtype=torch.int64)  # on the host
    group = control_group()
    while True:
        dist.broadcast(header_t, src=0, group=group)
        header = header_t.tolist()
        if header[0] != PING:
            break
    if header[0] == SHUTDOWN:
        return None
    if header[0] != STEP:
        raise RuntimeError(f"unknown step header {header}")
    ints = None
    if not header[9]:  # staged: the decode graph's input kernel receives them
        ints = torch.empty(header[-1], dtype=torch.int64, device=device)
        dist.broadcast(ints, src=0)
    rows = None
    if header[5]:
        rows = torch.empty(header[5], hidden_size, dtype=dtype, device=device)
        dist.broadcast(rows, src=0)
    return PackedStep(header, ints, rows)
