"""The GPU hot path's host-side logic, on the CPU: the CUDA-graph batch ladder and when
graphs are used, and the batched sampler against a request-by-request reference built
from transformers' logits processors."""
from __future__ import annotations

import pytest
import torch

from llm_service.engine.cuda_graph import graph_batch_sizes, graphs_enabled, pick_batch_size
from llm_service.engine.sampler import SamplingBatch, sample
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.sequence import Sequence

EOS = 0


def test_ladder_and_pick():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32] + list(range(48, 257, 16))
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]  # the cap is always captured
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(1) == [1]
    sizes = graph_batch_sizes(100)
    assert sizes[-1] == 100
    for batch in range(1, 101):
        picked = pick_batch_size(sizes, batch)
        assert picked >= batch and all(s < batch for s in sizes if s < picked)
    assert pick_batch_size(sizes, 101) is None


def test_graphs_only_on_cuda_with_kernels_and_not_eager(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("PRISM_EAGER", raising=False)
    assert graphs_enabled(cuda, uses_kernels=True, eager_mode=False)
    assert not graphs_enabled(cpu, uses_kernels=True, eager_mode=False)
    assert not graphs_enabled(cuda, uses_kernels=False, eager_mode=False)
    assert not graphs_enabled(cuda, uses_kernels=True, eager_mode=True)
    monkeypatch.setenv("PRISM_EAGER", "1")
    assert not graphs_enabled(cuda, uses_kernels=True, eager_mode=False)
    monkeypatch.setenv("PRISM_EAGER", "0")
    assert graphs_enabled(cuda, uses_kernels=True, eager_mode=False)


def _processed(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One request's logits through transformers' processors and warpers, in generate's order."""
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, NoBadWordsLogitsProcessor,
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    p = seq.params
    ids = torch.tensor([seq.token_ids])
    out = logits[None].clone()
    if p.repetition_penalty != 1.0:
        out = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, out)
    if p.bad_token_ids:
        out = NoBadWordsLogitsProcessor([[i] for i in p.bad_token_ids], eos_token_id=None)(ids, out)
    if p.min_new_tokens:
        stops = p.stop_token_ids + ([] if p.ignore_eos else [EOS])
        out = MinNewTokensLengthLogitsProcessor(seq.num_prompt_tokens, p.min_new_tokens, stops)(ids, out)
    if p.greedy:
        return out[0]
    out = TemperatureLogitsWarper(p.temperature)(ids, out)
    if p.top_k:
        out = TopKLogitsWarper(p.top_k)(ids, out)
    if p.top_p < 1:
        out = TopPLogitsWarper(p.top_p)(ids, out)
    if p.min_p > 0:
        out = MinPLogitsWarper(p.min_p)(ids, out)
    return out[0]


def _seq(params: SamplingParams, generated: int = 0) -> Sequence:
    s = Sequence([5, 9, 2, 9], params)
    s.token_ids += [7] * generated
    if params.seed is not None and not params.greedy:
        s.generator = torch.Generator().manual_seed(params.seed)
    return s


MIXED = [
    (SamplingParams(), 0),
    (SamplingParams(repetition_penalty=1.7), 1),
    (SamplingParams(do_sample=True, temperature=0.8, top_k=6, seed=11), 0),
    (SamplingParams(bad_token_ids=[3, 4], min_new_tokens=2, stop_token_ids=[6]), 1),
    (SamplingParams(do_sample=True, temperature=1.3, top_p=0.7, repetition_penalty=0.8, seed=12), 2),
    (SamplingParams(do_sample=True, min_p=0.1, seed=13), 0),
    (SamplingParams(do_sample=True, temperature=0.0), 0),  # temperature 0 is greedy
    (SamplingParams(do_sample=True, top_k=3, bad_token_ids=[1]), 0),  # unseeded: global RNG
]


@pytest.mark.parametrize("trial", range(3))
def test_batched_sampler_equals_each_request_alone(trial):
    torch.manual_seed(trial)
    vocab = 24
    logits = torch.randn(len(MIXED), vocab) * 2
    batch_seqs = [_seq(p, n) for p, n in MIXED]
    tokens = sample(logits, SamplingBatch.build(batch_seqs, [EOS], vocab, torch.device("cpu"))).tolist()
    for row, (params, generated) in enumerate(MIXED):
        alone = _seq(params, generated)  # a fresh generator with the same seed
        ref = _processed(logits[row], alone)
        if params.greedy:
            assert tokens[row] == int(ref.argmax()), row
            continue
        assert torch.isfinite(ref[tokens[row]]), row  # drawn from what the warpers keep
        if params.seed is not None:
            single = sample(logits[row : row + 1], SamplingBatch.build([alone], [EOS], vocab, torch.device("cpu")))
            assert tokens[row] == single.item(), row  # whatever it is batched with


def test_seeded_draws_follow_the_warped_distribution():
    """The batched draw (argmax of p / Exp(1) noise) samples the warped distribution."""
    vocab, n = 6, 4000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=4, top_p=0.95, seed=5)
    seqs = [_seq(params) for _ in range(n)]
    for i, s in enumerate(seqs):
        s.generator.manual_seed(i)
    drawn = sample(logits.expand(n, vocab).contiguous(), SamplingBatch.build(seqs, [EOS], vocab, torch.device("cpu")))
    freq = torch.bincount(drawn, minlength=vocab).float() / n
    expected = _processed(logits, seqs[0]).softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
