"""The fused Triton kernels of a decoder layer against the torch paths they replace
(skipped without CUDA or triton): residual + RMSNorm, SiLU * up, rotary + KV store, GEMV; and
the GEMVs with SiLU * up and with rotary + KV store as their epilogues against the two launches
each replaces, bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from llm_service.layers import attention as ref_attention  # noqa: E402
from llm_service.layers.activation import SiluAndMul  # noqa: E402
from llm_service.layers.norm import RMSNorm  # noqa: E402
from llm_service.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402
from llm_service.layers.triton_attention import rope_store  # noqa: E402
from llm_service.layers.triton_fused import silu_and_mul  # noqa: E402
from llm_service.layers.triton_gemv import MAX_ROWS, gemv, qkv_rope_store  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _ulps(dtype: torch.dtype) -> dict:
    """Tolerance: the kernels sum in another order than torch, so a bf16 result may land
    one rounding step away; fp32 results agree to a few ulps."""
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 96])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    torch.manual_seed(0)
    x = torch.randn(7, hidden, dtype=dtype, device="cuda")
    res = torch.randn_like(x)
    norm = RMSNorm(hidden, 1e-5).cuda().to(dtype)
    norm.weight.data = torch.rand(hidden, device="cuda").to(dtype) + 0.5
    want = norm(x)
    want_out, want_res = norm(x, res)
    assert norm.use_kernels()
    torch.testing.assert_close(norm(x), want, **_ulps(dtype))
    res_in = res.clone()
    out, new_res = norm(x, res_in)
    assert new_res.data_ptr() == res_in.data_ptr()  # updated in place
    torch.testing.assert_close(new_res, want_res, atol=0, rtol=0)  # one rounding, same as torch
    torch.testing.assert_close(out, want_out, **_ulps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start", [0, 48])
def test_vocab_shard_embedding_equals_masked_lookup(dtype, start):
    """A shard of 48 rows starting at `start`: ids inside give their rows, ids outside (below,
    above, the padding past the vocabulary) give zeros, bit for bit what F.embedding with the
    shard's mask gives; hidden 4096 (4 programs a token) and 96 (one, masked)."""
    from llm_service.layers.triton_fused import embedding

    torch.manual_seed(0)
    ids = torch.tensor([0, 5, 47, 48, 60, 95, 96, 200, 1], device="cuda")
    for hidden in (4096, 96):
        w = torch.randn(48, hidden, dtype=dtype, device="cuda")
        local = ids - start
        mine = (local >= 0) & (local < 48)
        want = F.embedding(torch.where(mine, local, 0), w) * mine.unsqueeze(-1).to(dtype)
        got = embedding(ids, w, start)
        assert got.shape == (ids.shape[0], hidden)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert embedding(ids[:0], w, start).shape == (0, hidden)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [11008, 40])
def test_silu_and_mul(dtype, inter):
    torch.manual_seed(0)
    x = torch.randn(5, 2 * inter, dtype=dtype, device="cuda") * 3
    act = SiluAndMul()
    want = act(x)
    assert act.use_kernels()
    torch.testing.assert_close(act(x), want, **_ulps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(32, 32), (8, 2), (3, 1)])
def test_rope_store_equals_rotary_then_store(dtype, hq, hkv):
    torch.manual_seed(0)
    d, page, T = 128 if hq == 32 else 64, 16, 9
    rotary = RotaryEmbedding(d, 4096, {"rope_theta": 10000.0}).cuda()
    qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dtype, device="cuda")
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # strided views, as the model has them
    q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
    positions = torch.tensor([0, 1, 2, 17, 300, 301, 4000, 5, 6], device="cuda")
    slots = torch.tensor([3, 4, 5, -1, 40, 41, 63, 0, 1], device="cuda")
    rope = rotary(positions)
    cache = dict(size=(4, page, hkv, d), dtype=dtype, device="cuda")
    k_want, v_want = torch.zeros(**cache), torch.zeros(**cache)
    q_want, k_rot = apply_rotary(q, k, *rope.gathered)
    ref_attention.store_kvcache(k_rot, v, k_want, v_want, slots)
    k_got, v_got = torch.zeros(**cache), torch.zeros(**cache)
    q_got = rope_store(q, k, v, rope, k_got, v_got, slots)
    exact = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else _ulps(dtype)  # bf16: the same roundings
    torch.testing.assert_close(q_got, q_want, **exact)
    torch.testing.assert_close(k_got, k_want, **exact)
    assert torch.equal(v_got, v_want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", list(range(1, MAX_ROWS + 1)))
@pytest.mark.parametrize("n,k", [(4096, 4096), (100, 300), (64, 11008)])
def test_gemv_equals_linear(dtype, rows, n, k):
    torch.manual_seed(rows)
    x = torch.randn(rows, k, dtype=dtype, device="cuda")
    w = torch.randn(n, k, dtype=dtype, device="cuda") * k**-0.5
    b = torch.randn(n, dtype=dtype, device="cuda")
    want = F.linear(x.double(), w.double(), b.double())
    got = gemv(x, w, b)
    assert got.shape == (rows, n) and got.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.randn(MAX_ROWS + 1, k, dtype=dtype, device="cuda"), w)


# Llama-7B's MLP (11008; 5504 a rank at tp 2) and odd sizes: I not a multiple of any program's rows,
# K not a multiple of any K slice (a one-row slice is 1024 wide at K <= 2048, 2048/4096 past 4096)
GATED_SHAPES = [(11008, 4096), (5504, 4096), (37, 300), (1000, 1500), (100, 5000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", list(range(1, MAX_ROWS + 1)))
@pytest.mark.parametrize("inter,k", GATED_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gated_gemv_has_the_bits_of_gemv_then_silu_and_mul(dtype, rows, inter, k, bias):
    """SiLU * up in the gate_up GEMV's epilogue: each row summed as the plain GEMV sums it and rounded
    to the model dtype, then silu_and_mul's roundings, so bit for bit the two launches it replaces."""
    torch.manual_seed(rows)
    x = torch.randn(rows, k, dtype=dtype, device="cuda")
    w = torch.randn(2 * inter, k, dtype=dtype, device="cuda") * k**-0.5
    b = torch.randn(2 * inter, dtype=dtype, device="cuda") if bias else None
    got = gemv(x, w, b, gated=True)
    assert got.shape == (rows, inter) and got.dtype == dtype
    torch.testing.assert_close(got, silu_and_mul(gemv(x, w, b)), atol=0, rtol=0)


# heads, kv heads, head_dim, hidden, qkv bias: Llama-7B (and a tp 2 rank of it), Qwen2-7B's GQA with
# its qkv bias, odd sizes (a program's row pairs straddle heads at head_dim 80; K of no slice multiple)
QKV_SHAPES = [(32, 32, 128, 4096, False), (16, 16, 128, 4096, False), (28, 4, 128, 3584, True),
              (8, 2, 64, 300, True), (3, 1, 80, 1000, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", list(range(1, MAX_ROWS + 1)))
@pytest.mark.parametrize("hq,hkv,d,k,bias", QKV_SHAPES)
def test_qkv_rope_store_has_the_bits_of_gemv_then_rope_store(dtype, rows, hq, hkv, d, k, bias):
    """Rotary + KV-cache store in the QKV GEMV's epilogue: q, the caches (slot -1 rows untouched) bit
    for bit those of the GEMV and rope_store it replaces."""
    torch.manual_seed(rows)
    x = torch.randn(rows, k, dtype=dtype, device="cuda")
    w = torch.randn((hq + 2 * hkv) * d, k, dtype=dtype, device="cuda") * k**-0.5
    b = torch.randn(w.shape[0], dtype=dtype, device="cuda") if bias else None
    rope = RotaryEmbedding(d, 4096, {"rope_theta": 10000.0}).cuda()(torch.randint(0, 4096, (rows,), device="cuda"))
    page = 16
    slots = torch.randperm(8 * page, device="cuda")[:rows]
    if rows > 1:
        slots[rows // 2] = -1  # a padding row: q still written, nothing stored
    k_cache = torch.randn(8, page, hkv, d, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    q, k_, v = gemv(x, w, b).split([hq * d, hkv * d, hkv * d], dim=-1)
    q_want = rope_store(q.view(rows, hq, d), k_.view(rows, hkv, d), v.view(rows, hkv, d), rope, k_want, v_want, slots)
    q_got = qkv_rope_store(x, w, b, rope, k_cache, v_cache, slots, hq, hkv)
    torch.testing.assert_close(q_got, q_want, atol=0, rtol=0)
    torch.testing.assert_close(k_cache, k_want, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_want, atol=0, rtol=0)


def _layer_chain(x, res, norm_w, w_up, w_down, steps, gated=False):
    """A decoder-MLP-shaped chain of dependent kernels (norm -> GEMV -> SiLU*up -> GEMV), repeated;
    gated: SiLU*up in the first GEMV's epilogue."""
    from llm_service.layers.triton_fused import rms_norm

    for _ in range(steps):
        h = rms_norm(x, norm_w, 1e-5, res)
        x = gemv(gemv(h, w_up, gated=True) if gated else silu_and_mul(gemv(h, w_up)), w_down)
    return x


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_pdl_chain_in_a_graph_matches_plain_launches(monkeypatch, rows, gated):
    """Programmatic dependent launch lets each kernel start before the previous one ends; a wait
    placed wrong would read stale activations. The same chain, eager and replayed from a CUDA graph
    with PDL, must give the bits of the chain launched without it (and, gated, without the fusion)."""
    from llm_service.layers import pdl

    dev = torch.device("cuda")
    if not pdl.enabled(dev):
        pytest.skip("PDL needs compute capability >= 9")
    torch.manual_seed(0)
    hidden, inter = 1024, 2816
    x = torch.randn(rows, hidden, dtype=torch.bfloat16, device=dev)
    res = torch.randn_like(x)
    norm_w = torch.rand(hidden, device=dev).to(torch.bfloat16) + 0.5
    w_up = (torch.randn(2 * inter, hidden, device=dev) / hidden**0.5).to(torch.bfloat16)
    w_down = (torch.randn(hidden, inter, device=dev) / inter**0.5).to(torch.bfloat16)

    monkeypatch.setenv("PRISM_PDL", "0")
    pdl.enabled.cache_clear()
    r0 = res.clone()
    want = _layer_chain(x, r0, norm_w, w_up, w_down, 24)
    monkeypatch.setenv("PRISM_PDL", "1")
    pdl.enabled.cache_clear()
    assert pdl.enabled(dev)
    r1 = res.clone()
    torch.testing.assert_close(_layer_chain(x, r1, norm_w, w_up, w_down, 24, gated), want, atol=0, rtol=0)
    torch.testing.assert_close(r1, r0, atol=0, rtol=0)

    static_x, static_res = x.clone(), res.clone()
    _layer_chain(static_x, static_res.clone(), norm_w, w_up, w_down, 1, gated)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _layer_chain(static_x, static_res, norm_w, w_up, w_down, 24, gated)
    for _ in range(3):
        static_res.copy_(res)
        graph.replay()
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        torch.testing.assert_close(static_res, r0, atol=0, rtol=0)
