"""llm_service building blocks without a model: paged attention against dense causal
attention, the block manager's prefix cache, the scheduler, the sampler's filters
against transformers' logits warpers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.sampler import SamplingBatch, filter_logits, sample
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.scheduler import Scheduler
from llm_service.engine.sequence import ImageSpan, Sequence, Status
from llm_service.layers.attention import paged_attention, store_kvcache
from llm_service.layers.rotary import rope_inv_freq


def _dense(q, k, v, scale):
    """Causal attention of the last len(q) positions over all len(k) keys, GQA by repeat."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(len(k) - len(q), len(k))[:, None]
    scores = scores.masked_fill(torch.arange(len(k))[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_paged_attention_matches_dense_for_prefill_chunks_and_decode():
    torch.manual_seed(0)
    block, hkv, hq, d, nblocks = 4, 2, 6, 8, 16
    k_cache, v_cache = torch.zeros(nblocks, block, hkv, d), torch.zeros(nblocks, block, hkv, d)
    # three sequences: full prefill (7), chunk of 3 after 5 cached, decode of 1 after 9
    kv_lens, q_lens = [7, 8, 10], [7, 3, 1]
    tables = [[3, 9], [0, 5], [12, 1, 7]]
    keys = [torch.randn(n, hkv, d) for n in kv_lens]
    values = [torch.randn(n, hkv, d) for n in kv_lens]
    perm = torch.randperm(nblocks * block)  # scribble: unused slots must not matter
    k_cache.view(-1, hkv, d)[perm] = torch.randn(nblocks * block, hkv, d)
    for b, n in enumerate(kv_lens):
        slots = torch.tensor([tables[b][p // block] * block + p % block for p in range(n)])
        store_kvcache(keys[b], values[b], k_cache, v_cache, slots)
    q = torch.randn(sum(q_lens), hq, d)
    cu = torch.tensor([0, 7, 10, 11], dtype=torch.int32)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = paged_attention(q, k_cache, v_cache, bt, cu, torch.tensor(kv_lens, dtype=torch.int32), 0.3)
    for b in range(3):
        ref = _dense(q[cu[b] : cu[b + 1]], keys[b], values[b], 0.3)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]], ref, atol=1e-5, rtol=1e-5)


def test_store_kvcache_skips_minus_one_slots():
    k_cache, v_cache = torch.zeros(2, 2, 1, 1), torch.zeros(2, 2, 1, 1)
    k = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    store_kvcache(k, -k, k_cache, v_cache, torch.tensor([3, -1, 0]))
    assert k_cache.flatten().tolist() == [3.0, 0.0, 0.0, 1.0]
    assert v_cache.flatten().tolist() == [-3.0, 0.0, 0.0, -1.0]


def test_llama3_rope_keeps_high_and_scales_low_frequencies():
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
    plain = rope_inv_freq(128, dict(rope_theta=500000.0))
    scaled = rope_inv_freq(128, rope)
    wavelen = 2 * math.pi / plain
    assert torch.equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    torch.testing.assert_close(scaled[wavelen > 8192], plain[wavelen > 8192] / 8)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and (scaled[mid] < plain[mid]).all() and (scaled[mid] > plain[mid] / 8).all()
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq(128, dict(rope_type="yarn", factor=2.0))


def _seq(ids, images=()):
    return Sequence(list(ids), SamplingParams(), list(images))


def _run_prefill(bm: BlockManager, seq: Sequence) -> int:
    hits = bm.match_prefix(seq)
    assert bm.can_admit(hits, len(seq))
    bm.admit(seq, hits, len(seq))
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)
    return len(hits) * bm.block_size


def test_prefix_cache_shares_full_blocks_and_tells_images_apart():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    img_a = ImageSpan(2, torch.zeros(4, 8), key="aaa")
    img_b = ImageSpan(2, torch.zeros(4, 8), key="bbb")
    ids = [1, 5, 3, 3, 3, 3, 7, 8, 9, 10, 11]
    first = _seq(ids, [img_a])
    assert _run_prefill(bm, first) == 0
    same = _seq(ids, [img_a])
    assert _run_prefill(bm, same) == 8  # two full blocks; the last partial one is never shared
    assert same.block_table[:2] == first.block_table[:2] and same.block_table[2] != first.block_table[2]
    other_image = _seq(ids, [img_b])
    assert _run_prefill(bm, other_image) == 0  # block 0 already holds image rows
    exact_blocks = _seq(ids[:8], [img_a])
    assert _run_prefill(bm, exact_blocks) == 4  # the last token is always computed
    for s in (first, same, other_image, exact_blocks):
        bm.release(s)
    assert bm.num_free_blocks == 16


def test_prefix_cache_evicts_least_recently_released_and_counts_refs():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = _seq([1, 2, 3, 4, 5])  # 3 blocks, 2 full
    _run_prefill(bm, a)
    b = _seq([1, 2, 3, 4, 6])
    assert _run_prefill(bm, b) == 4 and bm.ref_count[a.block_table[0]] == 2
    bm.release(a)
    assert bm.num_free_blocks == 1  # shared blocks still held by b
    bm.release(b)
    assert bm.num_free_blocks == 4
    c = _seq([9, 9, 9, 9, 9, 9, 9])  # needs all 4 blocks: evicts every cached one
    assert _run_prefill(bm, c) == 0 and bm.num_free_blocks == 0
    bm.release(c)
    assert _run_prefill(bm, _seq([1, 2, 3, 4, 5])) == 0  # evicted
    assert bm.hash_to_block  # c's full blocks are cached now


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    _run_prefill(bm, _seq([1, 2, 3, 4, 5]))
    assert _run_prefill(bm, _seq([1, 2, 3, 4, 5])) == 0 and not bm.hash_to_block


def test_scheduler_chunks_prefill_under_the_budget_and_preempts_newest():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_tokens=6)
    long_seq, short = _seq(range(1, 11)), _seq(range(20, 23))
    sched.add(long_seq)
    sched.add(short)
    batch, _ = sched.schedule()
    assert [(s.seq, s.num_tokens, s.samples) for s in batch] == [(long_seq, 6, False)]
    long_seq.num_computed_tokens += 6
    batch, _ = sched.schedule()  # the rest of long (4), then short fits the remaining budget of 2
    assert [(s.seq, s.num_tokens) for s in batch] == [(long_seq, 4), (short, 2)]
    for s in batch:
        s.seq.num_computed_tokens += s.num_tokens
    long_seq.token_ids.append(0)  # long sampled; short still has one prompt token to go
    batch, _ = sched.schedule()
    assert [(s.seq, s.num_tokens, s.samples) for s in batch] == [(long_seq, 1, True), (short, 1, True)]
    for s in batch:
        s.seq.num_computed_tokens += 1
        s.seq.token_ids.append(0)
    # long holds 3 blocks, short 1; grow long to 4 blocks then to more than the cache has left
    for _ in range(10):
        batch, _ = sched.schedule()
        if short.status == Status.WAITING:
            break
        for s in batch:
            s.seq.num_computed_tokens += 1
            s.seq.token_ids.append(0)
    assert short.status == Status.WAITING and short.num_computed_tokens == 0 and not short.block_table
    assert sched.waiting[0] is short and long_seq.status == Status.RUNNING


def test_scheduler_puts_decodes_first_and_the_step_counts_them():
    """A mixed step leads with its single-token items, which the packed step counts as
    num_decodes (attention runs those rows through the decode kernel)."""
    from llm_service.distributed.step import PackedStep

    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_tokens=6)
    first, long_seq, one = _seq([1, 2]), _seq(range(10, 20)), _seq([7])
    sched.add(first)
    batch, _ = sched.schedule()
    sched.add(long_seq)
    sched.add(one)
    for _ in range(2):  # first decodes; long takes the whole budget (6), then its last 4 leave room for one
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            if item.samples:
                item.seq.token_ids.append(0)
        batch, _ = sched.schedule()
    assert [(item.seq, item.num_tokens) for item in batch] == [(first, 1), (one, 1), (long_seq, 4)]
    cu = [0, 1, 2, 6]
    step = PackedStep.build([0] * 6, list(range(6)), list(range(6)), [[0], [1], [2]], cu, [11, 3, 4], [0, 1, 5],
                            [], None, True, torch.device("cpu"))
    assert step.unpack().meta.num_decodes == 2 and step.unpack().meta.max_q_len == 4
    chunk_first = PackedStep.build([0] * 5, list(range(5)), list(range(5)), [[0], [1]], [0, 4, 5], [4, 8], [4],
                                   [], None, True, torch.device("cpu"))
    assert chunk_first.unpack().meta.num_decodes == 0


def test_scheduler_fails_a_sequence_larger_than_the_whole_cache():
    bm = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_tokens=64)
    huge = _seq(range(1, 7))
    sched.add(huge)
    batch, too_big = sched.schedule()
    assert batch == [] and too_big == [huge]


def _warped(logits, temperature, top_k, top_p, min_p):
    from transformers.generation.logits_process import (
        MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    ids = torch.zeros(1, 1, dtype=torch.long)
    out = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k:
        out = TopKLogitsWarper(top_k)(ids, out)
    if top_p < 1:
        out = TopPLogitsWarper(top_p)(ids, out)
    if min_p > 0:
        out = MinPLogitsWarper(min_p)(ids, out)
    return out


def _batch(params: list[SamplingParams], vocab: int, seqs=None) -> SamplingBatch:
    seqs = seqs or [Sequence([1, 2], p) for p in params]
    return SamplingBatch.build(seqs, eos_ids=[0], vocab_size=vocab, device=torch.device("cpu"))


def test_filters_match_transformers_warpers_row_by_row():
    torch.manual_seed(1)
    vocab = 50
    settings = [(0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (0.9, 0, 1.0, 0.2),
                (0.5, 10, 0.8, 0.05), (1.0, 1, 1.0, 0.0)]
    logits = torch.randn(len(settings), vocab) * 3
    params = [SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in settings]
    ours = filter_logits(logits, _batch(params, vocab))
    for row, s in enumerate(settings):
        ref = _warped(logits[row : row + 1], *s)[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(ref)), s
        keep = ~torch.isinf(ref)
        torch.testing.assert_close(ours[row][keep], ref[keep])


def test_repetition_penalty_bad_ids_and_min_new_tokens():
    vocab = 8
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0, 0.0, 0.0, 0.0]] * 3)
    seqs = [Sequence([1, 2], SamplingParams(repetition_penalty=2.0)),
            Sequence([5], SamplingParams(bad_token_ids=[2, 0])),
            Sequence([5], SamplingParams(min_new_tokens=1, stop_token_ids=[3]))]
    b = _batch([s.params for s in seqs], vocab, seqs)
    from llm_service.engine.sampler import apply_penalties

    out = apply_penalties(logits, b)
    assert out[0].tolist() == [1.0, -4.0, 1.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert out[1, 0] == out[1, 2] == float("-inf") and out[1, 3] == 0.5
    assert out[2, 0] == out[2, 3] == float("-inf")  # eos 0 and stop 3 suppressed before min_new_tokens
    assert sample(logits, b).tolist() == [2, 3, 2]


def test_seeded_rows_draw_the_same_whatever_the_batch():
    torch.manual_seed(0)
    vocab = 64
    logits = torch.randn(3, vocab)
    def draw(order):
        seqs = []
        for seed in order:
            s = Sequence([1], SamplingParams(do_sample=True, temperature=1.0, seed=seed))
            s.generator = torch.Generator().manual_seed(seed)
            seqs.append(s)
        out = [sample(logits[: len(seqs)], _batch([s.params for s in seqs], vocab, seqs)) for _ in range(20)]
        return torch.stack(out)
    first, second = draw([7, 8, 9]), draw([7, 8, 9])
    assert torch.equal(first, second)
    assert not torch.equal(first[:, 0], first[:, 1])  # different seeds, different draws
    ref = F.softmax(logits, -1)
    assert (ref.gather(1, first.T) > 0).all()
