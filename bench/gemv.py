"""How fast the Llama-2-7B projections run at decode batch sizes, as bandwidth.

At bs=1 a decode step is the weights read once: 13.48 GB. This times each projection
with 50 launches captured in one CUDA graph, so launch gaps do not count, and prints
the achieved GB/s next to a device-to-device copy: cuBLAS (F.linear) and the Triton
GEMV of llm_service/layers/triton_gemv.py, the latter over a sweep of its tile knobs
(checked against F.linear first). gate_up and qkv also time the GEMV with its fused epilogue
(SiLU * up; rotary + KV-cache store) against the GEMV then silu_and_mul / rope_store
(checked bit for bit first).

    python bench/gemv.py [--batch-sizes 1,8] [--tp 1] [--sweep]
"""
from __future__ import annotations

import argparse

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llm_service.layers.rotary import RotaryEmbedding  # noqa: E402
from llm_service.layers.triton_attention import rope_store  # noqa: E402
from llm_service.layers.triton_fused import silu_and_mul  # noqa: E402
from llm_service.layers.triton_gemv import gemv, qkv_rope_store  # noqa: E402

SHAPES = {  # name: (out_features, in_features), Llama-2-7B, vocab 32064
    "qkv": (3 * 4096, 4096),
    "o": (4096, 4096),
    "gate_up": (2 * 11008, 4096),
    "down": (4096, 11008),
    "lm_head": (32064, 4096),
}
PER_LAYER = ("qkv", "o", "gate_up", "down")


def graph_time(fn, reps: int = 48) -> float:
    """Seconds per call of `fn`, launched `reps` times from one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * reps)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / graph_time(lambda: dst.copy_(src), reps=10)


def fused_launches(name: str, x: torch.Tensor, w: torch.Tensor, turn) -> dict:
    """{label: launch} for a projection that has a fused epilogue: the unfused launches first, then
    the fused one (checked to give their bits)."""
    if name == "gate_up":
        assert torch.equal(gemv(x, w, gated=True), silu_and_mul(gemv(x, w))), "gated gemv: not gemv + silu's bits"
        return {"gemv+silu": lambda: silu_and_mul(gemv(x, next(turn))),
                "gated gemv": lambda: gemv(x, next(turn), gated=True)}
    if name != "qkv":
        return {}
    heads, d, page = w.shape[0] // 384, 128, 64  # Llama-2-7B: as many kv heads as heads, head_dim 128
    rope = RotaryEmbedding(d, 4096, {"rope_theta": 10000.0}).cuda()(torch.arange(x.shape[0], device="cuda") * 97)
    slots = torch.arange(x.shape[0], device="cuda") * page + 5
    caches = [torch.zeros(x.shape[0], page, heads, d, dtype=x.dtype, device="cuda") for _ in range(4)]

    def unfused(w, kc, vc):
        q, k, v = gemv(x, w).view(x.shape[0], 3 * heads, d).split(heads, dim=1)
        return rope_store(q, k, v, rope, kc, vc, slots)

    q = unfused(w, caches[0], caches[1])
    assert torch.equal(qkv_rope_store(x, w, None, rope, caches[2], caches[3], slots, heads, heads), q)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]), "qkv_rope_store: other cache bits"
    return {"gemv+rope_store": lambda: unfused(next(turn), *caches[:2]),
            "qkv_rope_store": lambda: qkv_rope_store(x, next(turn), None, rope, *caches[:2], slots, heads, heads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--tp", default="1", help="shard the shapes as one rank of tp would (comma list: each in turn)")
    parser.add_argument("--sweep", action="store_true", help="also time every Triton tile setting; print the best")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · copy {copy_bandwidth() / 1e9:.0f} GB/s")
    for tp, bs in itertools.product(map(int, args.tp.split(",")), map(int, args.batch_sizes.split(","))):
        layer = {"cublas": 0.0, "triton": 0.0}
        for name, (n, k) in SHAPES.items():
            n, k = (n, k // tp) if name in ("o", "down") else (n // tp, k)
            # as many copies as it takes to overflow the 50 MB L2, read in turn, as a model's layers are
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(-(-400_000_000 // (2 * n * k)))]
            w = ws[0]
            x = torch.randn(bs, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            err = (gemv(x, w).float() - ref).abs().max().item()
            assert err <= 0.02 * ref.abs().max().item() + 1e-2, f"{name}: triton gemv off by {err}"
            turn = itertools.cycle(ws)
            times = {"cublas": graph_time(lambda: F.linear(x, next(turn))),
                     "triton": graph_time(lambda: gemv(x, next(turn)))}
            best = ""
            if args.sweep:
                tried = {}
                grid = (((1, 2, 4, 8), (1024, 2048, 4096), (4, 8, 16), (1, 2)) if bs == 1 else
                        ((4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 3)))
                for bn, bk, warps, stages in itertools.product(*grid):
                    knobs = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                    tried[tuple(knobs.values())] = graph_time(lambda: gemv(x, next(turn), **knobs))
                best = "  best (bn, bk, warps, stages): " + ", ".join(
                    f"{cfg} {tried[cfg] * 1e6:.1f} us {w.numel() * 2 / tried[cfg] / 1e9:.0f} GB/s"
                    for cfg in sorted(tried, key=tried.get)[:3])
            for impl, t in times.items():
                layer[impl] += t if name in PER_LAYER else 0.0
            line = "  ".join(f"{impl} {t * 1e6:6.1f} us {w.numel() * 2 / t / 1e9:5.0f} GB/s" for impl, t in times.items())
            print(f"tp {tp} bs {bs:3d} {name:8s} {n:6d}x{k:6d}  {line}{best}", flush=True)
            fused = {label: graph_time(fn) for label, fn in fused_launches(name, x, w, turn).items()}
            if fused:
                print(f"tp {tp} bs {bs:3d} {name:8s} epilogue: " + ", ".join(f"{label} {t * 1e6:.1f} us"
                                                                      for label, t in fused.items()), flush=True)
        print(f"tp {tp} bs {bs:3d} 32 layers of projections: " + ", ".join(f"{impl} {32 * t * 1e3:.2f} ms" for impl, t in layer.items()))


if __name__ == "__main__":
    main()
