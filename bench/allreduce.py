"""All-reduce at tp=2: symmetric memory (llm_service/distributed/symm_allreduce.py: torch's one-shot
op, `symm`, and the barrier-free Triton kernel of ll_allreduce.py, `ll`) against NCCL (issue 4).

Spawns one process per GPU (2 by default) and joins them through `start_group` with PRISM_ALLREDUCE=ll
(the engine's own set-up; both kernels), then for each path of --paths (default symm,ll):

1. checks: for [1,4096], [8,4096], [64,4096] in bf16 and fp32, `all_reduce(x)` eagerly and replayed
   from a CUDA graph must equal NCCL's `dist.all_reduce` bit for bit and be bit-identical on every
   rank; 48 eager calls of mixed sizes back to back; a graph mixing our path and NCCL (fp16, too large);
   and a chain of 64 dependent all-reduces in one graph, replayed 20 times, against the same chain
   through NCCL (a buffer reused before a peer had read it would show here); with `ll`, the fused
   all-reduce + residual add + RMSNorm against NCCL + the norm kernel (eager, and in a graph chain
   interleaved with plain all-reduces), the all-gather of the last dimension against NCCL's
   all_gather + cat, and a graph of GEMVs (every other one sending its partial sums), fused norms
   and a gather, all launched with PDL, against the same kernels launched one at a time;
2. timing (unless --check-only): us per all-reduce, 64 back to back in one CUDA graph, replayed, for
   8 KB .. 8 MiB bf16 (past the serving thresholds too): NCCL, symm, ll (up to its 512 KB) and torch's
   two-shot (copy in, two_shot_all_reduce_, copy out); the same eagerly (host launch included); and a
   decode-like graph, 64 x ([1,2048] @ [2048,4096] bf16 as in a tp=2 o_proj, then its all-reduce); and
   all-reduce + residual add + RMSNorm of [1,4096] bf16: fused against ll or symm followed by the norm.

--e2e-mode MODE instead times the engine's whole decode step at tp=2 with PRISM_ALLREDUCE=MODE
(bench/decode_graphs.py's model: Llama-2-7B layer shapes x --e2e-layers, bf16); one mode per process.

    python bench/allreduce.py [--check-only] [--paths symm,ll] [--out DIR]
    python bench/allreduce.py --e2e-mode {nccl,symm,ll} [--e2e-layers 8] [--e2e-batch-sizes 1,8]

Prints `CHECK ... ok|FAIL` lines, then tables; writes allreduce.json (e2e_MODE.json) to --out ($OUT if
set). Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off, here and in every child
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_service import distributed as tp  # noqa: E402
from llm_service.distributed import symm_allreduce  # noqa: E402
from llm_service.layers.triton_fused import rms_norm  # noqa: E402
from llm_service.layers.triton_gemv import gemv  # noqa: E402

SHAPES = [(1, 4096), (8, 4096), (64, 4096)]
DTYPES = [torch.bfloat16, torch.float32]
SIZES_KB = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
CALLS, REPLAYS, CHAIN, CHAIN_REPLAYS = 64, 20, 64, 20
EPS = 1e-5  # RMSNorm's


def _inputs(shape, dtype, rank: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 101 + rank)
    return (torch.randn(shape, generator=g) * (1 + rank)).to(dtype).to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes, so that -0.0 != 0.0 and NaN == NaN (uint8: NCCL and gloo gather it)."""
    return t.contiguous().view(torch.uint8)


def _nccl(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(_bits(t)) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, _bits(t))
    return all(torch.equal(parts[0], p) for p in parts)


def _agree(ok: bool, device) -> bool:
    """A check passes only where it passed on every rank."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class Checks:
    def __init__(self, rank: int, device):
        self.rank, self.device, self.results = rank, device, []

    def record(self, name: str, ok: bool) -> None:
        ok = _agree(ok, self.device)
        self.results.append((name, ok))
        if self.rank == 0:
            print(f"CHECK {name}: {'ok' if ok else 'FAIL'}", flush=True)

    def exact(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        self.exact_as(f"{name} == NCCL", got, want)

    def exact_as(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        self.record(name, torch.equal(_bits(got), _bits(want)))
        self.record(f"{name}: same bits on every rank", _same_on_all_ranks(got))


PATHS = ["symm", "ll"]  # --paths


def variants(fast) -> dict:
    """The paths to check and time: torch's one-shot op alone (`symm`), and with the Triton kernel
    below LL_MAX_BYTES (`ll`) when it was set up."""
    out = {}
    if fast is not None and "symm" in PATHS:
        out["symm"] = dataclasses.replace(fast, ll=None)
    if fast is not None and fast.ll is not None and "ll" in PATHS:
        out["ll"] = fast
    return out


def check(rank: int, device) -> list:
    c = Checks(rank, device)
    fast = tp._TP.fast
    c.record("symmetric-memory path active", fast is not None)
    if "ll" in PATHS:
        c.record("Triton kernel active", fast is not None and fast.ll is not None)
    if fast is None:
        return c.results
    c.record("no multicast mapping", not getattr(fast.handle, "multicast_ptr", 0))
    for name, variant in variants(fast).items():
        tp._TP.fast = variant  # what tp.all_reduce dispatches to
        try:
            _check_variant(c, name, variant, rank, device)
        finally:
            tp._TP.fast = fast
    if fast.ll is not None:
        _check_norm(c, fast, rank, device)
        _check_gather(c, fast, rank, device)
        _check_greedy(c, fast, rank, device)
        _check_embedding_norm(c, fast, rank, device)
        _check_pdl_chain(c, fast, rank, device)
    torch.cuda.synchronize()
    return c.results


def _nccl_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def _check_gather(c: Checks, fast, rank: int, device) -> None:
    """ll_allreduce's all-gather of the last dimension (the LM head's vocab shards) against NCCL's
    all_gather + cat, bit for bit and on every rank: eagerly, and replayed from a graph in which it
    shares the call counter and receive halves with plain and fused all-reduces."""
    shapes = [(1, 16032), (4, 16032), (16, 16032), (3, 40)]
    for dtype in DTYPES:
        for shape in shapes:
            x = _inputs(shape, dtype, rank, 90 + shape[0], device)
            fits = fast.ll.fits_gather(x)
            c.record(f"gather {list(shape)} {dtype}: {'fits' if fits else 'too large'}",
                     fits == (x.numel() * x.element_size() <= fast.ll.max_bytes))
            if fits:
                c.exact(f"gather eager {list(shape)} {dtype}", fast.ll.all_gather_last_dim(x), _nccl_gather(x))
    statics = [torch.zeros(1, 16032, dtype=torch.bfloat16, device=device),
               torch.zeros(1, 4096, dtype=torch.bfloat16, device=device)]
    res0 = _inputs((1, 4096), torch.bfloat16, 0, 95, device)
    res, w = res0.clone(), _inputs((4096,), torch.bfloat16, 0, 96, device) * 0.1 + 1
    outs = []
    graph = _capture(lambda: outs.extend([fast.ll.all_gather_last_dim(statics[0]),
                                          fast.ll.reduce_rms_norm_(tp.all_reduce(statics[1]), res, w, EPS),
                                          fast.ll.all_gather_last_dim(statics[0] * 2)]))
    for trial in range(2):
        inputs = [_inputs(t.shape, t.dtype, rank, 97 + trial, device) for t in statics]
        for t, x in zip(statics, inputs):
            t.copy_(x)
        res.copy_(res0)
        graph.replay()
        c.exact(f"gather in a graph, replay {trial}", outs[0], _nccl_gather(inputs[0]))
        c.exact(f"gather in a graph after a fused norm, replay {trial}", outs[2], _nccl_gather(inputs[0] * 2))


def _check_greedy(c: Checks, fast, rank: int, device) -> None:
    """greedy.argmax over the ranks' vocab shards against torch.argmax of NCCL's gather: ties
    within a shard and across the ranks (the lower index wins), 1 .. MAX_PROGRAMS rows, bf16 and
    fp32, the same ids on every rank; eagerly, and replayed from a graph in which it shares the
    call counter with a fused norm and a gather."""
    from llm_service.distributed import greedy

    shard = 16016
    for dtype in DTYPES:
        for rows in (1, 3, 8, greedy.MAX_PROGRAMS):
            x = _inputs((rows, shard), dtype, rank, 110 + rows, device)
            x[0, 100] = x[0, 9000] = 30.0  # on every rank: a tie within each shard and across the ranks
            if rows > 1:
                x[1, 5] = 31.0 + rank  # the higher rank's larger
            want = _nccl_gather(x).float().argmax(-1)
            c.record(f"greedy {rows}x{shard} per rank {dtype}: fits", greedy.fits(rows, fast.ll))
            got = greedy.argmax(x, rank * shard, shard, fast.ll)
            c.exact_as(f"greedy {rows}x{shard} per rank {dtype} == argmax of the gathered logits", got, want)
    statics = [torch.zeros(2, shard, dtype=torch.bfloat16, device=device),
               torch.zeros(1, 4096, dtype=torch.bfloat16, device=device)]
    res = torch.zeros(1, 4096, dtype=torch.bfloat16, device=device)
    w = _inputs((4096,), torch.bfloat16, 0, 120, device) * 0.1 + 1
    outs = []
    graph = _capture(lambda: outs.extend([fast.ll.reduce_rms_norm_(statics[1], res, w, EPS),
                                          greedy.argmax(statics[0], rank * shard, shard, fast.ll),
                                          fast.ll.all_gather_last_dim(statics[0])]))
    for trial in range(2):
        x = _inputs(statics[0].shape, torch.bfloat16, rank, 121 + trial, device)
        statics[0].copy_(x)
        statics[1].copy_(_inputs((1, 4096), torch.bfloat16, rank, 123 + trial, device))
        graph.replay()
        c.exact_as(f"greedy in a graph, replay {trial} == argmax of the gathered logits", outs[1],
                   _nccl_gather(x).float().argmax(-1))
        c.exact(f"gather after greedy in a graph, replay {trial}", outs[2], _nccl_gather(x))


def _check_embedding_norm(c: Checks, fast, rank: int, device) -> None:
    """The vocab shard's embedding sending its rows, and the first norm summing them without a
    residual (the sum stored into x), against NCCL's sum + the norm kernel: the sum bit for bit,
    the output within a bf16 rounding, the same bits on every rank."""
    from llm_service.layers.triton_fused import embedding

    for dtype in DTYPES:
        for rows in (1, 8):
            weight = _inputs((500, 4096), dtype, rank, 130, device)
            ids = torch.arange(rows, device=device) * 97 % 1000  # ids of both shards
            w = _inputs((4096,), dtype, 0, 131, device) * 0.1 + 1
            want_x = _nccl(embedding(ids, weight, rank * 500))
            want = rms_norm(want_x, w, EPS)
            x = embedding(ids, weight, rank * 500, send=fast.ll)  # pending: the norm only receives
            got = fast.ll.reduce_rms_norm_(x, None, w, EPS)
            name = f"embedding sent, norm without residual {rows}x4096 {dtype}"
            c.exact(f"{name}: the summed rows", x, want_x)
            c.record(f"{name}: output ~ NCCL + norm", torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))
            c.record(f"{name}: same bits on every rank", _same_on_all_ranks(got))


def _check_pdl_chain(c: Checks, fast, rank: int, device) -> None:
    """A decoder's kernels back to back, all launched with PDL (layers/pdl.py): Triton GEMV ->
    fused all-reduce + norm -> GEMV ..., every other GEMV sending its partial sums itself (the norm
    after it only receives), then the gathered head, in a graph replayed on new inputs, against
    the same kernels launched one at a time (a host sync after each, so none overlaps) and none
    sending: the same bits. A kernel that read its input before its predecessor finished would
    read the previous replay's values."""
    g = torch.Generator(device=device).manual_seed(rank)  # row-parallel weights: each rank its own
    ws = [(torch.randn(4096, 4096, generator=g, device=device) * 0.02).to(torch.bfloat16) for _ in range(4)]
    head = (torch.randn(8016, 4096, generator=g, device=device) * 0.02).to(torch.bfloat16)
    w = _inputs((4096,), torch.bfloat16, 0, 98, device) * 0.1 + 1
    h0 = torch.zeros(1, 4096, dtype=torch.bfloat16, device=device)
    res = torch.zeros(1, 4096, dtype=torch.bfloat16, device=device)

    def chain(one_at_a_time: bool):
        def launch(fn, *args, **kw):
            out = fn(*args, **kw)
            if one_at_a_time:
                torch.cuda.synchronize()
            return out

        h = h0
        for i in range(16):  # in the graph every other GEMV sends its partial sums itself
            sender = fast.ll if i % 2 and not one_at_a_time else None
            x = launch(gemv, h, ws[i % 4], send=sender)  # sent: pending, the norm only receives
            h = launch(fast.ll.reduce_rms_norm_, x, res, w, EPS)
        return launch(fast.ll.all_gather_last_dim, launch(gemv, h, head))

    out = []
    graph = _capture(lambda: out.append(chain(False)))
    for trial in range(2):
        start = _inputs((1, 4096), torch.bfloat16, rank, 99 + trial, device)
        res0 = _inputs((1, 4096), torch.bfloat16, 0, 100 + trial, device)
        h0.copy_(start)
        res.copy_(res0)
        graph.replay()
        got = out[0].clone()
        res.copy_(res0)
        c.exact_as(f"PDL chain of GEMV, fused norm and gather in a graph, replay {trial}", got, chain(True))


def _unfused(x, residual, weight):
    """NCCL's sum, then the decoder's residual add + RMSNorm kernel: what the fused kernel replaces."""
    return rms_norm(_nccl(x), weight, EPS, residual)


def _check_norm(c: Checks, fast, rank: int, device) -> None:
    """ll_allreduce's fused all-reduce + residual add + RMSNorm against NCCL + the norm kernel:
    the residual bit for bit, the output within a bf16 rounding (the sum of squares is taken in
    another order), the same bits on every rank; eagerly and in a graph that interleaves it with
    plain all-reduces (they share the call counter and the receive halves)."""
    for dtype in DTYPES:
        for rows in (1, 4, 8):
            x = _inputs((rows, 4096), dtype, rank, rows, device)
            res = _inputs((rows, 4096), dtype, 0, 50 + rows, device)  # the residual is the same on every rank
            w = _inputs((4096,), dtype, 0, 60, device) * 0.1 + 1
            name = f"fused norm {rows}x4096 {dtype}"
            c.record(f"{name} fits", fast.ll.fits_rms_norm(x, res))
            want_res = res.clone()
            want = _unfused(x.clone(), want_res, w)
            got_res = res.clone()
            got = fast.ll.reduce_rms_norm_(x.clone(), got_res, w, EPS)
            c.record(f"{name}: residual == NCCL + add", torch.equal(_bits(got_res), _bits(want_res)))
            c.record(f"{name}: output ~ NCCL + norm", torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))
            c.record(f"{name}: same bits on every rank", _same_on_all_ranks(got))
            # the same sums made by a GEMV that sends them itself: the norm only receives
            h = _inputs((rows, 1024), dtype, rank, 40 + rows, device)
            wt = _inputs((4096, 1024), dtype, rank, 41, device) * 0.05
            plain = gemv(h, wt)
            sent = gemv(h, wt, send=fast.ll)  # pending: the norm only receives
            sent_res, plain_res = res.clone(), res.clone()
            got_sent = fast.ll.reduce_rms_norm_(sent, sent_res, w, EPS)
            got_plain = fast.ll.reduce_rms_norm_(plain.clone(), plain_res, w, EPS)
            c.record(f"{name}, sent by the GEMV: partial sums as the plain GEMV's", torch.equal(_bits(sent), _bits(plain)))
            c.exact_as(f"{name}, sent by the GEMV: residual as sent by the norm", sent_res, plain_res)
            c.exact_as(f"{name}, sent by the GEMV: output as sent by the norm", got_sent, got_plain)
    xs = [_inputs((1, 4096), torch.bfloat16, rank, 70 + i, device) for i in range(4)]
    res0 = _inputs((1, 4096), torch.bfloat16, 0, 80, device)
    w = _inputs((4096,), torch.bfloat16, 0, 81, device) * 0.1 + 1
    statics = [t.clone() for t in xs]
    res = res0.clone()

    def layers(fused):
        h = statics[0]
        for i in range(CHAIN):  # a decoder's pattern: reduce + norm, then a plain all-reduce
            h = fused(h * 0.5 + statics[i % 4], res, w)
            tp.all_reduce(h)
        return h

    graph = _capture(lambda: statics.append(layers(lambda h, r, w: fast.ll.reduce_rms_norm_(h, r, w, EPS))))
    out = statics.pop()
    for trial in range(2):
        res.copy_(res0)
        graph.replay()
        got, got_res = out.clone(), res.clone()
        res.copy_(res0)
        want = layers(_unfused)
        c.record(f"fused norm: chain of {CHAIN} in a graph, replay {trial}: residual close",
                 torch.allclose(got_res.float(), res.float(), rtol=5e-2, atol=5e-2))
        c.record(f"fused norm: chain of {CHAIN} in a graph, replay {trial}: output close",
                 torch.allclose(got.float(), want.float(), rtol=5e-2, atol=5e-2))
        c.record(f"fused norm: chain replay {trial}: same bits on every rank", _same_on_all_ranks(got))


def _check_variant(c: Checks, name: str, fast, rank: int, device) -> None:
    cases = [(s, d) for d in DTYPES for s in SHAPES]
    for shape, dtype in cases:  # eager
        x = _inputs(shape, dtype, rank, 0, device)
        want, got = _nccl(x.clone()), x.clone()
        nbytes = got.numel() * got.element_size()
        c.record(f"{name}: {'fits' if nbytes <= fast.max_bytes else 'too large for'} {list(shape)} {dtype}",
                 fast.fits(got) == (nbytes <= fast.max_bytes))
        tp.all_reduce(got)
        c.exact(f"{name}: eager {list(shape)} {dtype}", got, want)
    ok = True  # eager calls of changing sizes and dtypes, back to back
    g = torch.Generator().manual_seed(5)
    for i in range(48):
        shape, dtype = cases[int(torch.randint(len(cases), (1,), generator=g))]
        x = _inputs(shape, dtype, rank, 100 + i, device)
        want, got = _nccl(x.clone()), x.clone()
        tp.all_reduce(got)
        ok &= torch.equal(_bits(got), _bits(want)) and _same_on_all_ranks(got)
    c.record(f"{name}: 48 eager calls of mixed sizes == NCCL, same bits on every rank", ok)
    statics = [torch.zeros(s, dtype=d, device=device) for s, d in cases]
    graph = _capture(lambda: [tp.all_reduce(t) for t in statics])
    for trial in range(1, 3):  # each replay reads what the statics hold now
        inputs = [_inputs(s, d, rank, trial, device) for s, d in cases]
        for t, x in zip(statics, inputs):
            t.copy_(x)
        graph.replay()
        for (shape, dtype), t, x in zip(cases, statics, inputs):
            c.exact(f"{name}: graph replay {trial} {list(shape)} {dtype}", t, _nccl(x.clone()))
    mixed = [torch.zeros(1, 4096, dtype=torch.bfloat16, device=device),
             torch.zeros(1, 4096, dtype=torch.float16, device=device),  # NCCL: dtype
             torch.zeros(fast.max_bytes // 8192 + 2, 4096, dtype=torch.bfloat16, device=device),  # NCCL: size
             torch.zeros(8, 4096, dtype=torch.float32, device=device)]
    c.record(f"{name}: mixed graph takes both paths", [fast.fits(t) for t in mixed] == [True, False, False, True])
    graph = _capture(lambda: [tp.all_reduce(t) for t in mixed])
    inputs = [_inputs(t.shape, t.dtype, rank, 7, device) for t in mixed]
    for t, x in zip(mixed, inputs):
        t.copy_(x)
    graph.replay()
    for t, x in zip(mixed, inputs):
        c.exact(f"{name}: mixed graph {list(t.shape)} {t.dtype}", t, _nccl(x.clone()))
    # a chain of dependent all-reduces: ours in a graph against NCCL eagerly
    bias = _inputs((1, 4096), torch.bfloat16, rank, 9, device) * 0.01
    start = _inputs((1, 4096), torch.bfloat16, rank, 8, device)
    x = start.clone()

    def chain(reduce):
        for _ in range(CHAIN):  # each rank adds its own bias, then the ranks agree again
            x.mul_(0.5).add_(bias)
            reduce(x)

    graph = _capture(lambda: chain(tp.all_reduce))
    x.copy_(start)
    for _ in range(CHAIN_REPLAYS):
        graph.replay()
    got = x.clone()
    x.copy_(start)
    for _ in range(CHAIN_REPLAYS):
        chain(_nccl)
    c.exact(f"{name}: chain of {CHAIN}x{CHAIN_REPLAYS} in a graph", got, x)


def _capture(fn) -> torch.cuda.CUDAGraph:
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def _timed(fn, device, replays: int) -> float:
    """ms per call of fn(), both ranks started together."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(replays):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / replays


def timing(rank: int, device) -> dict:
    fast = tp._TP.fast

    def two_shot(x):
        symm = fast.buffer.view(x.dtype)[: x.numel()].view(x.shape)
        symm.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_(symm, "sum", fast.group_name)
        x.copy_(symm)

    methods = {"nccl": _nccl}
    for name, variant in variants(fast).items():
        methods[name] = variant.ll.reduce_ if name == "ll" else variant.reduce_
    if fast is not None:
        methods["two_shot"] = two_shot
    rows = []
    for kb in SIZES_KB:
        x = torch.randn(kb * 1024 // 2, device=device).to(torch.bfloat16)
        row = {"kb": kb}
        for name, fn in methods.items():
            if name == "ll" and not fast.ll.fits(x):
                continue
            try:
                fn(x)
                graph = _capture(lambda: [fn(x) for _ in range(CALLS)])
                row[f"{name}_graph_us"] = _timed(graph.replay, device, REPLAYS) * 1e3 / CALLS
                row[f"{name}_eager_us"] = _timed(lambda: [fn(x) for _ in range(CALLS)], device, 5) * 1e3 / CALLS
            except Exception as e:  # noqa: BLE001 - report, keep timing the others
                row[f"{name}_error"] = repr(e)[:200]
        rows.append(row)
        if rank == 0:
            print("TIME", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
    # decode-like: 64 x (row-parallel matmul, all-reduce), the weights rotating past L2
    ws = [torch.randn(2048, 4096, device=device).to(torch.bfloat16) * 0.02 for _ in range(8)]
    h = torch.randn(1, 2048, device=device).to(torch.bfloat16)
    h @ ws[0]  # cuBLAS makes its handle outside the capture
    decode = {}
    for name, fn in [("none", lambda y: y)] + list(methods.items()):
        if name == "two_shot":
            continue
        graph = _capture(lambda: [fn(h @ ws[i % len(ws)]) for i in range(CALLS)])
        decode[f"{name}_ms"] = _timed(graph.replay, device, REPLAYS)
    if rank == 0:
        print("DECODE-LIKE", json.dumps({k: round(v, 4) for k, v in decode.items()}), flush=True)
    norm = {}
    if fast is not None and fast.ll is not None:  # all-reduce + residual add + RMSNorm of [1, 4096] bf16
        x, res = torch.randn(1, 4096, device=device).to(torch.bfloat16), torch.zeros(1, 4096, device=device)
        res, w = res.to(torch.bfloat16), torch.ones(4096, device=device).to(torch.bfloat16)
        for name, fn in (("fused", lambda: fast.ll.reduce_rms_norm_(x, res, w, EPS)),
                         ("ll_then_norm", lambda: rms_norm(fast.ll.reduce_(x), w, EPS, res)),
                         ("symm_then_norm", lambda: rms_norm(dataclasses.replace(fast, ll=None).reduce_(x), w, EPS, res))):
            fn()
            graph = _capture(lambda: [fn() for _ in range(CALLS)])
            norm[f"{name}_us"] = _timed(graph.replay, device, REPLAYS) * 1e3 / CALLS
        if rank == 0:
            print("ALLREDUCE+NORM", json.dumps({k: round(v, 2) for k, v in norm.items()}), flush=True)
    return {"sizes": rows, "decode_like": decode, "allreduce_norm": norm}


def _worker(rank: int, world: int, store_path: str, result_path: str, check_only: bool, paths: list) -> None:
    PATHS[:] = paths
    os.environ["PRISM_ALLREDUCE"] = "ll" if "ll" in paths else "symm"  # ll sets up both kernels
    if not check_only:  # time the one-shot op past the serving threshold too, to see where NCCL catches up
        symm_allreduce.MAX_BYTES = max(SIZES_KB) * 1024
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    store = dist.FileStore(store_path, world)
    tp.start_group(store, rank, world, device, timedelta(seconds=120))
    try:
        result = {"checks": check(rank, device)}
        if not check_only:
            result["timing"] = timing(rank, device)
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    finally:
        torch.cuda.synchronize()
        dist.barrier()
        tp.stop_group()


def _watchdog(seconds: float) -> None:
    """A hung engine: print every thread's stack here and in the workers (PYTHONFAULTHANDLER
    makes them print theirs on SIGABRT), then exit."""
    def fire():
        time.sleep(seconds)
        print(f"\nwatchdog: no result after {seconds:.0f} s; stacks:", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        for pid in _children():
            os.kill(pid, signal.SIGABRT)
        time.sleep(2)
        os._exit(3)

    threading.Thread(target=fire, daemon=True).start()


def _children() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def e2e(mode: str, layers: int, sizes: list[int], steps: int) -> dict:
    """The engine's whole decode step at tp=2 with PRISM_ALLREDUCE=mode (bench/decode_graphs.py's
    model and timing). One mode per process: a process joins one tensor-parallel group."""
    sys.path.insert(0, str(ROOT / "bench"))
    from decode_graphs import build, step_time

    from llm_service.config import PytorchEngineConfig
    from llm_service.engine.llm_engine import LLMEngine

    path = build(Path("/tmp/prism-decode-llama") / f"l{layers}", layers, 32000)
    os.environ["PRISM_ALLREDUCE"] = mode
    os.environ["PYTHONFAULTHANDLER"] = "1"  # the worker inherits it (see _watchdog)
    config = PytorchEngineConfig(tp=2, session_len=1024, max_batch_size=max(sizes),
                                 cache_max_entry_count=4 * max(sizes) + 8)
    t = time.perf_counter()
    engine = LLMEngine(str(path), config)
    fast = tp._TP.fast
    print(f"e2e {mode}: engine ready in {time.perf_counter() - t:.1f} s; symmetric memory "
          f"{'on' if fast else 'off'}, Triton kernel {'on' if fast and fast.ll else 'off'}", flush=True)
    rows = {}
    for bs in sizes:
        rows[f"bs{bs}_ms"] = step_time(engine, bs, steps, 32000) * 1e3
        print(f"E2E mode={mode} layers={layers} bs={bs}: {rows[f'bs{bs}_ms']:.3f} ms/step", flush=True)
    engine.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--paths", default="symm,ll", help="which of symm, ll to check and time")
    ap.add_argument("--e2e-mode", choices=symm_allreduce.MODES, help="only the engine's decode step, this path")
    ap.add_argument("--e2e-layers", type=int, default=8)
    ap.add_argument("--e2e-batch-sizes", default="1,8")
    ap.add_argument("--e2e-steps", type=int, default=64)
    ap.add_argument("--e2e-timeout", type=float, default=0, help="seconds; then print stacks and exit")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/prism-bench/out"))
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, {torch.cuda.device_count()} visible")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, "
          f"one_shot_all_reduce_copy_out: {hasattr(torch.ops.symm_mem, 'one_shot_all_reduce_copy_out')}",
          flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.e2e_mode:
        if args.e2e_timeout:
            _watchdog(args.e2e_timeout)
        sizes = [int(s) for s in args.e2e_batch_sizes.split(",")]
        rows = e2e(args.e2e_mode, args.e2e_layers, sizes, args.e2e_steps)
        (out / f"e2e_{args.e2e_mode}.json").write_text(json.dumps(rows, indent=1))
        os._exit(0)  # the engine's threads and CUDA state need no orderly teardown here
    with tempfile.TemporaryDirectory() as tmp:
        store, res = os.path.join(tmp, "store"), os.path.join(tmp, "result.json")
        torch.multiprocessing.spawn(_worker, args=(args.world, store, res, args.check_only, args.paths.split(",")),
                                    nprocs=args.world, join=True)
        result = json.loads(Path(res).read_text())
    failed = [name for name, passed in result["checks"] if not passed]
    print(f"\n{len(result['checks']) - len(failed)} of {len(result['checks'])} checks passed"
          + (f"; FAILED: {failed}" if failed else ""))
    if not failed:
        print("ALL CHECKS PASSED")
    if "timing" in result:
        _print_table(result["timing"])
    (out / "allreduce.json").write_text(json.dumps(result, indent=1))
    return 1 if failed else 0


def _print_table(timing: dict) -> None:
    names = [n for n in ("nccl", "symm", "ll", "two_shot") if any(f"{n}_graph_us" in r for r in timing["sizes"])]
    print(f"\nus per all-reduce, bf16, tp=2, {CALLS} back to back in one CUDA graph; eager: host launch included")
    print("| size | " + " | ".join(f"{n} graph" for n in names) + " | " + " | ".join(f"{n} eager" for n in names) + " |")
    print("|---:|" + "---:|" * (2 * len(names)))
    for r in timing["sizes"]:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in [f"{n}_graph_us" for n in names] + [f"{n}_eager_us" for n in names]]
        print(f"| {r['kb']} KB | " + " | ".join(cells) + " |")
    errors = {f"{r['kb']}KB {k}": v for r in timing["sizes"] for k, v in r.items() if k.endswith("_error")}
    if errors:
        print("errors:", errors)
    d = timing["decode_like"]
    print(f"\ndecode-like graph, {CALLS} x ([1,2048] @ [2048,4096] bf16, then the all-reduce of its 8 KB), "
          "ms per replay: " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in d.items()))


if __name__ == "__main__":
    sys.exit(main())
