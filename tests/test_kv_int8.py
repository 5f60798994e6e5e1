"""The int8 KV cache (LMDeploy's quant_policy=8) on CPU: the config and CLI flag, the reference's
quantization (error bound, zero rows, rounding), attention over an int8 cache against attention
over its dequantized values, cache sizing, and the engine end to end: logits within what the
quantization's own error bound explains, and prefix-cache hits and preemption unchanged."""
from __future__ import annotations

import asyncio

import pytest
import torch

from llm_service.config import EngineConfig, PytorchEngineConfig, TurbomindEngineConfig
from llm_service.engine import AsyncLLMEngine
from llm_service.layers import attention
from llm_service.layers.attention import dequantize_kv, kv_bytes_per_token, paged_attention, quantize_kv, store_kvcache
from tests.test_llm_engine import PARTS, ROWS, FakeVision, assert_all_free, build_prompt, collect, request, run


@pytest.mark.parametrize("cls", [EngineConfig, TurbomindEngineConfig, PytorchEngineConfig])
def test_quant_policy_accepts_0_and_8_only(cls):
    assert cls().quant_policy == 0 and cls(quant_policy=8).quant_policy == 8
    for bad in (4, 1, 16, -1):
        with pytest.raises(ValueError, match=r"quant_policy must be 0 .* or 8 .*int4.* not supported"):
            cls(quant_policy=bad)


def test_cli_flag_and_tp_workers_carry_the_format():
    from gateway.cli import _engine_config, build_parser
    from llm_service.distributed.launcher import WorkerArgs

    parse = build_parser().parse_args
    assert _engine_config(parse(["serve", "llm", "--model", "m"])).quant_policy == 0
    config = _engine_config(parse(["serve", "llm", "--model", "m", "--quant-policy", "8", "--tp", "2"]))
    assert config.quant_policy == 8
    with pytest.raises(SystemExit):
        parse(["serve", "llm", "--model", "m", "--quant-policy", "4"])
    # a tensor-parallel worker rebuilds rank 0's config from its fields: the same cache format
    values = {name: getattr(config, name) for name in config.__dataclass_fields__}
    args = WorkerArgs(1, 2, 0, 0, "m", type(config).__name__, values, "float32", "cpu", 64, 8, 1.0)
    assert WorkerArgs.from_json(args.to_json()).engine_config().quant_policy == 8


def test_quantize_round_trip_error_bound_and_zero_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 128, generator=gen) * torch.logspace(-3, 3, 64)[:, None, None]
    x[3, 1] = 0  # an all-zero row
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:2]
    assert codes.abs().max() <= 127 and (scale > 0).all() and torch.isfinite(scale).all()
    nonzero = x.abs().amax(-1) > 0
    assert (codes.abs().amax(-1)[nonzero] == 127).all()  # the row's max uses the full range
    assert not codes[3, 1].any() and not dequantize_kv(codes, scale, torch.float32)[3, 1].any()
    # |x - dequantized| <= scale / 2, give or take two fp32 roundings (x / scale before it is rounded
    # to a code, and code * scale), each under 127 * 2^-24 of a code: together under 2^-16
    err = (x.double() - dequantize_kv(codes, scale, torch.float32).double()).abs()
    assert (err <= scale.double()[..., None] * (0.5 + 2**-16)).all()
    # bf16 K/V: quantized from their fp32 values; dequantized back to the query's dtype
    xb = x.bfloat16()
    codes_b, scale_b = quantize_kv(xb)
    assert all(torch.equal(a, b) for a, b in zip((codes_b, scale_b), quantize_kv(xb.float())))
    assert dequantize_kv(codes_b, scale_b, torch.bfloat16).dtype == torch.bfloat16


def test_codes_round_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])  # scale 1 exactly
    codes, scale = quantize_kv(x)
    assert scale.tolist() == [1.0] and codes.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


def _cache_case(gen, dtype):
    """Three sequences (prefill with a prefix, chunk, decode) over shuffled pages of 8, GQA 4/2."""
    hq, hkv, d, page, nblocks = 4, 2, 16, 8, 12
    lens, q_lens = [19, 8, 30], [19, 3, 1]
    perm = torch.randperm(nblocks, generator=gen)
    bt = torch.zeros(3, 4, dtype=torch.int32)
    slots, used = [], 0
    for b, n in enumerate(lens):
        blocks = -(-n // page)
        bt[b, :blocks] = perm[used:used + blocks]
        used += blocks
        slots += [int(bt[b, p // page]) * page + p % page for p in range(n)]
    slots = torch.tensor(slots + [-1])
    k = torch.randn(len(slots), hkv, d, generator=gen).to(dtype)
    v = torch.randn(len(slots), hkv, d, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    cu = torch.tensor([0, 19, 22, 23], dtype=torch.int32)
    return (q, k, v, slots, bt, cu, torch.tensor(lens, dtype=torch.int32), (nblocks, page, hkv, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_int8_equals_attention_over_its_dequantized_values(dtype):
    q, k, v, slots, bt, cu, lens, shape = _cache_case(torch.Generator().manual_seed(1), dtype)
    kc, vc = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
    ks, vs = torch.zeros(shape[:3]), torch.zeros(shape[:3])
    store_kvcache(k, v, kc, vc, slots, ks, vs)
    keep = slots[:-1]
    for x, c, s in ((k, kc, ks), (v, vc, vs)):
        codes, scale = quantize_kv(x[:-1])
        assert torch.equal(c.flatten(0, 1)[keep], codes) and torch.equal(s.flatten(0, 1)[keep], scale)
    assert int((ks > 0).sum()) == keep.shape[0] * shape[2]  # slot -1 stored nothing
    out = paged_attention(q, kc, vc, bt, cu, lens, 0.25, k_scale=ks, v_scale=vs)
    plain = paged_attention(q, dequantize_kv(kc, ks, dtype), dequantize_kv(vc, vs, dtype), bt, cu, lens, 0.25)
    assert out.dtype == dtype and torch.equal(out, plain)
    full = paged_attention(q, *(torch.zeros(shape, dtype=dtype) for _ in range(2)), bt, cu, lens, 0.25)
    assert not torch.equal(full, out)  # (that cache is empty: the comparison above is not vacuous)


def test_kv_bytes_half_the_bf16_cache():
    """LLaVA-7B's cache: 128 int8 values and a 4-byte scale per token and kv head against 256 bytes."""
    bf16, int8 = (kv_bytes_per_token(32, 128, torch.bfloat16, q) for q in (False, True))
    assert (bf16, int8) == (32 * 256, 32 * 132) and 1.93 < bf16 / int8 < 1.94


# ---------------------------------------------------------------- the engine end to end

NEW_TOKENS = 8  # the preemption case needs this many to run out of blocks


def random_image_prompts(path) -> tuple[FakeVision, dict]:
    """test_llm_engine's PARTS as prompts, with random image embeddings (no transformers run)."""
    vision = FakeVision()
    gen = torch.Generator().manual_seed(2)
    out = {}
    for name, parts in PARTS.items():
        prompt = build_prompt(path, parts)
        for data in prompt.images:
            vision.table[data] = torch.randn(ROWS, 64, generator=gen)
        out[name] = prompt
    return vision, out


@pytest.fixture(scope="module")
def prompts(tiny_llava):
    return random_image_prompts(tiny_llava)


def _engine(path, vision, **config) -> AsyncLLMEngine:
    config = dict(dict(device="cpu", session_len=128, max_batch_size=8, block_size=16), **config)
    return AsyncLLMEngine(str(path), EngineConfig(**config), vision)


def _generate(path, vision, prompts, **config) -> dict:
    """Greedy tokens and logits of every prompt, one after the other (the same steps every run),
    on a fresh engine."""
    eng = _engine(path, vision, **config)
    try:
        results = {name: run(collect(eng, request(p.segments, output_logits="generation",
                                                  max_new_tokens=NEW_TOKENS)))
                   for name, p in prompts.items()}
        assert_all_free(eng)
        return results
    finally:
        eng.close()


def _errors(ref, other) -> tuple[float, float]:
    """(largest relative L2 logit error, largest absolute one) over the steps whose inputs agree (up
    to and including the first differing token)."""
    steps = 0
    while steps < NEW_TOKENS - 1 and ref.tokens[steps] == other.tokens[steps]:
        steps += 1
    a, b = torch.cat(ref.logits)[: steps + 1], torch.cat(other.logits)[: steps + 1]
    return float(((a - b).norm(dim=-1) / a.norm(dim=-1)).max()), float((a - b).abs().max())


def test_engine_int8_logits_within_the_quantization_bound(tiny_llava, prompts, monkeypatch):
    """The tolerance comes from the bound, not from this model: a float cache whose stored K/V are
    moved by uniform noise of the bound's size (|e| <= scale / 2, scale = max|x| / 127 per row) shows
    how far the tiny random model carries such an error (far: 1-5% of the logits' norm). int8's
    rounding errors are no larger than that noise, so its logits stay within twice the noise run's
    largest error (then its tokens equal the float cache's wherever the top-1/top-2 margin exceeds
    twice its logits' error: the tiny model's margins are mostly smaller)."""
    vision, cases = prompts
    exact = _generate(tiny_llava, vision, cases)
    int8 = _generate(tiny_llava, vision, cases, quant_policy=8)

    gen = torch.Generator().manual_seed(0)
    store = attention.store_kvcache

    def noisy_store(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        def noise(x):
            return x + (torch.rand(x.shape, generator=gen) - 0.5) * x.abs().amax(-1, keepdim=True) / 127
        store(noise(k), noise(v), k_cache, v_cache, slot_mapping)

    monkeypatch.setattr(attention, "store_kvcache", noisy_store)
    noisy = _generate(tiny_llava, vision, cases)
    monkeypatch.undo()
    noise_errors = [_errors(exact[name], noisy[name]) for name in cases]
    rel_tol, abs_tol = 2 * max(e[0] for e in noise_errors), 2 * max(e[1] for e in noise_errors)
    assert 0 < rel_tol < 0.2  # the noise moved the logits, and not wildly

    for name in cases:
        rel, err = _errors(exact[name], int8[name])
        assert 0 < rel <= rel_tol and err <= abs_tol, (name, rel, rel_tol, err, abs_tol)


def test_engine_int8_cache_format_and_sizing(tiny_llava, prompts):
    vision, _ = prompts
    eng = _engine(tiny_llava, vision, quant_policy=8)
    try:
        runner = eng.engine.runner
        attn = runner.attention[0]
        assert attn.k_cache.dtype == attn.v_cache.dtype == torch.int8
        assert attn.k_scale.dtype == torch.float32 and attn.k_scale.shape == attn.k_cache.shape[:3]
        held = sum(t.nbytes for a in runner.attention for t in (a.k_cache, a.v_cache, a.k_scale, a.v_scale))
        assert held == runner._block_bytes() * runner.num_blocks  # sizing counts what is allocated
    finally:
        eng.close()


def test_int8_prefix_cache_hits_and_preemption_give_the_cold_runs_tokens(tiny_llava, prompts):
    """A prefix-cache hit reads the codes and scales the cold run stored; preemption recomputes
    them. Either way the tokens are the cold int8 run's."""
    vision, cases = prompts
    cold = _generate(tiny_llava, vision, cases, quant_policy=8)

    eng = _engine(tiny_llava, vision, quant_policy=8, block_size=8, enable_prefix_caching=True,
                  max_prefill_token_num=20)
    try:
        for name in ("two images", "fox"):
            first, second = (run(collect(eng, request(cases[name].segments, max_new_tokens=NEW_TOKENS)))
                             for _ in range(2))
            assert first.tokens == second.tokens == cold[name].tokens
            assert second.usage.cached_tokens > first.usage.cached_tokens
        assert_all_free(eng)
    finally:
        eng.close()

    # 12 blocks of 4 tokens cannot hold the three text prompts at once
    eng = _engine(tiny_llava, None, quant_policy=8, session_len=64, block_size=4, cache_max_entry_count=12)
    try:
        names = ["chat", "fox", "chat"]

        async def all_at_once():
            return await asyncio.gather(*(collect(eng, request(cases[n].segments, max_new_tokens=NEW_TOKENS))
                                          for n in names))

        for result, name in zip(run(all_at_once()), names):
            assert result.tokens == cold[name].tokens
        assert eng.engine.scheduler.num_preemptions > 0
        assert_all_free(eng)
    finally:
        eng.close()


def test_embedded_pipeline_with_quant_policy_8(tiny_llava):
    from gateway import GenerationConfig, TurbomindEngineConfig, pipeline
    from tests.conftest import make_image

    with pipeline(str(tiny_llava), backend_config=TurbomindEngineConfig(quant_policy=8, session_len=256)) as pipe:
        response = pipe(("describe this image", make_image(5)), gen_config=GenerationConfig(max_new_tokens=4))
        assert response.generate_token_len >= 1
        assert pipe._service.llm.engine.runner.attention[0].k_cache.dtype == torch.int8
