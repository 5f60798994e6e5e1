"""Triton paged attention on CUDA against a float64 torch reference (skipped without CUDA or triton)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from llm_service.layers import triton_attention as ta  # noqa: E402
from llm_service.layers.rotary import Rope  # noqa: E402
from llm_service.layers.triton_attention import paged_attention, rope_store, store_kvcache  # noqa: E402

PAGE = 16


def _reference(q, k_cache, v_cache, block_tables, cu, seq_lens, scale):
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    group = q.shape[1] // k_cache.shape[2]
    for b in range(seq_lens.shape[0]):
        q0, q1, L = int(cu[b]), int(cu[b + 1]), int(seq_lens[b])
        if L == 0 or q1 == q0:
            continue
        pos = torch.arange(L, device=q.device)
        page = k_cache.shape[1]
        slots = block_tables[b, pos // page].long() * page + pos % page
        k = k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, 1)
        v = v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), k) * scale
        qpos = L - (q1 - q0) + torch.arange(q1 - q0, device=q.device)
        s = s.masked_fill(pos[None, None] > qpos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    return out


def _batch(seqs, hq, hkv, d, dtype, width_extra=2):
    """seqs: (cached prefix, new tokens). K/V of every position are written with store_kvcache."""
    lens = [c + n for c, n in seqs]
    nblk = [-(-L // PAGE) for L in lens]
    num_blocks = sum(nblk) + 2
    perm = torch.randperm(num_blocks).tolist()
    bt = torch.full((len(seqs), max(nblk) + width_extra), -1, dtype=torch.int32)
    for b, n in enumerate(nblk):
        bt[b, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    k_cache = torch.randn(num_blocks, PAGE, hkv, d, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    slots = [int(bt[b, p // PAGE]) * PAGE + p % PAGE for b, L in enumerate(lens) for p in range(L)] + [-1]
    k = torch.randn(len(slots), hkv, d, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    slot_mapping = torch.tensor(slots, device="cuda")
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache.flatten(0, 1)[slot_mapping[:-1]], k[:-1])
    assert torch.equal(v_cache.flatten(0, 1)[slot_mapping[:-1]], v[:-1])
    q = torch.randn(sum(n for _, n in seqs), hq, d, dtype=dtype, device="cuda")
    cu = torch.tensor([0] + [sum(n for _, n in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    return q, k_cache, v_cache, bt.cuda(), cu.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


def _rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("hq,hkv,d,dtype,tol", [
    (32, 32, 128, torch.bfloat16, 1e-2), (28, 4, 128, torch.float16, 2e-3), (4, 2, 16, torch.float32, 1e-5)])
def test_prefill_with_prefix_and_decode_rows(hq, hkv, d, dtype, tol):
    seqs = [(0, 37), (48, 20), (100, 1), (256, 70)]
    q, kc, vc, bt, cu, lens = _batch(seqs, hq, hkv, d, dtype)
    out = paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=70)
    assert out.dtype == dtype and _rel(out, _reference(q, kc, vc, bt, cu, lens, d ** -0.5)) < tol


@pytest.mark.parametrize("hq,hkv,d,dtype,tol", [
    (32, 32, 128, torch.bfloat16, 1e-2), (28, 4, 128, torch.float16, 2e-3), (4, 2, 16, torch.float32, 1e-5)])
def test_mixed_step_with_leading_decodes(hq, hkv, d, dtype, tol):
    """A mixed step as the scheduler orders it: decodes first (num_decodes: the split kernel),
    then prefills with prefixes and a later single-token row (the prefill kernel)."""
    seqs = [(300, 1), (17, 1), (1500, 1), (0, 37), (48, 20), (100, 1), (256, 70)]
    q, kc, vc, bt, cu, lens = _batch(seqs, hq, hkv, d, dtype)
    out = paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=70, num_decodes=3)
    assert out.dtype == dtype and _rel(out, _reference(q, kc, vc, bt, cu, lens, d ** -0.5)) < tol


@pytest.mark.parametrize("hq,hkv,d,dtype,tol", [
    (32, 32, 128, torch.bfloat16, 1e-2), (8, 2, 64, torch.bfloat16, 1e-2), (4, 2, 16, torch.float32, 1e-5)])
@pytest.mark.parametrize("fold", [True, False])
def test_decode_with_padding_in_cuda_graph(hq, hkv, d, dtype, tol, fold, monkeypatch):
    monkeypatch.setattr(ta, "FOLD", fold)
    lengths = [1, 17, 64, 300, 1500, 1, 900, 2]
    q, kc, vc, bt, cu, lens = _batch([(L - 1, 1) for L in lengths], hq, hkv, d, dtype)
    lens[[1, 5]] = 0  # CUDA-graph padding rows: no keys, zero output
    paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=1)
    for trial in range(3):
        q.copy_(torch.randn_like(q))
        lens[3] = 299 - trial
        _replay_and_check(graph, out, lambda: _reference(q, kc, vc, bt, cu, lens, d ** -0.5), tol)
        assert (out[[1, 5]] == 0).all()


def _replay_and_check(graph, out, reference, tol, repeats=30):
    """Replay, check against the reference, then replay again and again: the split merge reads
    the partials in a fixed order, so every replay must give bitwise the same output (a partial
    read before its writer's stores were visible would not)."""
    graph.replay()
    torch.cuda.synchronize()
    first = out.clone()
    assert _rel(first, reference()) < tol
    for _ in range(repeats):
        graph.replay()
        assert torch.equal(out, first)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("hq,hkv,d,dtype,tol", [
    (32, 32, 128, torch.bfloat16, 1e-2), (28, 4, 128, torch.float16, 2e-3), (4, 2, 16, torch.float32, 1e-5)])
def test_short_prefill_split_kernel(hq, hkv, d, dtype, tol, fold):
    """Follow-up turns after a prefix-cache hit: a few sequences of <= 64 new tokens over long
    cached prefixes, and a padding sequence (queries, seq_len 0: zero output)."""
    seqs = [(780, 16), (0, 9), (33, 1), (200, 32), (1500, 64), (0, 40)]
    q, kc, vc, bt, cu, lens = _batch(seqs, hq, hkv, d, dtype)
    lens[-1] = 0
    ref = _reference(q, kc, vc, bt, cu, lens, d ** -0.5)
    for splits in (None, 1, 4, 16, 64):
        for early in (None, True, False):  # None: the early first tile with more than one split
            out = torch.full_like(q, float("nan"))
            ta._split_k(q, kc, vc, bt, cu, lens, d ** -0.5, out, 64, num_splits=splits, fold=fold, early=early)
            assert _rel(out, ref) < tol, (splits, early)
            assert (out[int(cu[-2]):] == 0).all()
    assert ta._use_split(q, kc, bt, 64)  # six sequences over a 95-block table: split, not prefill
    out = paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=64)
    assert _rel(out, ref) < tol
    assert all(not c.any() for c in ta._COUNTERS.values())  # every merger reset its counter


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("hq,hkv,d,dtype,tol", [(32, 32, 128, torch.bfloat16, 1e-2), (4, 2, 16, torch.float32, 1e-5)])
def test_short_prefill_in_cuda_graph(hq, hkv, d, dtype, tol, fold, monkeypatch):
    """A short prefill graph (PrefillGraphs' layout before its decode and prompt slots): sequence
    0's n <= 32 new tokens, the other rows padding as sequence 1 of length 0, a [2, 64] block
    table at page 64; captured once, replayed on new prefixes and n."""
    monkeypatch.setattr(ta, "FOLD", fold)
    size, width, page = 32, 64, 64
    kc = torch.randn(2 * width, page, hkv, d, dtype=dtype, device="cuda")
    vc = torch.randn_like(kc)
    q = torch.zeros(size, hq, d, dtype=dtype, device="cuda")
    bt = torch.zeros(2, width, dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, size, size], dtype=torch.int32, device="cuda")
    lens = torch.zeros(2, dtype=torch.int32, device="cuda")
    assert ta._use_split(q, kc, bt, size)
    paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=size)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(q, kc, vc, bt, cu, lens, d ** -0.5, max_q_len=size)
    for ctx, n in [(780, 16), (780, 32), (0, 20), (3000, 7), (4064, 32)]:
        q.copy_(torch.randn_like(q))
        bt[0].copy_(torch.randperm(2 * width, device="cuda")[:width].int())
        cu.copy_(torch.tensor([0, n, size]))
        lens.copy_(torch.tensor([ctx + n, 0]))
        _replay_and_check(graph, out, lambda: _reference(q, kc, vc, bt, cu, lens, d ** -0.5), tol)
        assert (out[n:] == 0).all()



@pytest.mark.parametrize("seqs,max_q", [([(L - 1, 1) for L in (1, 17, 64, 65, 130, 700)], 1),
                                        ([(780, 16), (40, 24), (0, 9), (100, 32)], 32)])
def test_split_kernel_after_rope_store_in_cuda_graph(seqs, max_q):
    """The model's order in one graph: rope_store writes q and this step's K/V, then attention.
    Each replay stores new K/V at the same slots, so a split program that read q or a tile
    holding this step's keys before its PDL wait would see the previous replay's values (with
    more than one split the kernel reads first tiles of older keys before the wait: EARLY)."""
    hq = hkv = 32
    d, dtype, scale = 128, torch.bfloat16, 128 ** -0.5
    q_in, kc, vc, bt, cu, lens = _batch(seqs, hq, hkv, d, dtype)
    positions = torch.tensor([p for c, n in seqs for p in range(c, c + n)], device="cuda")
    b_of = torch.repeat_interleave(torch.arange(len(seqs), device="cuda"), cu.diff().long())
    slots = bt[b_of, positions // PAGE].long() * PAGE + positions % PAGE
    k_in = torch.randn(positions.shape[0], hkv, d, dtype=dtype, device="cuda")
    v_in = torch.randn_like(k_in)
    table = (int(positions.max()) + 1, d)
    identity = Rope(torch.ones(table, device="cuda"), torch.zeros(table, device="cuda"), positions)  # no rotation
    assert ta._num_splits(len(seqs), hkv, bt.shape[1] * PAGE, 64, ta._sm_count(q_in.device)) > 1  # EARLY on

    def step():
        q = rope_store(q_in, k_in, v_in, identity, kc, vc, slots)
        return q, paged_attention(q, kc, vc, bt, cu, lens, scale, max_q_len=max_q)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, out = step()
    for _ in range(10):
        for x in (q_in, k_in, v_in):
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(q, kc, vc, bt, cu, lens, scale)
        assert torch.equal(kc.flatten(0, 1)[slots], k_in)
        for b in range(len(seqs)):
            rows = slice(int(cu[b]), int(cu[b + 1]))
            assert _rel(out[rows], ref[rows]) < 1e-2, seqs[b]
