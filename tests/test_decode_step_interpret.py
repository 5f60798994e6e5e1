"""The kernels at a decode step's two ends in Triton's CPU interpreter: the graph's inputs, the vocab
shard's embedding sending its rows, and the greedy pick.

greedy.argmax against torch.argmax of the float32 logits: bf16 and fp32, one and several rows,
ties inside a block and across blocks (the first index wins), an all -inf row (index 0), a NaN
(ranked above everything, as torch), padding columns past `valid` that must not count, a
shard's start offset, a vocabulary of several loads, the ids also written to host memory at an
offset read from the device. Then as rank 0 and rank 1 of two, whose
receive buffers are host tensors here with the peer's (value, index) packets already in place:
the id over both shards (a tie between the ranks goes to rank 0, the lower indices), this
rank's pair sent into the peer's slot with the call's flag, and the call counter advanced.

_Buffers.fill against PackedStep.unpack of the same steps: ids (from the ints, or from the
running-ahead ids on the device), positions, slots, seq_lens and the block tables in the static
buffers, the rows past the step padding (slot -1, seq_len 0); from ints on the device and from
staged ones; and over two ranks, rank 0 sending what each row needs as packets (one for each
word of the row's id, position, slot and seq_len, and the low word of each block id) and rank 1
filling from them.

The embedding with `send` as rank 0 and rank 1 of two: the plain kernel's rows, and in the peer's
slot the packets of the next call (bf16 word pairs, fp32 words) carrying them.

Runs as a script in a child process with TRITON_INTERPRET=1 (tests/interpreter.py).
"""
from __future__ import annotations

import sys

import torch

from tests.interpreter import needs_triton, run_script


@needs_triton
def test_decode_step_kernels_in_the_interpreter():
    run_script(__file__)


def _report(name: str, ok: bool) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def _alone(gen) -> list[bool]:
    from llm_service.distributed.greedy import argmax

    oks = []
    for dtype in (torch.bfloat16, torch.float32):
        for rows, vocab in ((1, 1000), (3, 40000)):
            x = torch.randn(rows, vocab, generator=gen).to(dtype)
            got = argmax(x, 0, vocab)
            oks.append(_report(f"argmax {rows}x{vocab} {dtype}", torch.equal(got, x.float().argmax(-1))))
        x = torch.randn(4, 20000, generator=gen).to(dtype)
        x[0, [7, 300, 19000]] = 50.0  # ties: one load's lanes, and across loads
        x[1, [16390, 16391]] = 50.0  # only past the first load
        x[2] = float("-inf")
        x[3, 5000], x[3, 9000] = 80.0, float("nan")
        oks.append(_report(f"argmax ties, -inf and NaN {dtype}",
                           torch.equal(argmax(x, 0, 20000), x.float().argmax(-1))))
        ring, off = torch.full((3, 8), -1), torch.tensor([8])  # the ids also into ring row 1
        got = argmax(x, 0, 20000, host=(ring.data_ptr(), off))
        oks.append(_report(f"argmax into host memory at the device-held offset {dtype}",
                           torch.equal(ring[1, :4], got) and bool((ring[1, 4:] == -1).all())
                           and bool((ring[[0, 2]] == -1).all())))
        padded = torch.randn(2, 1030, generator=gen).to(dtype)
        padded[:, 1000:] = 99.0  # a padded last shard's columns
        got = argmax(padded, 500, 1000)
        oks.append(_report(f"argmax of a shard from 500, padding ignored {dtype}",
                           torch.equal(got, padded[:, :1000].float().argmax(-1) + 500)))
    return oks


def _as_rank(gen) -> list[bool]:
    """Each rank of two with the other's packets already in its receive buffer."""
    from llm_service.distributed.greedy import argmax
    from llm_service.distributed.ll_allreduce import LLAllReduce

    world, max_bytes, shard = 2, 4096, 700
    words = max_bytes // 4
    oks = []
    for case in ("random", "tie across ranks"):
        full = torch.randn(3, world * shard, generator=gen).to(torch.bfloat16)
        if case != "random":
            full[:, [10, shard + 10]] = 40.0
            full[1, 5] = 41.0
            full[2, shard + 600] = 42.0
        want = full.float().argmax(-1)
        for rank in range(world):
            bufs = [torch.zeros(2 * world * words, dtype=torch.int64) for _ in range(world)]
            table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
            done = 4 + rank  # calls so far
            call = done + 1
            flag = call % 0xFFFFFFFF + 1
            peer = 1 - rank
            p_shard = full[:, peer * shard:(peer + 1) * shard].float()
            p_val, p_idx = p_shard.max(-1)
            p_idx = p_shard.argmax(-1) + peer * shard
            pairs = torch.stack([p_val.view(torch.int32), p_idx.to(torch.int32)], -1).flatten()
            start = (call % 2 * world + peer) * words
            bufs[rank][start: start + pairs.numel()] = (flag << 32) | (pairs.to(torch.int64) & 0xFFFFFFFF)
            epoch = torch.tensor([done])
            ll = LLAllReduce(bufs[rank], None, table, epoch, torch.zeros(1, dtype=torch.int32), rank, world, max_bytes)
            got = argmax(full[:, rank * shard:(rank + 1) * shard].contiguous(), rank * shard, shard, ll)
            mine = full[:, rank * shard:(rank + 1) * shard].float()
            m_pairs = torch.stack([mine.max(-1).values.view(torch.int32),
                                   (mine.argmax(-1) + rank * shard).to(torch.int32)], -1).flatten()
            out_start = (call % 2 * world + rank) * words
            slot = bufs[peer][out_start: out_start + m_pairs.numel()]
            sent_ok = bool((((slot >> 32) & 0xFFFFFFFF) == flag).all()) and torch.equal(
                (slot & 0xFFFFFFFF).to(torch.int32), m_pairs)
            oks.append(_report(f"argmax over two ranks ({case}) as rank {rank}: the id over both shards, "
                               "this rank's pair sent, the counter advanced",
                               torch.equal(got, want) and sent_ok and int(epoch) == call))
    return oks


def _buffers(n_max: int, max_blocks: int):
    from llm_service.engine.cuda_graph import _Buffers

    return _Buffers(ids=torch.full((n_max,), -7), positions=torch.full((n_max,), -7),
                    slot_mapping=torch.full((n_max,), -7),
                    block_tables=torch.full((n_max, max_blocks), -7, dtype=torch.int32),
                    cu_seqlens_q=torch.arange(n_max + 1, dtype=torch.int32),
                    seq_lens=torch.full((n_max,), -7, dtype=torch.int32), shard_logits=torch.zeros(n_max, 4),
                    greedy=torch.zeros(n_max, dtype=torch.int64), host_off=torch.zeros(1, dtype=torch.int64))


def _filled_as_unpacked(buf, want, n: int, bs: int, width: int) -> bool:
    pad = bs - n
    return (torch.equal(buf.ids[:n], want.input_ids) and torch.equal(buf.positions[:n], want.positions)
            and torch.equal(buf.slot_mapping[:n], want.meta.slot_mapping)
            and torch.equal(buf.seq_lens[:n], want.meta.seq_lens)
            and torch.equal(buf.block_tables[:n, :width], want.meta.block_tables)
            and torch.equal(buf.slot_mapping[n:bs], torch.full((pad,), -1))
            and torch.equal(buf.seq_lens[n:bs], torch.zeros(pad, dtype=torch.int32))
            and bool((buf.ids[bs:] == -7).all()) and bool((buf.block_tables[:, width:] == -7).all()))


def _fill(gen) -> list[bool]:
    """Alone: from ints on the device and from staged (pinned) ints, the ids packed or running ahead."""
    from llm_service.distributed.step import PackedStep

    n_max, max_blocks, cpu = 8, 70, torch.device("cpu")
    oks = []
    for n, width, bs, ahead, staged in ((1, 3, 1, False, False), (3, 66, 4, True, False), (5, 1, 8, False, True),
                                         (2, 40, 2, True, True)):
        buf = _buffers(n_max, max_blocks)
        ids = torch.randint(0, 1000, (n,), generator=gen).tolist()
        tables = torch.randint(0, 500, (n, width), generator=gen).tolist()
        lens = torch.randint(1, 4000, (n,), generator=gen).tolist()
        slots = torch.randint(0, 30000, (n,), generator=gen).tolist()
        args = ([0] * n if ahead else ids, [x - 1 for x in lens], slots, tables, list(range(n + 1)), lens,
                list(range(n)), [], None, False, cpu)
        step = PackedStep.build(*args, torch.zeros(200, dtype=torch.int64) if staged else None)
        if ahead:
            step.ids_from = torch.tensor(ids)
        buf.fill(step, bs, 40 + n)
        want = PackedStep.build(*args)
        if ahead:
            want.ids_from = torch.tensor(ids)
        ok = (_filled_as_unpacked(buf, want.unpack(), n, bs, width) and int(buf.host_off) == 40 + n
              and step.staged == staged and (step.ints is None) == staged)
        oks.append(_report(f"graph inputs from {'staged' if staged else 'device'} ints: {n} rows of {bs}, table "
                           f"width {width}, ids {'running ahead' if ahead else 'packed'}", ok))
    return oks


def _fill_over_ranks(gen) -> list[bool]:
    """Staged under tensor parallelism: rank 0 fills from its staged ints (and the running-ahead
    ids) and sends what each row needs as one ll call's packets; rank 1 fills from those packets."""
    from llm_service.distributed.ll_allreduce import LLAllReduce
    from llm_service.distributed.step import PackedStep
    from llm_service.engine import cuda_graph

    world, max_bytes, n, width, bs = 2, 16384, 3, 5, 4
    words = max_bytes // 4
    bufs = [torch.zeros(2 * world * words, dtype=torch.int64) for _ in range(world)]
    table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    ids = torch.randint(0, 1000, (n,), generator=gen)
    tables = torch.randint(0, 500, (n, width), generator=gen).tolist()
    lens = torch.randint(1, 4000, (n,), generator=gen).tolist()
    args = ([0] * n, [x - 1 for x in lens], [5, 6, 7], tables, list(range(n + 1)), lens, list(range(n)), [], None,
            False, torch.device("cpu"))
    sent = PackedStep.build(*args, torch.zeros(100, dtype=torch.int64), )
    sent.ids_from = ids
    want = PackedStep.build(*args)
    want.ids_from = ids
    want = want.unpack()
    oks, done = [], 8
    real = cuda_graph.ll_exchange
    try:
        for rank in range(world):
            epoch = torch.tensor([done])
            ll = LLAllReduce(bufs[rank], None, table, epoch, torch.zeros(1, dtype=torch.int32), rank, world, max_bytes)
            cuda_graph.ll_exchange = lambda ll=ll: ll
            buf = _buffers(8, 16)
            step = sent if rank == 0 else PackedStep(list(sent.header), None)  # a worker's: the header alone
            buf.fill(step, bs, 0)
            ok = _filled_as_unpacked(buf, want, n, bs, width) and int(epoch) == done + 1
            if rank == 0:
                call = done + 1
                start = (call % 2 * world) * words
                slot = bufs[1][start: start + words]
                ok &= bool(((((slot >> 32) & 0xFFFFFFFF) == call % 0xFFFFFFFF + 1).sum()) == n * (8 + width))
            oks.append(_report(f"graph inputs over two ranks as rank {rank}: "
                               f"{'staged ints sent' if rank == 0 else 'received'}, the buffers as unpacked", ok))
    finally:
        cuda_graph.ll_exchange = real
    return oks


def _embedding_sends(gen) -> list[bool]:
    from llm_service.distributed.ll_allreduce import LLAllReduce
    from llm_service.layers.triton_fused import embedding

    world, max_bytes, hidden = 2, 16384, 1536  # two column blocks of 1024, the second partly masked
    words = max_bytes // 4
    oks = []
    for dtype in (torch.bfloat16, torch.float32):
        for rank in range(world):
            bufs = [torch.zeros(2 * world * words, dtype=torch.int64) for _ in range(world)]
            table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
            done = 2 + rank
            ll = LLAllReduce(bufs[rank], None, table, torch.tensor([done]), torch.zeros(1, dtype=torch.int32),
                             rank, world, max_bytes)
            weight = torch.randn(50, hidden, generator=gen).to(dtype)
            ids = torch.tensor([3, 120, 49])  # the middle one in another shard: zeros
            got = embedding(ids, weight, 0, send=ll)
            plain = embedding(ids, weight, 0)
            call = done + 1
            start = (call % 2 * world + rank) * words
            slot = bufs[1 - rank][start: start + plain.numel() * plain.element_size() // 4]
            flags_ok = bool((((slot >> 32) & 0xFFFFFFFF) == call % 0xFFFFFFFF + 1).all())
            sent = (slot & 0xFFFFFFFF).to(torch.int32).view(dtype).view(3, hidden)
            oks.append(_report(f"embedding sending its rows {dtype} as rank {rank}: the plain rows, in the "
                               "peer's slot with this call's flag",
                               torch.equal(got, plain) and flags_ok and torch.equal(sent, plain)
                               and not plain[1].any()))
    return oks


def _main() -> int:
    gen = torch.Generator().manual_seed(0)
    oks = _fill(gen) + _fill_over_ranks(gen) + _embedding_sends(gen) + _alone(gen) + _as_rank(gen)
    if all(oks):
        print("all ok")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(_main())
