"""The engine on CUDA (skipped without a GPU): Triton paged attention when available,
greedy tokens equal transformers in fp32, with batching, prefix caching and chunking;
bf16 (the dtype real checkpoints run in) generates and frees its blocks."""
from __future__ import annotations

import asyncio

import pytest
import torch

from llm_service.config import EngineConfig
from llm_service.engine import AsyncLLMEngine
from tests.test_llm_engine import PARTS, FakeVision, build_prompt, collect, hf_greedy, request, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cases(tiny_llava):
    vision = FakeVision()
    out = []
    for parts in PARTS.values():
        prompt = build_prompt(tiny_llava, parts)
        ref = hf_greedy(tiny_llava, prompt)
        for data, feat in zip(prompt.images, ref.features if ref.features is not None else []):
            vision.table[data] = feat
        out.append((prompt, ref))
    return vision, out


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_cuda_fp32_equals_hf(tiny_llava, cases, prefix_caching):
    from llm_service.layers import triton_attention

    vision, prompts = cases
    config = EngineConfig(device="cuda", session_len=128, max_batch_size=8, block_size=16,
                          enable_prefix_caching=prefix_caching, max_prefill_token_num=24)
    eng = AsyncLLMEngine(str(tiny_llava), config, vision)
    try:
        assert eng.engine.runner.uses_kernels == triton_attention.AVAILABLE
        assert run(eng.info()).dtype == "float32"  # auto: the checkpoint's dtype

        async def all_at_once():
            return await asyncio.gather(*(collect(eng, request(p.segments, output_logits="generation"))
                                          for p, _ in prompts))

        for _ in range(2):  # the second round hits the prefix cache when it is on
            for result, (prompt, ref) in zip(run(all_at_once()), prompts):
                assert result.tokens == ref.tokens
                torch.testing.assert_close(torch.cat(result.logits), ref.logits, atol=1e-4, rtol=0)
        info = run(eng.info())
        assert info.free_blocks == info.total_blocks
    finally:
        eng.close()


def test_cuda_bf16_generates_and_frees(tiny_llava, cases):
    vision, prompts = cases
    eng = AsyncLLMEngine(str(tiny_llava), EngineConfig(device="cuda", dtype="bfloat16", session_len=128,
                                                       block_size=16), vision)
    try:
        async def all_at_once():
            return await asyncio.gather(*(collect(eng, request(p.segments)) for p, _ in prompts))

        results = run(all_at_once())
        assert all(len(r.tokens) >= 1 and r.finish in ("stop", "length") for r in results)
        same_first = sum(r.tokens[0] == ref.tokens[0] for r, (_, ref) in zip(results, prompts))
        assert same_first >= len(prompts) // 2  # bf16 rounding may flip a near-tie, not most of them
        info = run(eng.info())
        assert info.dtype == "bfloat16" and info.free_blocks == info.total_blocks
    finally:
        eng.close()
