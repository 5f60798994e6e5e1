"""How much GPU memory the KV cache may take, measured rather than estimated.

Before the cache exists, one step of the largest size the scheduler can form (the whole
prefill budget plus a decode token for every other batch slot) runs through the model,
the LM head and the sampler (with every filter on) at the largest batch. Their
activations stay reserved in torch's caching allocator, so the memory the device reports
free afterwards is what the cache can have without the largest step running out later.
"""
from __future__ import annotations

import gc

import torch

from llm_service.engine.sampler import SamplingBatch, sample
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.sequence import Sequence
from llm_service.layers.attention import Attention, AttentionMetadata, kv_cache
from llm_service.models.llama import LlamaForCausalLM


@torch.inference_mode()
def free_memory_after_peak_step(
    model: LlamaForCausalLM,
    attention: list[Attention],
    block_size: int,
    max_tokens: int,
    max_batch_size: int,
    max_position: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_int8: bool,
) -> int:
    """Free device bytes once a step of `max_tokens` tokens and a sampler pass over
    `max_batch_size` rows have run. The layers borrow a one-block zero cache in the engine's
    format (int8 codes and scales with kv_int8): every token is stored to slot -1 (skipped)
    and attends to that block, so the outputs are zeros, not NaN."""
    gc.collect()
    torch.cuda.empty_cache()  # what earlier engines in this process left cached is free for us
    a = attention[0]
    scratch, scales = kv_cache(1, block_size, a.num_kv_heads, a.head_dim, dtype, device, kv_int8)
    for attn in attention:
        attn.k_cache = attn.v_cache = scratch
        attn.k_scale = attn.v_scale = scales
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.full((max_tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(1, -(-max_tokens // block_size), **i32),
        cu_seqlens_q=torch.tensor([0, max_tokens], **i32),
        seq_lens=torch.tensor([max_tokens], **i32),
        max_q_len=max_tokens,
    )
    positions = torch.arange(max_tokens, device=device) % max_position
    hidden = model(torch.zeros(max_tokens, dtype=torch.int64, device=device), positions, meta)
    logits = model.compute_logits(hidden[:max_batch_size]).float()
    del hidden
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.1, bad_token_ids=[0])
    seqs = [Sequence([0, 1], params) for _ in range(max_batch_size)]
    sample(logits, SamplingBatch.build(seqs, [1], logits.shape[-1], device))
    del logits
    for attn in attention:
        attn.k_cache = attn.v_cache = torch.empty(0)
        attn.k_scale = attn.v_scale = None
    del scratch, scales
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return free
