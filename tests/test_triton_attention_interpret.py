"""The Triton attention kernels in Triton's CPU interpreter (fp32: its bf16/fp16 dots are unreliable)
against the torch reference in attention.py: the prefill kernel (at 16-wide tiles too, where
key tiles below the diagonal run without the causal mask), a mixed step whose leading decodes
take the split kernel, the split kernel for short prefills and decode at several split counts (folded merge and merge kernel, empty splits,
seq_len-0 padding rows, first tiles of old keys and of this step's), the KV store, and the fold
counters left at 0. The split kernel's early first tile (EARLY) must not change a bit: every split
run is repeated with it flipped. With an int8 cache (quant_policy=8) the store (with and without
rotary) must give the reference's codes and scales bit for bit, and the kernels must match the
reference over them: fp32 queries (dequantized tiles) as closely as over a float cache, fp16 ones
(codes as fp16, scales folded in) within the bound of their fp16 roundings; the codes' conversion
(the interpreter's plain one) must give every int8 value back exactly, in place.

The interpreter is chosen when triton is imported, so the checks run in a child process with
TRITON_INTERPRET=1 (this file run as a script). Sequential programs cannot show memory-ordering
bugs of the fold; tests/gpu/test_triton_attention.py replays it on a GPU.
"""
from __future__ import annotations

import importlib.util
import sys

import torch

from tests.interpreter import needs_triton, run_script

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from llm_service.layers import triton_attention as ta

    @triton.jit
    def _codes_tile(x_ptr, y_ptr, PURE: tl.constexpr):
        """y = ta._codes_f16 of the [64, 128] int8 tile at x_ptr."""
        offs = tl.arange(0, 64)[:, None] * 128 + tl.arange(0, 128)[None, :]
        tl.store(y_ptr + offs, ta._codes_f16(tl.load(x_ptr + offs), PURE))

    @triton.jit
    def _words_tile(x_ptr, y_ptr):
        """y = ta._words_f32 of the [64, 128] int8 tile at x_ptr, read as [64, 32] int32 words."""
        words = tl.arange(0, 64)[:, None] * 32 + tl.arange(0, 32)[None, :]
        y0, y1, y2, y3 = ta._words_f32(tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + words))
        tl.store(y_ptr + 4 * words, y0)
        tl.store(y_ptr + 4 * words + 1, y1)
        tl.store(y_ptr + 4 * words + 2, y2)
        tl.store(y_ptr + 4 * words + 3, y3)


@needs_triton
def test_kernels_in_the_interpreter():
    run_script(__file__)


def _case(seqs, hq, hkv, d, page, gen, int8=False):
    """Random caches (K/V stored through the kernel), permuted blocks, packed queries: the kernels'
    six leading arguments, and the int8 cache's scales as keywords ({} without int8)."""
    from llm_service.layers import attention
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
    scales = {}
    if int8:  # random codes and scales where nothing is stored
        kc, vc = ((x * 40).round().clamp(-127, 127).to(torch.int8) for x in (kc, vc))
        scales = {name: torch.rand(num_blocks, page, hkv, generator=gen) + 0.1 for name in ("k_scale", "v_scale")}
    slots = torch.tensor([int(bt[b, p // page]) * page + p % page for b, L in enumerate(lens) for p in range(L)] + [-1])
    k = torch.randn(slots.shape[0], hkv, d, generator=gen)
    v = torch.randn(slots.shape[0], hkv, d, generator=gen)
    k[0, 0] = 0  # a zero row: codes 0 and a positive scale in an int8 cache
    before = kc.clone()
    want = [x.clone() for x in (kc, vc, *scales.values())]
    ta.store_kvcache(k, v, kc, vc, slots, **scales)
    if int8:
        attention.store_kvcache(k, v, *want[:2], slots, *want[2:])
        assert all(torch.equal(got, ref) for got, ref in zip((kc, vc, *scales.values()), want)), "int8 store"
    else:
        assert torch.equal(kc.flatten(0, 1)[slots[:-1]], k[:-1]) and torch.equal(vc.flatten(0, 1)[slots[:-1]], v[:-1])
    untouched = torch.ones(kc.shape[0] * page, dtype=torch.bool)
    untouched[slots[:-1]] = False
    assert torch.equal(kc.flatten(0, 1)[untouched], before.flatten(0, 1)[untouched])  # slot -1 wrote nothing
    q = torch.randn(sum(n for _, n in seqs), hq, d, generator=gen)
    cu = torch.tensor([0] + [sum(n for _, n in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    return (q, kc, vc, bt, cu, torch.tensor(lens, dtype=torch.int32)), scales


def _reference(q, kc, vc, bt, cu, lens, scale, **scales):
    from llm_service.layers.attention import paged_attention

    ref = paged_attention(q, kc, vc, bt, cu, lens, scale, **scales)
    for b in range(lens.shape[0]):
        if int(lens[b]) == 0:
            ref[int(cu[b]): int(cu[b + 1])] = 0  # no keys: the kernels give 0 (SDPA over nothing is NaN)
    return ref


def _check(name, out, ref):
    err = (out - ref).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err < 2e-5
    print(f"{'ok  ' if ok else 'FAIL'} max={err:.3e}  {name}", flush=True)
    return ok


def _split_checks(name, run, args, ref, max_q, runs, **scales):
    """The split kernel at each (splits, fold), against the reference and, with EARLY flipped from
    its default (on with more than one split), bitwise against itself."""
    from llm_service.layers import triton_attention as ta

    oks = []
    for splits, fold in runs:
        out = run(ta._split_k, args, max_q, num_splits=splits, fold=fold, block_n=16, **scales)
        flipped = run(ta._split_k, args, max_q, num_splits=splits, fold=fold, block_n=16, early=splits == 1,
                      **scales)
        oks.append(_check(f"{name} splits={splits} fold={fold}", out, ref))
        same = torch.equal(out, flipped)
        print(f"{'ok  ' if same else 'FAIL'} early={splits == 1} bitwise as its default  {name} splits={splits}",
              flush=True)
        oks.append(same)
    return oks


def codes_tile_check(device: str, pure: bool = False, f32: bool = False) -> bool:
    """Every int8 value (-128 too, though never stored) through `_codes_f16` (f32: `_words_f32`,
    the tile read as int32 words) in a [64, 128] tile, scrambled so that a swapped pair of elements shows: each must come back
    exactly, in place."""
    x = ((torch.arange(64 * 128) * 37 + 11) % 256 - 128).to(torch.int8).view(64, 128).to(device)
    assert sorted(set(x.flatten().tolist())) == list(range(-128, 128))
    dtype = torch.float32 if f32 else torch.float16
    y = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
    if f32:
        _words_tile[(1,)](x, y)
    else:
        _codes_tile[(1,)](x, y, PURE=pure)
    return torch.equal(y, x.to(dtype))


def folded_bound(out, q, kc, vc, bt, cu, lens, scale, k_scale, v_scale) -> tuple[bool, float]:
    """16-bit queries over an int8 cache (scales folded in): every output element within its
    roundings' bound of float64 attention over codes x scales, the values the kernels compute
    with. q is exact in fp16, the products of fp16 values exact in fp32; each weight
    p * v_scale is rounded to fp16 (2^-11 of it: at most 2^-11 x attention over |v|, here
    doubled for the fp32 sums and exp2 around it) and the output to q's dtype (half its eps).
    Returns (within, the largest error over its bound)."""
    from llm_service.layers.attention import paged_attention

    k = kc.double() * k_scale.double()[..., None]
    v = vc.double() * v_scale.double()[..., None]
    want = paged_attention(q.double(), k, v, bt, cu, lens, scale).nan_to_num(0.0)
    spread = paged_attention(q.double(), k, v.abs(), bt, cu, lens, scale).nan_to_num(0.0)
    bound = 2**-10 * spread + torch.finfo(q.dtype).eps / 2 * want.abs()
    err = (out.double() - want).abs()
    ratio = float((err / bound.clamp(min=1e-30)).max())
    return bool(torch.isfinite(out).all()) and bool((err <= bound).all()), ratio


def _int8_checks(gen, run, hq, hkv, d, page, scale) -> list[bool]:
    """quant_policy=8: rotary + store against rotary + store into a float cache, then the
    reference's quantize_kv (bit for bit); the kernels against the reference (_case checks the
    plain store's codes and scales)."""
    from llm_service.layers import triton_attention as ta
    from llm_service.layers.attention import quantize_kv
    from llm_service.layers.rotary import RotaryEmbedding

    T = 12
    q, k, v = (torch.randn(T, h, d, generator=gen) for h in (hq, hkv, hkv))
    rope = RotaryEmbedding(d, 64, {"rope_theta": 10000.0})(torch.randint(0, 64, (T,), generator=gen))
    slots = torch.randperm(4 * page, generator=gen)[:T]
    slots[3] = -1
    floats = [torch.zeros(4, page, hkv, d) for _ in range(2)]
    codes = [torch.zeros(4, page, hkv, d, dtype=torch.int8) for _ in range(2)]
    scales = [torch.zeros(4, page, hkv) for _ in range(2)]
    q_float = ta.rope_store(q, k, v, rope, *floats, slots)
    same = torch.equal(ta.rope_store(q, k, v, rope, *codes, slots, *scales), q_float)
    keep = slots[slots >= 0]
    for c, cs, f in zip(codes, scales, floats):
        want_codes, want_scales = quantize_kv(f.flatten(0, 1)[keep])
        same &= torch.equal(c.flatten(0, 1)[keep], want_codes) and torch.equal(cs.flatten(0, 1)[keep], want_scales)
        same &= int((cs > 0).sum()) == keep.shape[0] * hkv  # slot -1 wrote nothing
    print(f"{'ok  ' if same else 'FAIL'} int8 rope_store: quantize_kv of the float cache's K/V, bit for bit", flush=True)
    oks = [same]

    args, scales = _case([(0, 9), (40, 20)], hq, hkv, d, page, gen, int8=True)  # asserts the store's bits
    ref = _reference(*args, scale, **scales)
    oks.append(_check("int8 prefill kernel", run(ta._prefill, args, 20, **scales), ref))
    oks.append(_check("int8 prefill kernel, 16x16 tiles", run(ta._prefill, args, 20, block_m=16, block_n=16, **scales),
                      ref))
    args, scales = _case([(70, 16), (33, 1), (24, 40)], hq, hkv, d, page, gen, int8=True)
    ref = _reference(*args, scale, **scales)
    oks += _split_checks("int8 short prefill", run, args, ref, 40, ((3, True),), **scales)
    args, scales = _case([(0, 1), (129, 1), (4, 1)], hq, hkv, d, page, gen, int8=True)
    ref = _reference(*args, scale, **scales)
    oks += _split_checks("int8 decode", run, args, ref, 1, ((1, True), (4, False)), **scales)
    oks.append(_check("int8 decode via paged_attention", ta.paged_attention(*args, scale, **scales), ref))

    # fp16 queries: the folded path (bf16 dots are unreliable in the interpreter)
    for name, seqs, max_q, splits in (("prefill kernel", [(0, 9), (40, 20)], 20, None),
                                     ("short prefill splits=3", [(70, 16), (33, 1), (24, 40)], 40, 3),
                                     ("decode splits=4", [(0, 1), (129, 1), (4, 1)], 1, 4)):
        args, scales = _case(seqs, hq, hkv, d, page, gen, int8=True)
        args = (args[0].half(), *args[1:])
        out = torch.full(args[0].shape, float("nan"), dtype=torch.float16)
        if splits is None:
            ta._prefill(*args, scale, out, max_q, **scales)
        else:
            ta._split_k(*args, scale, out, max_q, num_splits=splits, block_n=16, **scales)
        ok, ratio = folded_bound(out, *args, scale, scales["k_scale"], scales["v_scale"])
        print(f"{'ok  ' if ok else 'FAIL'} error/bound={ratio:.2f}  int8 fp16 queries {name}", flush=True)
        oks.append(ok)
    ok = not ta._ASM and codes_tile_check("cpu") and codes_tile_check("cpu", f32=True)
    print(f"{'ok  ' if ok else 'FAIL'} int8 codes to fp16 and fp32 (plain conversion): all 256 values, in place",
          flush=True)
    oks.append(ok)
    return oks + _mha_decode_checks(gen, d, page, scale)


def _mha_decode_checks(gen, d, page, scale) -> list[bool]:
    """int8 decode without GQA on CUDA cores (`_decode_mha_kernel`, the default for 16-bit
    queries): a padding row, one and several tiles, at 1 and 4 splits (folded merge and merge
    kernel); fp32 queries against the reference, fp16 ones within the folded bound."""
    from llm_service.layers import triton_attention as ta

    args, scales = _case([(0, 1), (16, 1), (129, 1), (4, 1), (70, 1)], 3, 3, d, page, gen, int8=True)
    args[5][0] = 0
    ref = _reference(*args, scale, **scales)
    oks = []
    for splits, fold in ((1, True), (4, True), (4, False)):
        out = torch.full(args[0].shape, float("nan"))
        ta._split_k(*args, scale, out, 1, num_splits=splits, fold=fold, cuda_cores=True, **scales)
        oks.append(_check(f"int8 MHA decode, CUDA cores, splits={splits} fold={fold}", out, ref))
    half = (args[0].half(), *args[1:])
    for splits in (1, 4):
        out = ta.paged_attention(*half, scale, max_q_len=1, **scales) if splits == 1 else torch.full(
            half[0].shape, float("nan"), dtype=torch.float16)
        if splits > 1:
            ta._split_k(*half, scale, out, 1, num_splits=splits, **scales)
        ok, ratio = folded_bound(out, *half, scale, scales["k_scale"], scales["v_scale"])
        print(f"{'ok  ' if ok else 'FAIL'} error/bound={ratio:.2f}  int8 MHA decode, fp16 queries, splits={splits}",
              flush=True)
        oks.append(ok)
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

    args, _ = _case([(0, 9), (16, 7), (33, 1), (40, 20)], hq, hkv, d, page, gen)
    ref = _reference(*args, scale)
    oks.append(_check("prefill kernel", run(ta._prefill, args, 20), ref))
    # 16-wide tiles: query blocks with key tiles below the diagonal (no causal mask) and on it
    oks.append(_check("prefill kernel, 16x16 tiles", run(ta._prefill, args, 20, block_m=16, block_n=16), ref))

    # short prefills: no prefix, prefixes, a decode row, no queries, one old tile and then three
    # holding new queries (24, 40), a padding sequence (queries, no keys) last
    args, _ = _case([(0, 9), (70, 16), (33, 1), (40, 0), (24, 40), (0, 12)], hq, hkv, d, page, gen)
    args[5][-1] = 0
    ref = _reference(*args, scale)
    oks += _split_checks("short prefill", run, args, ref, 40, ((1, True), (3, True), (3, False), (8, True), (8, False)))

    # decode: a padding row, first tiles of old keys only and first tiles holding the new key
    # (length 5; the last split of lengths 17 and 130)
    args, _ = _case([(0, 1), (16, 1), (129, 1), (4, 1)], hq, hkv, d, page, gen)
    args[5][0] = 0
    ref = _reference(*args, scale)
    oks += _split_checks("decode", run, args, ref, 1, ((1, True), (4, True), (4, False), (16, True)))
    oks.append(_check("decode via paged_attention", ta.paged_attention(*args, scale), ref))

    # MHA decode (one real row of the 16 a program pads to; the merge takes that one) with more
    # active splits than a merge loads at once (_merge_block: 16)
    mha = _case([(300, 1), (40, 1)], 2, 2, d, page, gen)[0]
    mha_ref = _reference(*mha, scale)
    oks += _split_checks("MHA decode", run, mha, mha_ref, 1, ((32, True), (32, False)))

    # a mixed step: two leading decodes (the split kernel) then prefills and a late decode row
    # (the prefill kernel), over a float cache and an int8 one
    for int8 in (False, True):
        args, scales = _case([(16, 1), (129, 1), (0, 9), (40, 20), (33, 1)], hq, hkv, d, page, gen, int8=int8)
        ref = _reference(*args, scale, **scales)
        out = ta.paged_attention(*args, scale, max_q_len=20, num_decodes=2, **scales)
        oks.append(_check(f"mixed step, 2 leading decodes{' int8' if int8 else ''}", out, ref))
    oks += _int8_checks(gen, run, hq, hkv, d, page, scale)

    counters_zero = all(not c.any() for c in ta._COUNTERS.values()) and bool(ta._COUNTERS)
    print(f"{'ok  ' if counters_zero else 'FAIL'} fold counters back to 0", flush=True)
    oks.append(counters_zero)
    if all(oks):
        print("all ok")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(_main())
