"""Check the Triton paged-attention kernels against a float64 torch reference, then time them.

GPU:  PYTHONUNBUFFERED=1 python bench/kernels_check.py            (checks + timings, $OUT/kernels.json)
      PYTHONUNBUFFERED=1 python bench/kernels_check.py --w13      (checks, then only the W1/W3 timings)
      PYTHONUNBUFFERED=1 python bench/kernels_check.py --no-checks --w2   (only the W2 decode knob sweep)
      PYTHONUNBUFFERED=1 python bench/kernels_check.py --no-checks --w2 --int8   (the same over an int8 cache)
      PYTHONUNBUFFERED=1 python bench/kernels_check.py --no-checks --w2 --pipe   (int8, pipelined code loads)
      PYTHONUNBUFFERED=1 python bench/kernels_check.py --no-checks --prefill  (the W2 prefill tile sweep)
      PYTHONUNBUFFERED=1 python bench/kernels_check.py --no-checks --cc   (int8 MHA decode on CUDA cores, W2)
CPU:  TRITON_INTERPRET=1 python bench/kernels_check.py --quick    (small checks in Triton's interpreter)

Timings are per attention call of one layer, replayed from a CUDA graph that walks through enough
layers' worth of cache (different blocks, up to 32 layers) that L2 cannot hold it, as in a real
decode step. The baseline gathers the paged cache with torch indexing and calls SDPA.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from llm_service.layers import triton_attention as ta  # noqa: E402

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 6e-2)}  # rel, max-abs


# ----------------------------------------------------------------------------------- reference
def reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale):
    """Float64 attention, one sequence at a time, straight from the semantics in the module doc."""
    T, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(T, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(seq_lens.shape[0]):
        q0, q1, L = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seq_lens[b])
        if q1 == q0 or L == 0:
            continue
        pos = torch.arange(L, device=q.device)
        slots = block_tables[b, pos // page].long() * page + pos % page
        k = k_cache.reshape(-1, Hkv, D)[slots].double().repeat_interleave(Hq // Hkv, dim=1)
        v = v_cache.reshape(-1, Hkv, D)[slots].double().repeat_interleave(Hq // Hkv, dim=1)
        qb = q[q0:q1].double()
        s = torch.einsum("qhd,khd->hqk", qb, k) * scale
        qpos = L - (q1 - q0) + torch.arange(q1 - q0, device=q.device)
        s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    return out


def naive_decode(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """The baseline: gather every sequence's pages with torch indexing, then SDPA with a length mask."""
    B = block_tables.shape[0]
    k = k_cache[block_tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, ctx, D]
    v = v_cache[block_tables].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(q.view(B, -1, 1, q.shape[-1]), k, v, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.view(B, -1, q.shape[-1])


# ----------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A packed batch: (cached prefix, new queries) per sequence, on randomly permuted cache blocks."""

    seqs: list[tuple[int, int]]
    hq: int
    hkv: int
    d: int
    page: int
    dtype: torch.dtype
    extra_cols: int = 3  # block-table columns past the longest sequence (as under CUDA graphs)

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"Hq={self.hq} Hkv={self.hkv} D={self.d} page={self.page} {dt} seqs={len(self.seqs)}"


def build(case: Case, device: str, gen: torch.Generator):
    """Random caches and queries; K/V of every position go in through store_kvcache (checked here)."""
    page, dt = case.page, case.dtype
    lens = [c + n for c, n in case.seqs]
    nblk = [math.ceil(L / page) for L in lens]
    num_blocks = sum(nblk) + 4
    width = max(nblk) + case.extra_cols
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(nblk):
        block_tables[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(dt)  # noqa: E731
    k_cache = rnd(num_blocks, page, case.hkv, case.d)
    v_cache = rnd(num_blocks, page, case.hkv, case.d)

    # every position of every sequence, as the packed k/v views of a fused qkv projection,
    # plus two padded tokens (slot -1) that must not land anywhere
    slots = [int(block_tables[b, p // page]) * page + p % page for b, L in enumerate(lens) for p in range(L)]
    slots += [-1, -1]
    T = len(slots)
    qkv = rnd(T, (case.hq + 2 * case.hkv) * case.d)
    _, k, v = qkv.split([case.hq * case.d, case.hkv * case.d, case.hkv * case.d], dim=1)
    k, v = k.view(T, case.hkv, case.d), v.view(T, case.hkv, case.d)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slot_mapping >= 0
    k_ref.view(-1, case.hkv, case.d)[slot_mapping[keep]] = k[keep]
    v_ref.view(-1, case.hkv, case.d)[slot_mapping[keep]] = v[keep]

    to = lambda x: x.to(device)  # noqa: E731
    k_cache, v_cache, k, v, slot_mapping = map(to, (k_cache, v_cache, k, v, slot_mapping))
    ta.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    store_ok = torch.equal(k_cache.cpu(), k_ref) and torch.equal(v_cache.cpu(), v_ref)

    qkv_q = rnd(sum(n for _, n in case.seqs), (case.hq + 2 * case.hkv) * case.d)
    q = qkv_q[:, : case.hq * case.d].view(-1, case.hq, case.d)  # strided, like the model's view
    cu = torch.tensor([0] + [sum(n for _, n in case.seqs[: i + 1]) for i in range(len(case.seqs))],
                      dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return store_ok, tuple(map(to, (q, k_cache, v_cache, block_tables, cu, seq_lens)))


def compare(out, ref, dtype):
    """(ok, rel, maxabs): relative Frobenius error and max abs error, NaN never passes."""
    out64 = out.double()
    rel = ((out64 - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    mx = (out64 - ref).abs().max().item() if out.numel() else 0.0
    rel_tol, abs_tol = TOL[dtype]
    ok = bool(torch.isfinite(out64).all()) and rel <= rel_tol and mx <= abs_tol
    return ok, rel, mx


def poisoned_call(fn, shape, dtype, device):
    """Leave NaNs in the allocator block the kernel's output will reuse, so unwritten rows show."""
    torch.full(shape, float("nan"), dtype=dtype, device=device)
    return fn()


def run_checks(device: str, quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    results = []

    def record(name, ok, rel=0.0, mx=0.0):
        results.append(dict(name=name, ok=bool(ok), rel=rel, maxabs=mx))
        print(f"{'ok  ' if ok else 'FAIL'} rel={rel:.2e} max={mx:.2e}  {name}", flush=True)

    mixed = [(0, 37), (48, 20), (100, 1), (256, 128), (0, 1), (5, 300), (1000, 3)]
    # short prefills (the split kernel): no prefix, W3-like prefixes, a decode row, a sequence with
    # no queries, and last a padding sequence (queries, seq_len set to 0)
    short = [(0, 9), (780, 16), (780, 32), (1000, 64), (33, 1), (0, 64), (200, 0), (0, 40)]
    small = [(0, 9), (16, 7), (33, 1), (0, 1), (40, 20)]
    if quick:  # fp16, not bf16: the interpreter's bf16 tl.dot is wrong (Triton 3.6)
        shapes = [(4, 2, 16, 16, torch.float32), (4, 4, 16, 32, torch.float16), (8, 2, 64, 16, torch.float32),
                  (2, 1, 128, 16, torch.float32), (2, 2, 80, 64, torch.float16), (7, 1, 16, 256, torch.float16),
                  (7, 1, 16, 16, torch.float32)]
        mixed, dec_lens, splits = small, [0, 1, 17, 64, 130, 5], [1, 3, 8]
        short = [(0, 9), (70, 16), (130, 32), (33, 1), (5, 3), (40, 0), (0, 12)]
    else:
        shapes = [(32, 32, 128, 16, torch.bfloat16), (32, 32, 128, 64, torch.bfloat16),
                  (32, 32, 128, 32, torch.float16), (28, 4, 128, 64, torch.bfloat16),
                  (8, 2, 64, 16, torch.float32), (4, 2, 16, 16, torch.float32), (4, 2, 16, 64, torch.float32),
                  (8, 1, 64, 256, torch.bfloat16), (32, 32, 128, 32, torch.float32), (12, 12, 80, 16, torch.bfloat16)]
        dec_lens = [0, 1, 2, 15, 16, 17, 63, 64, 65, 127, 160, 1000, 1023, 4096, 0, 3001, 7, 0, 2048]
        splits = [None, 1, 4, 64]

    for hq, hkv, d, page, dt in shapes:
        try:
            check_shape(hq, hkv, d, page, dt, mixed, short, dec_lens, splits, quick, device, gen, record)
        except Exception as e:  # keep going: one broken shape must not hide the others
            record(f"{hq}/{hkv} D={d} page={page} {dt}: {type(e).__name__}: {e}", False)
    record("split counters all back to 0", all(not c.any() for c in ta._COUNTERS.values()))
    if device == "cuda":
        for check in (check_graph, check_prefill_graph):
            try:
                check(gen, record)
            except Exception as e:
                record(f"{check.__name__}: {type(e).__name__}: {e}", False)
    return results


def check_shape(hq, hkv, d, page, dt, mixed, short, dec_lens, splits, quick, device, gen, record) -> None:
    """A mixed prefill batch, a short-prefill batch and a decode batch (with padding rows) for one
    head layout and dtype; both attention kernels, forced split counts, merged by the last split
    program (fold) or by the merge kernel. In the interpreter the split runs use 16-key tiles so
    that short sequences span several splits, some of them empty."""
    scale = d ** -0.5
    # prefill, prefix-cache hits, chunked prefill and a decode row, in one packed batch
    case = Case(mixed, hq, hkv, d, page, dt)
    store_ok, (q, kc, vc, bt, cu, lens) = build(case, device, gen)
    record(f"store_kvcache {case}", store_ok)
    ref = reference(q, kc, vc, bt, cu, lens, scale)
    max_q = max(n for _, n in case.seqs)
    for mq in (max_q, None):
        out = poisoned_call(lambda: ta.paged_attention(q, kc, vc, bt, cu, lens, scale, max_q_len=mq),
                            q.shape, dt, device)
        record(f"prefill max_q_len={mq} {case}", *compare(out, ref, dt))
    out = poisoned_call(lambda: _kernel_out(ta._prefill, q, kc, vc, bt, cu, lens, scale, max_q), q.shape, dt, device)
    record(f"prefill kernel {case}", *compare(out, ref, dt))

    # short prefills: the split kernel against the prefill kernel's reference
    case = Case(short, hq, hkv, d, page, dt, extra_cols=5)
    _, (q, kc, vc, bt, cu, lens) = build(case, device, gen)
    lens[-1] = 0  # padding rows: queries, no keys, zero output
    pad = slice(int(cu[-2]), int(cu[-1]))
    ref = reference(q, kc, vc, bt, cu, lens, scale)
    max_q = max(n for _, n in case.seqs)
    split_runs(q, kc, vc, bt, cu, lens, scale, max_q, ref, pad, splits, quick, f"short prefill {case}", record)
    out = ta.paged_attention(q, kc, vc, bt, cu, lens, scale, max_q_len=max_q)
    zero = bool((out[pad] == 0).all())
    ok, rel, mx = compare(out, ref, dt)
    split = ta._use_split(q, kc, bt, max_q)
    record(f"short prefill via paged_attention (split kernel: {split}) {case} zero-pad={zero}", ok and zero, rel, mx)

    # decode: many lengths, seq_len 0 padding rows, forced split counts
    case = Case([(max(L - 1, 0), 1) for L in dec_lens], hq, hkv, d, page, dt, extra_cols=5)
    _, (q, kc, vc, bt, cu, lens) = build(case, device, gen)
    lens[torch.tensor(dec_lens, device=device) == 0] = 0  # padding: one q row, no keys
    ref = reference(q, kc, vc, bt, cu, lens, scale)
    split_runs(q, kc, vc, bt, cu, lens, scale, 1, ref, lens == 0, splits, quick, f"decode {case}", record)
    out = ta.paged_attention(q, kc, vc, bt, cu, lens, scale)  # max_q_len None, T == B
    record(f"decode via paged_attention {case}", *compare(out, ref, dt))


def split_runs(q, kc, vc, bt, cu, lens, scale, max_q, ref, pad, splits, quick, name, record) -> None:
    """The split kernel at each split count, folded and with the merge kernel; `pad` rows must be 0."""
    for ns in splits:
        for fold in (True, False) if ns != 1 else (True,):
            bn = 16 if quick and ns != 1 else 64
            out = poisoned_call(lambda: _kernel_out(ta._split_k, q, kc, vc, bt, cu, lens, scale, max_q,
                                                    num_splits=ns, fold=fold, block_n=bn), q.shape, q.dtype, q.device)
            zero = bool((out[pad] == 0).all())
            ok, rel, mx = compare(out, ref, q.dtype)
            record(f"{name} splits={ns} fold={fold} block_n={bn} zero-pad={zero}", ok and zero, rel, mx)


def _kernel_out(kernel, q, kc, vc, bt, cu, lens, scale, max_q, **knobs):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # unwritten rows show
    kernel(q, kc, vc, bt, cu, lens, scale, out, max_q, **knobs)
    return out


def replay_checks(g, out, fill, cases, reference_of, pad_of, name, record, repeats: int = 50) -> None:
    """For each case: fill the static inputs, replay, check against the reference (and zero padding
    rows), then replay `repeats` more times and require bitwise the same output: the merge order
    is fixed, so a partial read before it was visible (a fold race) would show as a difference."""
    for trial, case in enumerate(cases):
        fill(case)
        g.replay()
        torch.cuda.synchronize()
        first = out.clone()
        ok, rel, mx = compare(first, reference_of(), first.dtype)
        zero = bool((first[pad_of()] == 0).all())
        same = True
        for _ in range(repeats):
            g.replay()
            same &= bool(torch.equal(out, first))
        record(f"{name} replay {trial} {case!r:.60} zero-pad={zero} repeat-identical={same}", ok and zero and same,
               rel, mx)


def check_graph(gen, record) -> None:
    """Capture decode once (B=24, fixed width), then replay on new lengths, tables and queries."""
    B, hq, hkv, d, page, dt = 24, 32, 8, 128, 16, torch.bfloat16
    width, num_blocks = 64, 24 * 64
    kc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dt).cuda()
    vc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dt).cuda()
    q = torch.empty(B, hq, d, dtype=dt, device="cuda")
    bt = torch.empty(B, width, dtype=torch.int32, device="cuda")
    lens = torch.empty(B, dtype=torch.int32, device="cuda")
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda")

    def fill(seed_lens):
        q.copy_(torch.randn(B, hq, d, generator=gen).to(dt))
        bt.copy_(torch.randperm(num_blocks, generator=gen)[: B * width].view(B, width).int())
        lens.copy_(torch.tensor(seed_lens, dtype=torch.int32))

    fill([1] * B)
    ta.paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=1)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ta.paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=1)
    cases = []
    for trial in range(3):
        L = torch.randint(0, width * page + 1, (B,), generator=gen).tolist()
        L[trial] = 0
        cases.append(L)
    replay_checks(g, out, fill, cases, lambda: reference(q, kc, vc, bt, cu, lens, d ** -0.5),
                  lambda: lens == 0, "cuda graph decode", record)


def check_prefill_graph(gen, record) -> None:
    """A short prefill graph for LLaVA-1.5-7B (PrefillGraphs' layout before its slots): sequence 0's
    n <= 32 new tokens after a cached prefix, the rest padding rows as sequence 1 of length 0,
    block table [2, 64] at page 64; captured once, replayed on new prefixes, n, tables and queries."""
    hq, hkv, d, page, dt, size, width = 32, 32, 128, 64, torch.bfloat16, 32, 64
    num_blocks = 2 * width
    kc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dt).cuda()
    vc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dt).cuda()
    q = torch.zeros(size, hq, d, dtype=dt, device="cuda")
    bt = torch.zeros(2, width, dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, size, size], dtype=torch.int32, device="cuda")
    lens = torch.zeros(2, dtype=torch.int32, device="cuda")

    def fill(case):
        ctx, n = case
        q.copy_(torch.randn(size, hq, d, generator=gen).to(dt))
        bt[0].copy_(torch.randperm(num_blocks, generator=gen)[:width].int())
        cu.copy_(torch.tensor([0, n, size], dtype=torch.int32))
        lens.copy_(torch.tensor([ctx + n, 0], dtype=torch.int32))

    ta.paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=size)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ta.paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=size)
    name = f"cuda graph short prefill (split kernel: {ta._use_split(q, kc, bt, size)})"
    replay_checks(g, out, fill, [(780, 16), (780, 32), (0, 20), (3000, 7), (64, 32), (4064, 32)],
                  lambda: reference(q, kc, vc, bt, cu, lens, d ** -0.5), lambda: slice(int(cu[1]), size), name, record)


# ----------------------------------------------------------------------------------- timing
def graph_time_us(fns, reps: int = 30) -> float:
    """Median µs per call of `fns` (one per layer), replayed from one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times) * 1000 / len(fns)


def decode_setup(bs, ctx, page, hq=32, hkv=32, d=128, dt=torch.bfloat16, width=None, int8=False):
    """Uniform-length decode batch; `layers` copies of the tables point at disjoint blocks. width:
    block-table columns (the engine's is session_len / page), padded with block 0. int8: an int8
    cache (quant_policy=8) of random codes and scales; bytes counts both."""
    per_layer = bs * ctx * hkv * 2 * ((d + 4) if int8 else d * 2)
    layers = max(1, min(32, math.ceil(256e6 / per_layer)))
    nblk = -(-ctx // page)
    num_blocks = layers * bs * nblk
    kc = torch.randn(num_blocks, page, hkv, d, device="cuda", dtype=dt)
    vc = torch.randn(num_blocks, page, hkv, d, device="cuda", dtype=dt)
    scales = {}
    if int8:
        kc, vc = (x.mul_(40).round_().clamp_(-127, 127).to(torch.int8) for x in (kc, vc))
        scales = {name: torch.rand(num_blocks, page, hkv, device="cuda") * 0.02 + 0.01 for name in ("k_scale", "v_scale")}
    perm = torch.randperm(num_blocks, device="cuda").int().view(layers, bs, nblk)
    if width is not None and width > nblk:
        perm = F.pad(perm, (0, width - nblk))
    q = torch.randn(bs, hq, d, device="cuda", dtype=dt)
    cu = torch.arange(bs + 1, dtype=torch.int32, device="cuda")
    lens = torch.full((bs,), ctx, dtype=torch.int32, device="cuda")
    return dict(q=q, kc=kc, vc=vc, tables=list(perm.unbind(0)), cu=cu, lens=lens, bytes=per_layer, scales=scales)


def decode_out(s, kernel=None, max_q=1, **knobs) -> torch.Tensor:
    out = torch.empty_like(s["q"])
    (kernel or ta._split_k)(s["q"], s["kc"], s["vc"], s["tables"][0], s["cu"], s["lens"], s["q"].shape[-1] ** -0.5,
                            out, max_q, **s["scales"], **knobs)
    return out


def time_decode(s, kernel=None, max_q=1, **knobs) -> float:
    """µs per call of `kernel` (default the split kernel) on setup `s`, one call per layer's tables."""
    scale = s["q"].shape[-1] ** -0.5

    def call(bt):
        out = torch.empty_like(s["q"])
        return lambda: (kernel or ta._split_k)(s["q"], s["kc"], s["vc"], bt, s["cu"], s["lens"], scale, out, max_q,
                                               **s["scales"], **knobs)

    return graph_time_us([call(bt) for bt in s["tables"]])


def time_variant(s, ref: torch.Tensor, **knobs) -> tuple[float, float]:
    """(µs per call, relative L2 distance of its output from `ref`) of the split kernel (or the
    CUDA-core decode kernel) with `knobs` on setup `s`: one variant of a sweep."""
    rel = ((decode_out(s, **knobs).float() - ref).norm() / ref.norm()).item()
    return time_decode(s, **knobs), rel


def time_naive(s) -> float:
    scale = s["q"].shape[-1] ** -0.5
    return graph_time_us([lambda bt=bt: naive_decode(s["q"], s["kc"], s["vc"], bt, s["lens"], scale)
                          for bt in s["tables"]], reps=10)


def run_timings(res: dict) -> None:
    res.update(decode=[], sweep=[], other=[])
    gbs = lambda s, us: s["bytes"] / us / 1e3  # noqa: E731
    # the two ceilings: device-to-device copy bandwidth
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_us = graph_time_us([lambda: y.copy_(x)], reps=10)
    res["copy_GBps"] = 2 * x.numel() / copy_us / 1e3
    x = y = None
    print(f"device copy: {res['copy_GBps']:.0f} GB/s (read + write)", flush=True)

    for bs in (1, 32, 256):
        for ctx in (160, 1024, 4096):
            row = dict(bs=bs, ctx=ctx)
            for page in (16, 32, 64):
                s = decode_setup(bs, ctx, page)
                us = time_decode(s)
                row[f"p{page}_us"], row[f"p{page}_GBps"] = us, gbs(s, us)
                if page == 16:
                    out = decode_out(s)
                    nv = naive_decode(s["q"], s["kc"], s["vc"], s["tables"][0], s["lens"], 128 ** -0.5)
                    row["vs_naive_rel"] = ((out.float() - nv.float()).norm() / nv.float().norm()).item()
                    row["naive_us"] = time_naive(s)
                    row["splits"] = ta._num_splits(bs, 32, ctx, 64, ta._sm_count(torch.device("cuda")))
                s = None
                torch.cuda.empty_cache()
            res["decode"].append(row)
            print(row, flush=True)

    sweep_decode(res, gbs)
    time_w13(res)
    time_other(res, gbs)


def prefill_setup(n, ctx, page=64, width=64):
    """A short prefill: n new queries after ctx cached keys as sequence 0, an empty padding
    sequence 1 (seq_len 0, no rows), block tables [2, width]; layers as in decode_setup."""
    s = decode_setup(1, ctx + n, page, width=width)
    s["q"] = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    s["cu"] = torch.tensor([0, n, n], dtype=torch.int32, device="cuda")
    s["lens"] = torch.tensor([ctx + n, 0], dtype=torch.int32, device="cuda")
    s["tables"] = [F.pad(bt, (0, 0, 0, 1)) for bt in s["tables"]]
    return s


def time_w13(res: dict) -> None:
    """The shapes that decide the defaults, LLaVA-1.5-7B heads (32/32, D=128, bf16), page 64, table
    width 64 (4096 positions) as the engine's graphs use: W1 decode at bs=1 over 700 keys; W3's
    16- and 32-token prefills after a 780-token cached prefix. µs per call, the old path first:
    the decode kernel + merge kernel without PDL (what was there before), the prefill kernel
    without PDL; `early=False` is the split kernel without its early first tile. Calls run back
    to back in one graph, so PDL overlaps attention with attention; in the model it overlaps with
    rope_store and the GEMVs around it."""
    res["w13"] = []
    sm = ta._sm_count(torch.device("cuda"))

    def row(name, s, ref, kernel, max_q, **kn):
        us = time_decode(s, kernel=kernel, max_q=max_q, **kn)
        out = decode_out(s, kernel=kernel, max_q=max_q, **kn).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        res["w13"].append(dict(case=name, kernel=kernel.__name__, knobs=kn, us=us, rel_vs_old=rel))
        print(f"{name:<34} {kernel.__name__:<9} {str(kn):<50} {us:7.2f} us  rel={rel:.1e}", flush=True)

    s = decode_setup(1, 700, 64, width=64)
    auto = ta._num_splits(1, 32, 64 * 64, 64, sm)
    name = f"W1 decode bs=1 ctx=700 (auto {auto} splits)"
    ref = decode_out(s, fold=False, use_pdl=False).float()
    for kn in (dict(fold=False, use_pdl=False), dict(fold=False, use_pdl=True), dict(fold=True, use_pdl=False),
               dict(fold=True, use_pdl=True), dict(fold=True, use_pdl=True, early=False)) + tuple(
                   dict(fold=True, use_pdl=True, num_splits=n) for n in (4, 8, 32)) + tuple(
                   dict(block_n=bn, num_splits=n, num_warps=w) for bn in (16, 32) for n in (16, 32, 64)
                   for w in (2, 4)):
        attempt(f"{name} {kn}", lambda: row(name, s, ref, ta._split_k, 1, **kn))
    s = None
    for n in (16, 32):
        s = prefill_setup(n, 780)
        _, _, chunks = ta._split_rows(1, n)
        auto = ta._num_splits(2, 32 * chunks, 64 * 64, 64, sm)
        name = f"W3 prefill n={n} ctx=780 (auto {auto} splits)"
        ref = decode_out(s, kernel=ta._prefill, max_q=n, use_pdl=False).float()
        for on in (False, True):
            attempt(f"{name} prefill kernel pdl={on}", lambda: row(name, s, ref, ta._prefill, n, use_pdl=on))
        for kn in (dict(fold=False, use_pdl=False), dict(fold=False, use_pdl=True), dict(fold=True, use_pdl=False),
                   dict(fold=True, use_pdl=True), dict(fold=True, use_pdl=True, early=False)) + tuple(
                       dict(fold=True, use_pdl=True, num_splits=k) for k in (2, 4, 8, 16, 32)):
            attempt(f"{name} {kn}", lambda: row(name, s, ref, ta._split_k, n, **kn))
        s = None
    torch.cuda.empty_cache()


def attempt(label: str, fn) -> None:
    """Run one timing; a variant that cannot build (e.g. out of shared memory) is noted, not fatal."""
    try:
        fn()
    except Exception as e:
        print(f"{label}: {type(e).__name__}: {e}", flush=True)


def sweep_decode(res: dict, gbs) -> None:
    """Knobs at the engine's default page size (64); each variant's output is checked against the
    default's, which the reference checks and the naive baseline have already checked."""
    variants = [dict(), dict(block_n=32), dict(block_n=128), dict(num_warps=2), dict(num_warps=8),
                dict(num_stages=1), dict(num_stages=3), dict(block_n=128, num_warps=8), dict(block_n=32, num_warps=2)]
    for bs, ctx in ((1, 160), (1, 4096), (32, 1024), (256, 4096)):
        s = decode_setup(bs, ctx, 64)
        base = ta._num_splits(bs, 32, ctx, 64, ta._sm_count(torch.device("cuda")))
        more = {1, max(1, base // 4), max(1, base // 2), min(64, base * 2), min(64, base * 4)} - {base}
        ref = decode_out(s).float()

        def one(kn):
            us, rel = time_variant(s, ref, **kn)
            res["sweep"].append(dict(bs=bs, ctx=ctx, base_splits=base, knobs=kn, us=us, GBps=gbs(s, us), rel=rel))
            print(f"sweep bs={bs} ctx={ctx} {kn or 'default'} (splits {base}): {us:.1f} us {gbs(s, us):.0f} GB/s"
                  f" rel={rel:.1e}", flush=True)

        for kn in variants + [dict(num_splits=n) for n in sorted(more)]:
            attempt(f"sweep bs={bs} ctx={ctx} {kn}", lambda: one(kn))
        s = ref = None
        torch.cuda.empty_cache()


def sweep_w2(res: dict, int8: bool, pipe: bool = False) -> None:
    """W2's decode (~200 sequences of ~700 positions, Llama-7B heads 32/32, D=128, bf16, page 16)
    at 64, 128 and 256 sequences of 700 positions: see `_sweep_w2_batch`. int8: over an int8
    cache (quant_policy=8), after the bf16 cache's default for comparison."""
    res["w2"] = []
    for bs in (64, 128, 256):
        if int8:
            s = decode_setup(bs, 700, 16)
            us = time_decode(s)
            res["w2"].append(dict(bs=bs, ctx=700, knobs="bf16 cache", us=us, GBps=s["bytes"] / us / 1e3))
            print(f"\nW2 decode bs={bs} over a bf16 cache (default): {us:.1f} µs [{res['w2'][-1]['GBps']:.0f} GB/s]",
                  flush=True)
            s = None
        res["w2"] += _sweep_w2_batch(bs, int8, pipe)
        torch.cuda.empty_cache()


def _sweep_w2_batch(bs: int, int8: bool, pipe: bool = False) -> list[dict]:
    """Every split-kernel tile (block_n x warps x stages) at 1, 2 and 4 splits: µs per call and GB/s
    of K+V read, the three best and the default printed; then those four again with the early
    first tile flipped (`early`, on by default with more than one split). Each variant's output
    is checked against the default's. int8: over an int8 cache, GB/s of its codes and scales.
    pipe: only the int8 tiles whose codes' loads pipeline (pipe_codes), at one split."""
    s = decode_setup(bs, 700, 16, int8=int8)
    ref = decode_out(s).float()
    auto = ta._num_splits(bs, 32, s["tables"][0].shape[1] * 16, 64, ta._sm_count(torch.device("cuda")))
    rows = []

    def one(kn):
        us, rel = time_variant(s, ref, **kn)
        rows.append(dict(bs=bs, ctx=700, knobs=kn, us=us, GBps=s["bytes"] / us / 1e3, rel=rel))
        return rows[-1]

    def show(r):
        print(f"  {r['us']:8.1f} [{r['GBps']:5.0f}] rel={r['rel']:.1e}  {r['knobs'] or 'default'}", flush=True)

    default = one(dict())
    if pipe:  # int8 codes converted where the dots read them, their loads pipelined (stages >= 2)
        tiles = [dict(block_n=n, num_warps=w, num_stages=st, pipe_codes=True)
                 for n in (32, 64, 128) for w in (2, 4, 8) for st in (2, 3)]
        for kn in tiles:
            attempt(f"w2 bs={bs} {kn}", lambda: one(kn))
    else:
        tiles = [dict(block_n=n, num_warps=w, num_stages=st) for n in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3)]
        for kn in (dict(t, num_splits=n) for t in tiles for n in (1, 2, 4)):
            attempt(f"w2 bs={bs} {kn}", lambda: one(kn))
    best = sorted(rows[1:], key=lambda r: r["us"])[:3]
    print(f"\nW2 decode bs={bs} ctx=700 page 16{' int8' if int8 else ''} (default: num_splits {auto}), µs per call "
          "[GB/s of K+V], best first:", flush=True)
    for r in best + [default]:
        show(r)
    print("  the same with the early first tile flipped:", flush=True)
    for r in best + [default]:
        kn = dict(r["knobs"], early=r["knobs"].get("num_splits", auto) == 1)
        attempt(f"w2 bs={bs} {kn}", lambda: show(one(kn)))
    return rows


def sweep_cc(res: dict) -> None:
    """int8 MHA decode on CUDA cores (`_decode_mha_kernel`) at W2's shapes (64, 128 and 256
    sequences of 700 positions, Llama-7B heads, page 64 as the engine's blocks): every tile
    (block_n x warps), against the tensor-core split kernel over the same int8
    cache and the bf16 cache's default; each variant's output checked against the tensor-core one."""
    res["cc"] = []
    for bs in (64, 128, 256):
        s = decode_setup(bs, 700, 64)
        us = time_decode(s)
        rows = [dict(bs=bs, knobs="bf16 cache", us=us, GBps=s["bytes"] / us / 1e3, rel=0.0)]
        s = None
        s = decode_setup(bs, 700, 64, int8=True)
        ref = decode_out(s, cuda_cores=False).float()

        def one(kn):
            us, rel = time_variant(s, ref, **kn)
            rows.append(dict(bs=bs, knobs=kn, us=us, GBps=s["bytes"] / us / 1e3, rel=rel))

        one(dict(cuda_cores=False))
        one(dict())
        for kn in (dict(block_n=n, num_warps=w) for n in (16, 32, 64) for w in (1, 2, 4)):
            attempt(f"cc bs={bs} {kn}", lambda: one(kn))
        if bs == 64:
            for kn in (dict(block_n=n, num_warps=w, num_splits=2) for n, w in ((16, 2), (32, 4))):
                attempt(f"cc bs={bs} {kn}", lambda: one(kn))
        print(f"\nint8 MHA decode bs={bs} ctx=700 page 64, µs per call [GB/s of codes and scales], "
              "bf16 cache, tensor cores, default, then the five best:", flush=True)
        for r in rows[:3] + sorted(rows[3:], key=lambda r: r["us"])[:5]:
            print(f"  {r['us']:8.1f} [{r['GBps']:5.0f}] rel={r['rel']:.1e}  {r['knobs'] or 'default'}", flush=True)
        res["cc"] += rows
        s = None
        torch.cuda.empty_cache()


def prefill_batch(B: int, ctx: int, n: int) -> tuple[torch.Tensor, ...]:
    """B sequences of n new tokens after ctx cached keys, Llama-7B heads (32/32, D=128), bf16,
    page 64, blocks permuted: (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)."""
    L, page = ctx + n, 64
    nblk = -(-L // page)
    q = torch.randn(B * n, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(B * nblk, page, 32, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(B * nblk, device="cuda").int().view(B, nblk)
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda") * n
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    return q, kc, vc, bt, cu, lens


def sweep_prefill(res: dict) -> None:
    """W2's prefill attention: 12 prompts of 640 new tokens (a step's token budget), and 4 chunks
    of 512 after 512 cached keys, Llama-7B heads, page 64, over a bf16 and an int8 cache: the
    default, then every tile (block_m x block_n x warps x stages), µs per call and TFLOP/s of the
    causal products; SDPA (flash) on dense K/V of the first shape for scale. Each variant's
    output is checked against the default's."""
    res["prefill"] = []
    for B, ctx, n in ((12, 0, 640), (4, 512, 512)):
        flops = 4 * 128 * 32 * B * sum(ctx + j + 1 for j in range(n))
        q, kc, vc, bt, cu, lens = prefill_batch(B, ctx, n)
        if ctx == 0:
            qd = q.view(B, n, 32, 128).transpose(1, 2)
            kd, vd = (c[bt.long()].flatten(1, 2).transpose(1, 2).contiguous() for c in (kc, vc))
            us = graph_time_us([lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)])
            print(f"\nSDPA causal on dense K/V, {B} x {n}: {us:.1f} µs [{flops / us / 1e6:.0f} TFLOP/s]", flush=True)
            res["prefill"].append(dict(shape=[B, ctx, n], name="sdpa", us=us))
        for int8 in (False, True):
            scales, k8, v8 = {}, kc, vc
            if int8:
                k8, v8 = (x.mul(40).round_().clamp_(-127, 127).to(torch.int8) for x in (kc, vc))
                scales = {name: torch.rand(kc.shape[:3], device="cuda") * 0.02 + 0.01 for name in ("k_scale", "v_scale")}
            ref = torch.empty_like(q)
            ta._prefill(q, k8, v8, bt, cu, lens, 128 ** -0.5, ref, n, **scales)
            rows = []

            def one(kn):
                out = torch.empty_like(q)
                us = graph_time_us([lambda: ta._prefill(q, k8, v8, bt, cu, lens, 128 ** -0.5, out, n, **scales, **kn)])
                rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                rows.append(dict(shape=[B, ctx, n], int8=int8, knobs=kn, us=us, tflops=flops / us / 1e6, rel=rel))

            one({})
            for bm in (64, 128):
                for bn in (32, 64, 128):
                    for w in (4, 8):
                        for st in (1, 2, 3):
                            kn = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                            attempt(f"prefill {kn}", lambda: one(kn))
            res["prefill"] += rows
            print(f"\nprefill {B} x {n} new after {ctx}, page 64, {'int8' if int8 else 'bf16'} cache: µs per call "
                  "[TFLOP/s], default then the best five:", flush=True)
            for r in rows[:1] + sorted(rows[1:], key=lambda r: r["us"])[:5]:
                print(f"  {r['us']:8.1f} [{r['tflops']:4.0f}] rel={r['rel']:.1e}  {r['knobs'] or 'default'}", flush=True)
        kc = vc = k8 = v8 = None
        torch.cuda.empty_cache()


def time_other(res: dict, gbs) -> None:
    """GQA decode (Qwen2-7B heads), and prefill tile variants next to SDPA on contiguous K/V."""
    s = decode_setup(32, 1024, 64, hq=28, hkv=4)
    us = time_decode(s)
    res["other"].append(dict(name="decode GQA 28/4 bs=32 ctx=1024 page=64", us=us, GBps=gbs(s, us),
                             naive_us=time_naive(s)))
    s = None
    variants = [dict(), dict(block_m=128, num_warps=8), dict(block_m=128, num_warps=8, num_stages=3),
                dict(block_m=128, block_n=128, num_warps=8), dict(num_stages=3), dict(block_m=128, block_n=32)]
    for prefix, n in ((0, 2048), (2048, 512)):
        L = prefix + n
        q, kc, vc, bt, cu, lens = prefill_batch(1, prefix, n)
        ref = torch.empty_like(q)
        ta._prefill(q, kc, vc, bt, cu, lens, 128 ** -0.5, ref, n)

        def one(kn):
            out = torch.empty_like(q)
            us = graph_time_us([lambda: ta._prefill(q, kc, vc, bt, cu, lens, 128 ** -0.5, out, n, **kn)])
            rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            res["other"].append(dict(name=f"prefill bs=1 prefix={prefix} new={n} page=64 {kn or 'default'}",
                                     us=us, rel_vs_default=rel))

        for kn in variants:
            attempt(f"prefill {kn}", lambda: one(kn))
        qd = q.transpose(0, 1)[None]
        kd, vd = (c[bt[0].long()].flatten(0, 1).transpose(0, 1)[None].contiguous() for c in (kc, vc))
        causal = torch.arange(L, device="cuda")[None] <= prefix + torch.arange(n, device="cuda")[:, None]
        mask = None if prefix == 0 else causal
        sdpa_us = graph_time_us([lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                                                        is_causal=mask is None)])
        res["other"].append(dict(name=f"SDPA on contiguous K/V, prefix={prefix} new={n}", us=sdpa_us))
    for r in res["other"]:
        print(r, flush=True)


def print_table(res: dict) -> None:
    print("\ndecode, Llama-2-7B heads (32/32, D=128, bf16), µs per layer call [GB/s of K+V]:")
    print(f"{'bs':>4} {'ctx':>5} {'splits':>6} {'page16':>15} {'page32':>15} {'page64':>15} {'naive(p16)':>11} {'speedup':>7}")
    for r in res["decode"]:
        best = min(r["p16_us"], r["p32_us"], r["p64_us"])
        cells = " ".join(f"{r[f'p{p}_us']:7.1f} [{r[f'p{p}_GBps']:5.0f}]" for p in (16, 32, 64))
        print(f"{r['bs']:>4} {r['ctx']:>5} {r['splits']:>6} {cells} {r['naive_us']:>11.1f} {r['naive_us'] / best:>6.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes only (CPU interpreter)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--w13", action="store_true", help="time only the W1/W3 shapes (old path vs new)")
    ap.add_argument("--w2", action="store_true", help="time only the W2 decode knob sweep")
    ap.add_argument("--int8", action="store_true", help="with --w2: over an int8 cache (quant_policy=8)")
    ap.add_argument("--pipe", action="store_true", help="with --w2: only int8 tiles with pipelined code loads")
    ap.add_argument("--prefill", action="store_true", help="time only the W2 prefill tile sweep (bf16 and int8)")
    ap.add_argument("--cc", action="store_true", help="time only the int8 MHA decode tiles on CUDA cores (W2)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    checks = [] if args.no_checks else run_checks(device, args.quick)
    bad = [c["name"] for c in checks if not c["ok"]]
    print(f"\n{len(checks) - len(bad)}/{len(checks)} checks passed in {time.time() - t0:.0f}s", flush=True)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "checks": checks}
    if device == "cuda" and not args.no_timing:
        try:
            if args.w13:
                time_w13(res)
            elif args.w2:
                sweep_w2(res, args.int8 or args.pipe, args.pipe)
            elif args.prefill:
                sweep_prefill(res)
            elif args.cc:
                sweep_cc(res)
            else:
                run_timings(res)
                print_table(res)
        except Exception as e:  # what was timed so far still reaches kernels.json
            print(f"timing failed: {type(e).__name__}: {e}", flush=True)
            res["timing_error"] = repr(e)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump(res, f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
