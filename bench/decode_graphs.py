"""Decode step time of the LLM engine, CUDA graphs against eager launches.

A random-weight Llama (Llama-2-7B layer shapes, fewer layers; bf16) is built on the GPU and
saved once; for each mode and batch size, `bs` requests of 32 prompt tokens are prefilled,
then decode steps (schedule, forward, sample, retire: the engine's whole step) are timed.

    python bench/decode_graphs.py [--layers 8] [--batch-sizes 1,64] [--steps 64]
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from llm_service.config import PytorchEngineConfig
from llm_service.engine.llm_engine import LLMEngine
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.sequence import Sequence


def build(path: Path, layers: int, vocab: int, heads: int = 32, mlp: int = 11008) -> Path:
    """Llama-2-7B shapes (hidden 4096, head_dim 128) with `layers` layers, N(0, 0.02) weights,
    initialised on the GPU (the CPU without one), saved once; tp_decode.py passes one tp=2
    rank's heads and MLP width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=128,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path


def step_time(engine: LLMEngine, bs: int, steps: int, vocab: int) -> float:
    """Seconds per decode step with `bs` sequences running."""
    gen = torch.Generator().manual_seed(bs)
    seqs = [Sequence([1] + torch.randint(3, vocab, (31,), generator=gen).tolist(),
                     SamplingParams(max_new_tokens=steps + 16, ignore_eos=True)) for _ in range(bs)]
    for seq in seqs:
        engine.add(seq)
    while any(s.num_output_tokens == 0 for s in seqs):  # prefill
        engine.step()
    for _ in range(8):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()  # reads the sampled ids back: each step ends synchronised
    elapsed = time.perf_counter() - start
    for seq in seqs:
        engine.abort(seq)
    return elapsed / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--ckpt", default="/tmp/prism-decode-llama")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    path = build(Path(args.ckpt) / f"l{args.layers}", args.layers, args.vocab)
    rows = {}
    for eager in (False, True):
        config = PytorchEngineConfig(eager_mode=eager, session_len=1024, max_batch_size=max(sizes),
                                     cache_max_entry_count=4 * max(sizes) + 8)
        t = time.perf_counter()
        engine = LLMEngine(str(path), config)
        setup = time.perf_counter() - t
        assert (engine.runner.graphs is None) == eager
        for bs in sizes:
            rows[eager, bs] = step_time(engine, bs, args.steps, args.vocab)
        print(f"{'eager' if eager else 'graphs'}: engine ready in {setup:.1f} s", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, Llama-2-7B layers x {args.layers}, bf16, prompt 32")
    print("| bs | graphs ms/step | eager ms/step | graphs tok/s | eager tok/s | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for bs in sizes:
        g, e = rows[False, bs], rows[True, bs]
        print(f"| {bs} | {g * 1e3:.2f} | {e * 1e3:.2f} | {bs / g:.0f} | {bs / e:.0f} | {e / g:.2f}x |")


if __name__ == "__main__":
    main()
