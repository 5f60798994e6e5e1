"""The int8 KV cache (quant_policy=8) on CUDA (skipped without CUDA or triton): the Triton store
gives the CPU reference's codes and scales bit for bit (bf16 and fp32, with and without rotary),
the inline-asm conversion of the codes gives every int8 value back exactly, the prefill and split
kernels over int8 caches match a float64 reference over the values they compute with (fp32
closely, 16-bit within the bound of their roundings), so does the CUDA-core decode of MHA models
at each tile, decode replays from a CUDA graph, and the
tiny model's engine runs over an int8 cache."""
from __future__ import annotations

import pytest
import torch

from llm_service.engine.cuda_graph import DecodeGraphs
from llm_service.layers import attention as ref
from llm_service.layers import triton_attention as ta
from llm_service.layers.attention import dequantize_kv, kv_cache
from llm_service.layers.rotary import Rope, RotaryEmbedding
from tests.test_kv_int8 import _engine, _errors, _generate, random_image_prompts
from tests.test_llm_engine import collect, request, run
from tests.test_triton_attention_interpret import codes_tile_check, folded_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ta.AVAILABLE, reason="needs CUDA and triton")

PAGE = 16


@pytest.fixture(scope="module")
def prompts(tiny_llava):
    return random_image_prompts(tiny_llava)


def _int8_caches(blocks: int, hkv: int, d: int, device: str = "cuda") -> list[torch.Tensor]:
    """[k codes, v codes, k scales, v scales], zeroed."""
    (kc, ks), (vc, vs) = (kv_cache(blocks, PAGE, hkv, d, torch.float32, torch.device(device), True) for _ in "kv")
    return [kc, vc, ks, vs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_gives_the_reference_codes_and_scales(dtype):
    torch.manual_seed(0)
    T, hq, hkv, d, blocks = 300, 32, 8, 128, 40
    q, k, v = (torch.randn(T, h, d, device="cuda").mul(3).to(dtype) for h in (hq, hkv, hkv))
    k[5], v[6, 2] = 0, 0  # zero rows: codes 0, scale 1
    slots = torch.randperm(blocks * PAGE, device="cuda")[:T]
    slots[7] = -1
    got, want = _int8_caches(blocks, hkv, d), _int8_caches(blocks, hkv, d, "cpu")
    ta.store_kvcache(k, v, got[0], got[1], slots, got[2], got[3])
    ref.store_kvcache(k.cpu(), v.cpu(), want[0], want[1], slots.cpu(), want[2], want[3])
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))

    # rotary + store: the codes and scales of what rope_store stores into a cache of k's dtype
    rope = RotaryEmbedding(d, 4096, {"rope_theta": 10000.0}).cuda()(torch.randint(0, 4096, (T,), device="cuda"))
    floats = [torch.zeros(blocks, PAGE, hkv, d, dtype=dtype, device="cuda") for _ in "kv"]
    q_float = ta.rope_store(q, k, v, rope, *floats, slots)
    got = _int8_caches(blocks, hkv, d)
    assert torch.equal(ta.rope_store(q, k, v, rope, got[0], got[1], slots, got[2], got[3]), q_float)
    keep = slots[slots >= 0]
    for codes, scales, f in zip(got[:2], got[2:], floats):
        want_codes, want_scales = ref.quantize_kv(f.flatten(0, 1)[keep].cpu())
        assert torch.equal(codes.flatten(0, 1)[keep].cpu(), want_codes)
        assert torch.equal(scales.flatten(0, 1)[keep].cpu(), want_scales)


def test_codes_convert_exactly_with_the_inline_asm():
    assert ta._ASM and codes_tile_check("cuda") and codes_tile_check("cuda", pure=True)
    assert codes_tile_check("cuda", f32=True)


def _batch(seqs, hq, hkv, d, dtype):
    """seqs: (cached prefix, new tokens); every position's K/V stored into int8 caches by the kernel."""
    lens = [c + n for c, n in seqs]
    nblk = [-(-L // PAGE) for L in lens]
    perm = torch.randperm(sum(nblk) + 2).tolist()
    bt = torch.zeros(len(seqs), max(nblk) + 2, dtype=torch.int32)
    for b, n in enumerate(nblk):
        bt[b, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    caches = _int8_caches(sum(nblk) + 2, hkv, d)
    slots = torch.tensor([int(bt[b, p // PAGE]) * PAGE + p % PAGE for b, L in enumerate(lens) for p in range(L)],
                         device="cuda")
    k, v = (torch.randn(slots.shape[0], hkv, d, device="cuda").to(dtype) for _ in "kv")
    ta.store_kvcache(k, v, caches[0], caches[1], slots, caches[2], caches[3])
    q = torch.randn(sum(n for _, n in seqs), hq, d, device="cuda").to(dtype)
    cu = torch.tensor([0] + [sum(n for _, n in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    return q, caches, bt.cuda(), cu.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


def _check(out, q, caches, bt, cu, lens, scale):
    """fp32 queries: within 1e-5 (relative L2) of float64 attention over the values the kernels
    read, the caches dequantized to fp32. 16-bit ones: every element within the bound of its
    roundings (folded_bound) of float64 attention over codes x scales. Rows without keys
    (padding) are 0, as the kernels give."""
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    if q.dtype != torch.float32:
        ok, ratio = folded_bound(out.cpu(), q.cpu(), *(c.cpu() for c in caches[:2]), bt.cpu(), cu.cpu(), lens.cpu(),
                                 scale, caches[2].cpu(), caches[3].cpu())
        assert ok, ratio
        return
    kc, vc, ks, vs = caches
    k, v = (dequantize_kv(c, s, q.dtype).double() for c, s in ((kc, ks), (vc, vs)))
    want = ref.paged_attention(q.double(), k, v, bt, cu, lens, scale).nan_to_num(0.0)
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5


CASES = [(32, 32, 128, torch.bfloat16), (8, 2, 64, torch.bfloat16), (8, 2, 64, torch.float16), (4, 2, 16, torch.float32)]


@pytest.mark.parametrize("hq,hkv,d,dtype", CASES)
def test_prefill_and_split_kernels_over_int8(hq, hkv, d, dtype):
    seqs = [(0, 37), (48, 20), (100, 1), (256, 64)]
    q, caches, bt, cu, lens = _batch(seqs, hq, hkv, d, dtype)
    scales = dict(k_scale=caches[2], v_scale=caches[3])
    out = ta.paged_attention(q, caches[0], caches[1], bt, cu, lens, d ** -0.5, max_q_len=64, **scales)
    _check(out, q, caches, bt, cu, lens, d ** -0.5)
    out = torch.full_like(q, float("nan"))
    ta._prefill(q, caches[0], caches[1], bt, cu, lens, d ** -0.5, out, 64, **scales)
    _check(out, q, caches, bt, cu, lens, d ** -0.5)
    for splits in (1, 4, 16):
        for early in (None, True, False):
            out = torch.full_like(q, float("nan"))
            ta._split_k(q, caches[0], caches[1], bt, cu, lens, d ** -0.5, out, 64, num_splits=splits, early=early,
                        **scales)
            _check(out, q, caches, bt, cu, lens, d ** -0.5)


@pytest.mark.parametrize("block_n,warps", [(16, 1), (16, 2), (32, 4), (64, 2)])
def test_mha_decode_on_cuda_cores(block_n, warps):
    """int8 decode without GQA, CUDA-core kernel: tile sizes and warp counts at 1 and 4 splits
    (folded, and merged by the merge kernel), 16-bit queries within the folded bound and fp32
    ones against float64 (the default sends fp32 to the tensor-core kernel)."""
    lengths = [1, 17, 64, 300, 1500, 2]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, caches, bt, cu, lens = _batch([(L - 1, 1) for L in lengths], 32, 32, 128, dtype)
        for splits, fold in ((1, True), (4, True), (4, False)):
            out = torch.full_like(q, float("nan"))
            ta._split_k(q, caches[0], caches[1], bt, cu, lens, 128 ** -0.5, out, 1, k_scale=caches[2],
                        v_scale=caches[3], num_splits=splits, fold=fold, block_n=block_n, num_warps=warps,
                        cuda_cores=True)
            _check(out, q, caches, bt, cu, lens, 128 ** -0.5)


@pytest.mark.parametrize("hq,hkv,d,dtype", CASES)
def test_rope_store_and_decode_in_a_cuda_graph(hq, hkv, d, dtype):
    """The model's order in one graph: rope_store quantizes this step's K/V into the int8 cache,
    then split-K decode reads it (its first tiles of older keys before the PDL wait, with several
    splits); padding rows (slot -1, seq_len 0) store nothing and give 0. Each replay stores new
    K/V: the codes must be the reference's and the output the reference's over them, bitwise the
    same on a second replay."""
    lengths = [1, 17, 64, 300, 1500, 1, 900, 2]
    q_in, caches, bt, cu, lens = _batch([(L - 1, 1) for L in lengths], hq, hkv, d, dtype)
    lens[[1, 5]] = 0
    positions = (lens.long() - 1).clamp(min=0)
    slots = bt[torch.arange(len(lengths), device="cuda"), positions // PAGE].long() * PAGE + positions % PAGE
    slots[[1, 5]] = -1
    k_in, v_in = (torch.randn(len(lengths), hkv, d, device="cuda").to(dtype) for _ in "kv")
    table = (int(positions.max()) + 1, d)
    identity = Rope(torch.ones(table, device="cuda"), torch.zeros(table, device="cuda"), positions)

    def step():
        q = ta.rope_store(q_in, k_in, v_in, identity, caches[0], caches[1], slots, caches[2], caches[3])
        return ta.paged_attention(q, caches[0], caches[1], bt, cu, lens, d ** -0.5, max_q_len=1,
                                  k_scale=caches[2], v_scale=caches[3])

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    keep = slots >= 0
    for _ in range(3):
        for x in (q_in, k_in, v_in):
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        first = out.clone()
        for x, c, s in ((k_in, caches[0], caches[2]), (v_in, caches[1], caches[3])):
            codes, scales = ref.quantize_kv(x[keep].cpu())
            assert torch.equal(c.flatten(0, 1)[slots[keep]].cpu(), codes)
            assert torch.equal(s.flatten(0, 1)[slots[keep]].cpu(), scales)
        _check(first, q_in, caches, bt, cu, lens, d ** -0.5)
        assert (first[[1, 5]] == 0).all()
        graph.replay()
        assert torch.equal(out, first)


def test_engine_fp32_int8_with_graphs_matches_the_cpu_reference(tiny_llava, prompts, monkeypatch):
    """The tiny fp32 model over an int8 cache: Triton kernels, decode replayed from CUDA graphs,
    against the CPU path over an int8 cache. Both store the same codes up to the fp32 rounding of
    the model's sums (which may flip an odd code), so their logits agree far closer than the
    quantization's own 1-5% (tests/test_kv_int8.py)."""
    replayed, replay = [], DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, *args: replayed.append(1) or replay(self, *args))
    vision, cases = prompts
    cuda = _generate(tiny_llava, vision, cases, device="cuda", quant_policy=8, cache_max_entry_count=256)
    cpu = _generate(tiny_llava, vision, cases, quant_policy=8)
    assert replayed
    for name in cases:
        rel, _ = _errors(cpu[name], cuda[name])
        assert rel < 1e-3, (name, rel)


def _bf16_run(path, vision, cases, policy: int) -> tuple[int, int]:
    """(blocks, bytes a block) of a bf16 engine given 5% of the free memory, after it generated
    for every prompt (with decode graphs) and freed every block."""
    eng = _engine(path, vision, device="cuda", dtype="bfloat16", cache_max_entry_count=0.05, quant_policy=policy)
    try:
        runner = eng.engine.runner
        assert runner.graphs is not None
        for prompt in cases.values():
            result = run(collect(eng, request(prompt.segments, max_new_tokens=16)))
            assert len(result.tokens) >= 1 and result.finish in ("stop", "length")
        info = run(eng.info())
        assert info.free_blocks == info.total_blocks
        return runner.num_blocks, runner._block_bytes()
    finally:
        eng.close()


def test_engine_bf16_int8_holds_more_blocks_and_frees_them(tiny_llava, prompts):
    """The same memory fraction holds block_bytes(bf16) / block_bytes(int8) times the blocks
    (1.6x at the tiny model's head_dim 16; 1.94x at 128)."""
    vision, cases = prompts
    (blocks16, bytes16), (blocks8, bytes8) = (_bf16_run(tiny_llava, vision, cases, p) for p in (0, 8))
    assert bytes16 / bytes8 == pytest.approx(1.6)
    # the two engines measure the free memory apart (10%: without the scales counted it would be 2x, 25% off)
    assert blocks8 / blocks16 == pytest.approx(bytes16 / bytes8, rel=0.1)
