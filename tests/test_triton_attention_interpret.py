"""The Triton attention kernels in Triton's CPU interpreter (fp32: its bf16/fp16 dots are unreliable)
against the torch reference in attention.py: the prefill kernel, the split kernel for short
prefills and decode at several split counts (folded merge and merge kernel, empty splits,
seq_len-0 padding rows, first tiles of old keys and of this step's), the KV store, and the fold
counters left at 0. The split kernel's early first tile (EARLY) must not change a bit: every split
run is repeated with it flipped.

The interpreter is chosen when triton is imported, so the checks run in a child process with
TRITON_INTERPRET=1 (this file run as a script). Sequential programs cannot show memory-ordering
bugs of the fold; tests/gpu/test_triton_attention.py replays it on a GPU.
"""
from __future__ import annotations

import sys

import torch

from tests.interpreter import needs_triton, run_script


@needs_triton
def test_kernels_in_the_interpreter():
    run_script(__file__)


def _case(seqs, hq, hkv, d, page, gen):
    """Random caches (K/V stored through the kernel), permuted blocks, packed queries."""
    from llm_service.layers import triton_attention as ta

    lens = [c + n for c, n in seqs]
    nblk = [-(-L // page) for L in lens]
    num_blocks = sum(nblk) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    bt = torch.zeros(len(seqs), max(nblk) + 4, dtype=torch.int32)
    for b, n in enumerate(nblk):
        bt[b, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    kc = torch.randn(num_blocks, page, hkv, d, generator=gen)
    vc = torch.randn(num_blocks, page, hkv, d, generator=gen)
    slots = torch.tensor([int(bt[b, p // page]) * page + p % page for b, L in enumerate(lens) for p in range(L)] + [-1])
    k = torch.randn(slots.shape[0], hkv, d, generator=gen)
    v = torch.randn(slots.shape[0], hkv, d, generator=gen)
    before = kc.clone()
    ta.store_kvcache(k, v, kc, vc, slots)
    assert torch.equal(kc.flatten(0, 1)[slots[:-1]], k[:-1]) and torch.equal(vc.flatten(0, 1)[slots[:-1]], v[:-1])
    untouched = torch.ones(kc.shape[0] * page, dtype=torch.bool)
    untouched[slots[:-1]] = False
    assert torch.equal(kc.flatten(0, 1)[untouched], before.flatten(0, 1)[untouched])  # slot -1 wrote nothing
    q = torch.randn(sum(n for _, n in seqs), hq, d, generator=gen)
    cu = torch.tensor([0] + [sum(n for _, n in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    return q, kc, vc, bt, cu, torch.tensor(lens, dtype=torch.int32)


def _reference(q, kc, vc, bt, cu, lens, scale):
    from llm_service.layers.attention import paged_attention

    ref = paged_attention(q, kc, vc, bt, cu, lens, scale)
    for b in range(lens.shape[0]):
        if int(lens[b]) == 0:
            ref[int(cu[b]): int(cu[b + 1])] = 0  # no keys: the kernels give 0 (SDPA over nothing is NaN)
    return ref


def _check(name, out, ref):
    err = (out - ref).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err < 2e-5
    print(f"{'ok  ' if ok else 'FAIL'} max={err:.3e}  {name}", flush=True)
    return ok


def _split_checks(name, run, args, ref, max_q, runs):
    """The split kernel at each (splits, fold), against the reference and, with EARLY flipped from
    its default (on with more than one split), bitwise against itself."""
    from llm_service.layers import triton_attention as ta

    oks = []
    for splits, fold in runs:
        out = run(ta._split_k, args, max_q, num_splits=splits, fold=fold, block_n=16)
        flipped = run(ta._split_k, args, max_q, num_splits=splits, fold=fold, block_n=16, early=splits == 1)
        oks.append(_check(f"{name} splits={splits} fold={fold}", out, ref))
        same = torch.equal(out, flipped)
        print(f"{'ok  ' if same else 'FAIL'} early={splits == 1} bitwise as its default  {name} splits={splits}",
              flush=True)
        oks.append(same)
    return oks


def _main() -> int:
    from llm_service.layers import triton_attention as ta

    gen = torch.Generator().manual_seed(0)
    oks = []
    hq, hkv, d, page = 6, 1, 16, 16  # GQA group 6: short prefills take two head chunks, one half padding
    scale = d ** -0.5

    def run(kernel, args, max_q, **knobs):
        out = torch.full(args[0].shape, float("nan"))
        kernel(*args[:6], scale, out, max_q, **knobs)
        return out

    args = _case([(0, 9), (16, 7), (33, 1), (40, 20)], hq, hkv, d, page, gen)
    ref = _reference(*args, scale)
    oks.append(_check("prefill kernel", run(ta._prefill, args, 20), ref))

    # short prefills: no prefix, prefixes, a decode row, no queries, one old tile and then three
    # holding new queries (24, 40), PrefillGraphs' padding last
    args = _case([(0, 9), (70, 16), (33, 1), (40, 0), (24, 40), (0, 12)], hq, hkv, d, page, gen)
    args[5][-1] = 0
    ref = _reference(*args, scale)
    oks += _split_checks("short prefill", run, args, ref, 40, ((1, True), (3, True), (3, False), (8, True), (8, False)))

    # decode: a padding row, first tiles of old keys only and first tiles holding the new key
    # (length 5; the last split of lengths 17 and 130)
    args = _case([(0, 1), (16, 1), (129, 1), (4, 1)], hq, hkv, d, page, gen)
    args[5][0] = 0
    ref = _reference(*args, scale)
    oks += _split_checks("decode", run, args, ref, 1, ((1, True), (4, True), (4, False), (16, True)))
    oks.append(_check("decode via paged_attention", ta.paged_attention(*args, scale), ref))

    counters_zero = all(not c.any() for c in ta._COUNTERS.values()) and bool(ta._COUNTERS)
    print(f"{'ok  ' if counters_zero else 'FAIL'} fold counters back to 0", flush=True)
    oks.append(counters_zero)
    if all(oks):
        print("all ok")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(_main())
