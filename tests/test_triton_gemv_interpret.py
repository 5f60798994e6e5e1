"""The fused GEMVs in Triton's CPU interpreter (fp32: its bf16/fp16 dots are unreliable) against the
launches they replace: the gated GEMV against silu_and_mul of the plain GEMV, the QKV GEMV with its
rotary + KV-store epilogue against rope_store of the plain GEMV's q, k, v (GQA, a bias, slot -1
rows, heads that straddle a program's rows). Both must give the same bits, for one row of x (the
tl.sum path) and 2..8 rows (tl.dot), with N not a multiple of the rows a program owns and K not a
multiple of the K slice; and Llama's MLP and attention, which take them for up to EPILOGUE_ROWS
rows, must give the bits of their unfused paths (attention over an int8 cache takes the plain
GEMV and rope_store, which stores quantize_kv of the K/V the fused kernel stores).

One caveat of the interpreter: its tl.dot is numpy's matmul, whose sum for an output column
depends on where in the tile the column sits, and the fused kernels move rows (up row j sits
where gate row j does, not at I + j; a head's row d + D/2 where its row d does). So for 2..8
rows the plain GEMV is run on the rows at the fused kernel's positions (`_plain_at`): the same
slices, sums and roundings. A GPU's dots (tensor-core MMA for 16-bit, FMA chains for fp32) and
the one-row tl.sum give a column's sum independently of its position;
tests/gpu/test_fused_kernels.py checks the fused kernels there against the plain layout, bf16
and fp32. Shapes where the positions agree (intermediate a multiple of 32, head_dim 64) are
checked against the plain layout here too.

The interpreter is chosen when triton is imported, so the checks run in a child process with
TRITON_INTERPRET=1 (this file run as a script).
"""
from __future__ import annotations

import sys

import torch

from tests.interpreter import needs_triton, run_script


@needs_triton
def test_fused_gemvs_in_the_interpreter():
    run_script(__file__)


def _report(name: str, ok: bool) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    return ok


def _plain_at(x, w, b, first, second):
    """The plain GEMV's output with every row summed at the tile position the fused kernel gives it:
    rows first[i] and second[i] (gate and up; the two rotary halves) both at position i."""
    from llm_service.layers.triton_gemv import gemv

    y = torch.empty(x.shape[0], w.shape[0])
    for rows in (first, second):
        y[:, rows] = gemv(x, w[rows], None if b is None else b[rows])
    return y


def _gated(gen) -> list[bool]:
    import torch.nn.functional as F

    from llm_service.layers.triton_fused import silu_and_mul
    from llm_service.layers.triton_gemv import gemv

    oks = []
    K = 1100  # one row: 8 rows a program, 1024-wide slices; 2..8 rows: 32 rows a program, 128-wide slices
    for inter, rows in ((37, 1), (37, 2), (37, 5), (37, 8), (64, 3)):
        w = torch.randn(2 * inter, K, generator=gen) * K**-0.5
        b = torch.randn(2 * inter, generator=gen)
        x = torch.randn(rows, K, generator=gen)
        gate_rows = torch.arange(inter)
        for bias in (None, b):
            got = gemv(x, w, bias, gated=True)
            at_plain_positions = rows == 1 or inter % 32 == 0
            plain = gemv(x, w, bias) if at_plain_positions else _plain_at(x, w, bias, gate_rows, gate_rows + inter)
            gate, up = F.linear(x.double(), w.double(), None if bias is None else bias.double()).chunk(2, dim=-1)
            close = torch.allclose(got.double(), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
            ok = torch.equal(got, silu_and_mul(plain)) and close and got.shape == (rows, inter)
            oks.append(_report(f"gated gemv rows={rows} I={inter} bias={bias is not None}: "
                               "bits of silu_and_mul(gemv)", ok))
    return oks


def _qkv_case(gen, rows, hq, hkv, d, bias):
    """x, the qkv weight and bias, rope, caches of random contents and a slot per row (the second -1)."""
    from llm_service.layers.rotary import RotaryEmbedding

    K, page, blocks = 1100, 4, 6
    w = torch.randn((hq + 2 * hkv) * d, K, generator=gen) * K**-0.5
    b = torch.randn(w.shape[0], generator=gen) if bias else None
    x = torch.randn(rows, K, generator=gen)
    rope = RotaryEmbedding(d, 64, {"rope_theta": 10000.0})(torch.randint(0, 64, (rows,), generator=gen))
    slots = torch.randperm(blocks * page, generator=gen)[:rows]
    if rows > 1:
        slots[1] = -1
    cache = torch.randn(blocks, page, hkv, d, generator=gen)
    return x, w, b, rope, cache, torch.randn(cache.shape, generator=gen), slots


def _qkv(gen) -> list[bool]:
    from llm_service.layers.rotary import apply_rotary
    from llm_service.layers.triton_attention import rope_store
    from llm_service.layers.triton_gemv import gemv, qkv_rope_store

    oks = []
    # MHA; GQA with a bias (head_dim 12: a program's row pairs straddle heads); GQA group 5; head_dim 64
    for rows, hq, hkv, d, bias in ((1, 2, 2, 16, False), (1, 4, 2, 12, True), (3, 4, 2, 12, True),
                                   (8, 5, 1, 8, True), (2, 2, 2, 16, False), (4, 2, 1, 64, True)):
        x, w, b, rope, kc, vc, slots = _qkv_case(gen, rows, hq, hkv, d, bias)
        pair = torch.arange((hq + 2 * hkv) * d // 2)
        lo = pair // (d // 2) * d + pair % (d // 2)  # the kernel's row pairs (lo, lo + d/2)
        plain = gemv(x, w, b) if rows == 1 or d == 64 else _plain_at(x, w, b, lo, lo + d // 2)
        q, k, v = plain.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(rows, hq, d), k.view(rows, hkv, d), v.view(rows, hkv, d)
        kc_want, vc_want = kc.clone(), vc.clone()
        q_want = rope_store(q, k, v, rope, kc_want, vc_want, slots)
        q_got = qkv_rope_store(x, w, b, rope, kc, vc, slots, hq, hkv)
        same = torch.equal(q_got, q_want) and torch.equal(kc, kc_want) and torch.equal(vc, vc_want)
        q_rot, k_rot = apply_rotary(q, k, *rope.gathered)  # the torch path, to a few fp32 roundings
        keep = slots >= 0
        close = torch.allclose(q_got, q_rot, atol=1e-5) and torch.allclose(
            kc.flatten(0, 1)[slots[keep]], k_rot[keep], atol=1e-5)
        oks.append(_report(f"qkv gemv + rope + store rows={rows} heads={hq}/{hkv}x{d} bias={bias}: "
                           "bits of rope_store(gemv)", same and close))
    return oks


def _llama_layers(gen) -> list[bool]:
    """LlamaMLP and LlamaAttention with kernels on: up to EPILOGUE_ROWS rows take the fused GEMVs and
    give the bits of the unfused launches (more rows take the plain GEMV), and the caches hold the same K/V (shapes where the interpreter's positions
    agree: intermediate 64, head_dim 64); one row over an int8 cache takes the plain GEMV."""
    from llm_service.layers import triton_gemv
    from llm_service.layers.attention import AttentionMetadata, kv_cache, quantize_kv
    from llm_service.layers.rotary import RotaryEmbedding
    from llm_service.models.llama import LlamaArgs, LlamaAttention, LlamaMLP

    a = LlamaArgs(vocab_size=8, hidden_size=48, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=64, rope={"rope_theta": 10000.0},
                  attention_bias=True, mlp_bias=True)
    calls = []  # which GEMVs the layers launch
    gemv, qkv_rope_store = triton_gemv.gemv, triton_gemv.qkv_rope_store
    triton_gemv.gemv = lambda *a, **kw: calls.append("gated" if kw.get("gated") else "plain") or gemv(*a, **kw)
    triton_gemv.qkv_rope_store = lambda *a: calls.append("qkv") or qkv_rope_store(*a)
    mlp, attn = LlamaMLP(a), LlamaAttention(a)
    for p in (*mlp.parameters(), *attn.parameters()):
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    for m in (*mlp.modules(), *attn.modules()):
        if hasattr(m, "use_kernels"):
            assert m.use_kernels()
    rotary = RotaryEmbedding(a.head_dim, 64, a.rope)
    oks = []
    for rows in (1, 3):
        x = torch.randn(rows, a.hidden_size, generator=gen)
        calls.clear()
        fused = mlp(x)
        epilogue = rows <= triton_gemv.EPILOGUE_ROWS
        want = ["gated", "plain"] if epilogue else ["plain", "plain"]
        same = calls == want and torch.equal(fused, mlp.down_proj(mlp.act(mlp.gate_up_proj(x))))
        oks.append(_report(f"LlamaMLP, {rows} rows: {want}, bits of the unfused path", same))

        lens = [5, 9, 2][:rows]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([4, -1, 9][:rows]), seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([[1, 0, 0], [2, 3, 0], [0, 0, 0]][:rows], dtype=torch.int32),
            cu_seqlens_q=torch.arange(rows + 1, dtype=torch.int32), max_q_len=1)
        rope = rotary(torch.tensor([n - 1 for n in lens]))
        kc, vc = torch.randn(4, 4, 2, a.head_dim, generator=gen), torch.randn(4, 4, 2, a.head_dim, generator=gen)
        attn.attn.k_cache, attn.attn.v_cache = kc.clone(), vc.clone()
        calls.clear()
        fused = attn(rope, x, meta)
        want = ["qkv", "plain"] if epilogue else ["plain", "plain"]
        taken = calls == want
        k_fused, v_fused = attn.attn.k_cache, attn.attn.v_cache
        attn.attn.k_cache, attn.attn.v_cache = kc, vc
        q, k, v = attn.qkv_proj(x).split([4 * a.head_dim, 2 * a.head_dim, 2 * a.head_dim], dim=-1)
        o = attn.attn(q.view(rows, 4, -1), k.view(rows, 2, -1), v.view(rows, 2, -1), rope, meta)
        same = torch.equal(fused, attn.o_proj(o.flatten(1))) and torch.equal(k_fused, kc) and torch.equal(v_fused, vc)
        same = same and taken
        oks.append(_report(f"LlamaAttention, {rows} rows: {want}, bits of the unfused path", same))

    x = torch.randn(1, a.hidden_size, generator=gen)
    meta = AttentionMetadata(slot_mapping=torch.tensor([10]), seq_lens=torch.tensor([7], dtype=torch.int32),
                             block_tables=torch.tensor([[1, 2]], dtype=torch.int32),
                             cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32), max_q_len=1)
    rope = rotary(torch.tensor([6]))
    attn.attn.k_cache, attn.attn.v_cache = torch.zeros(4, 4, 2, a.head_dim), torch.zeros(4, 4, 2, a.head_dim)
    attn(rope, x, meta)  # one row: the fused kernel
    floats = attn.attn.k_cache, attn.attn.v_cache
    attn.attn.k_cache, attn.attn.k_scale = kv_cache(4, 4, 2, a.head_dim, torch.float32, torch.device("cpu"), True)
    attn.attn.v_cache, attn.attn.v_scale = kv_cache(4, 4, 2, a.head_dim, torch.float32, torch.device("cpu"), True)
    calls.clear()
    attn(rope, x, meta)
    same = calls == ["plain", "plain"]
    for f, c, sc in zip(floats, (attn.attn.k_cache, attn.attn.v_cache), (attn.attn.k_scale, attn.attn.v_scale)):
        codes, scales = quantize_kv(f.flatten(0, 1)[10])
        same &= torch.equal(c.flatten(0, 1)[10], codes) and torch.equal(sc.flatten(0, 1)[10], scales)
    oks.append(_report("LlamaAttention, 1 row, int8 cache: ['plain', 'plain'], quantize_kv of the fused "
                       "kernel's K/V", same))
    return oks


def _sends(gen) -> list[bool]:
    """The GEMV that sends a row-parallel layer's partial sums (ll_allreduce.send_partials), as rank
    0 and rank 1 of two whose receive buffers are host tensors here: the same result as the plain
    GEMV, and in the peer's slot for this rank, at the next call's half, packets of this call's
    flag carrying the result's words (bf16: column pairs; fp32: one a word). One row in bf16 (the
    interpreter's bf16 tl.dot is unreliable), 1 and 3 rows in fp32; N not a multiple of the
    program's rows."""
    from llm_service.distributed.ll_allreduce import LLAllReduce
    from llm_service.layers.triton_gemv import gemv

    world, max_bytes = 2, 16384
    words = max_bytes // 4
    bufs = [torch.zeros(2 * world * words, dtype=torch.int64) for _ in range(world)]
    table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    oks = []
    for dtype, rows in ((torch.bfloat16, 1), (torch.float32, 1), (torch.float32, 3)):
        for rank in range(world):
            done = 6 + rank  # calls so far: the packets are call done + 1's
            ll = LLAllReduce(bufs[rank], None, table, torch.tensor([done]), torch.zeros(1, dtype=torch.int32),
                             rank, world, max_bytes)
            x = torch.randn(rows, 96, generator=gen).to(dtype)
            w = torch.randn(44, 96, generator=gen).to(dtype)
            y = gemv(x, w, send=ll)
            call = done + 1
            start = (call % 2 * world + rank) * words
            slot = bufs[1 - rank][start: start + y.numel() * y.element_size() // 4]
            flags_ok = bool((((slot >> 32) & 0xFFFFFFFF) == call % 0xFFFFFFFF + 1).all())
            sent = (slot & 0xFFFFFFFF).to(torch.int32).view(dtype).view(rows, 44)
            oks.append(_report(f"gemv sending partial sums {dtype} rows={rows} as rank {rank}: the plain "
                               "GEMV's result, in the peer's slot with this call's flag",
                               torch.equal(y, gemv(x, w)) and flags_ok and torch.equal(sent, y)))
    return oks


def _main() -> int:
    gen = torch.Generator().manual_seed(0)
    oks = _gated(gen) + _qkv(gen) + _llama_layers(gen) + _sends(gen)
    if all(oks):
        print("all ok")
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(_main())
