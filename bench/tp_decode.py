"""Where a bs=1 decode step goes under tensor parallelism (issue 4's 1.6x at tp=2).

Three engines over random-weight Llama-2-7B-shaped checkpoints (bf16), each decoding one
sequence after a `--prompt`-token prompt, timed as served (LLMEngine.step with run-ahead):

- T1: the whole model on one GPU (tp=1);
- Th: one tp=2 rank's shapes (16 heads, MLP 5504, vocab 16032) on one GPU, no communication;
- T2: tp=2.

T2 - Th is what the all-reduces, the vocab gather and the second rank cost; Th - T1/2 what
the halved kernels do not halve (fixed costs: launch, ramp, dependent latency chains). 1.6x
needs T2 <= T1 / 1.6. Each engine is then profiled over `--profile-steps` steps (rank 0's
GPU): busy time per step (the union of kernel intervals) against the step, and kernels by
time per step. Under PDL (layers/pdl.py) a kernel starts before its predecessor ends and
waits inside, so per-kernel times overlap and sum past the busy time.

`half-no-attention` or `tp1-no-norms` time a config with that part patched out of the forward:
the difference to the whole config is the part's share of the critical path. `half@2048:8.2048.8.1`
times it with other one-row GEMV tiles for the projections of that K (rows a program, K slice,
warps, stages; `+` joins several): in the model, where PDL overlaps each GEMV's first slice with
the kernel before it, the best tiles need not be bench/gemv.py's.

    python bench/tp_decode.py [--configs tp1,half,tp2,half-no-attention] [--prompt 640] [--steps 256] [--session 2048]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_graphs import build  # noqa: E402  (this script's folder is on sys.path)
from llm_service.config import PytorchEngineConfig  # noqa: E402
from llm_service.engine.llm_engine import LLMEngine  # noqa: E402
from llm_service.engine.sampling_params import SamplingParams  # noqa: E402
from llm_service.engine.sequence import Sequence  # noqa: E402

VOCAB = 32064  # LLaVA-1.5-7B's
SHAPES = {  # name: (heads, MLP width, vocab, tp)
    "tp1": (32, 11008, VOCAB, 1),
    "half": (16, 5504, VOCAB // 2, 1),
    "tp2": (32, 11008, VOCAB, 2),
}


def start(engine: LLMEngine, prompt: int, vocab: int, tokens: int) -> Sequence:
    gen = torch.Generator().manual_seed(prompt)
    seq = Sequence([1] + torch.randint(3, vocab, (prompt - 1,), generator=gen).tolist(),
                   SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    engine.add(seq)
    while seq.num_output_tokens == 0:
        engine.step()
    for _ in range(8):
        engine.step()
    return seq


def step_time(engine: LLMEngine, steps: int) -> float:
    start_t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start_t) / steps


def profiled(engine: LLMEngine, steps: int, out: Path, name: str) -> dict:
    """Rank 0's kernels over `steps` steps: busy time per step and the kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    trace = out / f"tp_decode_{name}.json"
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy")]
    trace.unlink()
    events.sort(key=lambda e: e["ts"])
    busy, end = 0.0, float("-inf")
    for e in events:  # union of [ts, ts + dur)
        lo, hi = e["ts"], e["ts"] + e["dur"]
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_name[e["name"]].append(e["dur"])
    kernels = sorted(((sum(d) / steps, len(d) / steps, sum(d) / len(d), n) for n, d in by_name.items()), reverse=True)
    return {"busy_us": busy / steps, "span_us": span / steps,
            "kernels": [{"us_per_step": t, "per_step": c, "mean_us": m, "name": n[:90]} for t, c, m, n in kernels[:25]],
            "boundary": boundary(events, steps)}


def boundary(events: list[dict], steps: int) -> list[tuple]:
    """The kernels from the last layer's attention of a middle step to the second layer's of the
    next: (start us from the first, duration us, name), where the steps meet (sampling, the step's
    inputs, the broadcasts, the first layer)."""
    attn = [i for i, e in enumerate(events) if "split_kernel" in e["name"] or "decode_mha" in e["name"]]
    per_step = len(attn) // steps
    if per_step < 2:
        return []
    mid = steps // 2
    lo, hi = attn[mid * per_step - 1], attn[mid * per_step + 1]
    t0 = events[lo]["ts"]
    return [(round(e["ts"] - t0, 1), round(e["dur"], 1), e["name"][:60]) for e in events[lo: hi + 1]]


def _without(part: str):
    """Patch a part out of the model's forward (one process only: tp1 and half): what the step
    takes without it is that part's share of the critical path. Returns the undo."""
    from llm_service.layers.attention import Attention
    from llm_service.layers.norm import RMSNorm

    if part == "attention":  # the output is q itself: o_proj reads [T, heads * head_dim] as before
        cls, attr, patched = Attention, "attend", lambda self, q, meta, *rest: q
    elif part == "norms":  # no residual add, no norm: the sublayer's output goes straight on
        cls, attr, patched = RMSNorm, "forward", lambda self, x, residual=None, reduce=False: (
            x if residual is None else (x, residual))
    else:
        raise ValueError(f"unknown part {part!r}: attention or norms")
    original = getattr(cls, attr)
    setattr(cls, attr, patched)
    return lambda: setattr(cls, attr, original)


def _with_tiles(spec: str):
    """Patch triton_gemv.one_row_tiles (one process only): `K:rows.slice.warps.stages`, several
    joined by `+`, each for the projections of that K. Returns the undo."""
    from llm_service.layers import triton_gemv

    tiles = {}
    for part in spec.split("+"):
        k, _, knobs = part.partition(":")
        tiles[int(k)] = tuple(int(v) for v in knobs.split("."))
    original = triton_gemv.one_row_tiles
    triton_gemv.one_row_tiles = lambda K: tiles.get(K) or original(K)
    return lambda: setattr(triton_gemv, "one_row_tiles", original)


def run_config(name: str, args, root: Path) -> dict:
    """`name`: a SHAPES key, optionally with `-no-<part>` (see `_without`) or `@<tiles>` (see
    `_with_tiles`) for tp1 and half."""
    name_parts, _, tiles = name.partition("@")
    base, _, part = name_parts.partition("-no-")
    heads, mlp, vocab, tp = SHAPES[base]
    undo = _without(part) if part else _with_tiles(tiles) if tiles else None
    try:
        return _run(heads, mlp, vocab, tp, args, root, name)
    finally:
        if undo is not None:
            undo()


def _run(heads: int, mlp: int, vocab: int, tp: int, args, root: Path, name: str) -> dict:
    path = build(root / f"h{heads}_m{mlp}_v{vocab}_l{args.layers}", args.layers, vocab, heads, mlp)
    config = PytorchEngineConfig(tp=tp, session_len=max(args.session, args.prompt + args.steps + args.profile_steps + 64),
                                 max_batch_size=8, max_prefill_token_num=1024, cache_max_entry_count=0.2)
    engine = LLMEngine(str(path), config)
    try:
        seq = start(engine, args.prompt, vocab, args.steps + args.profile_steps + 32)
        times = [step_time(engine, args.steps // 4) for _ in range(4)]
        result = {"step_ms": min(times) * 1e3, "step_ms_all": [t * 1e3 for t in times]}
        result.update(profiled(engine, args.profile_steps, args.out, name))
        engine.abort(seq)
        while engine.has_work():
            engine.step()
    finally:
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return result


def report(results: dict) -> str:
    lines = [f"{torch.cuda.get_device_name()}, bs 1 decode, Llama-2-7B shapes", ""]
    lines.append("| config | step ms | tok/s | GPU busy us/step | GPU span us/step |")
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_ms']:.3f} | {1e3 / r['step_ms']:.1f} | {r['busy_us']:.0f} | {r['span_us']:.0f} |")
    if {"tp1", "half", "tp2"} <= results.keys():
        t1, th, t2 = (results[n]["step_ms"] for n in ("tp1", "half", "tp2"))
        lines += ["", f"tp2 / tp1 speed-up {t1 / t2:.3f}x (1.6x needs T2 <= {t1 / 1.6:.3f} ms); "
                      f"Th - T1/2 = {th - t1 / 2:.3f} ms (not halved); T2 - Th = {t2 - th:.3f} ms (communication)"]
    for name, r in results.items():
        lines += ["", f"{name}: kernels, us per step (count per step, mean us)"]
        lines += [f"  {k['us_per_step']:8.1f}  ({k['per_step']:5.1f} x {k['mean_us']:6.2f})  {k['name']}" for k in r["kernels"]]
        lines += ["", f"{name}: where two steps meet (start us, duration us, kernel)"]
        lines += [f"  {t:8.1f} {d:7.1f}  {n}" for t, d, n in r["boundary"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tp1,half,tp2")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=640)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--session", type=int, default=2048,
                    help="session_len: the block table's width, which sets attention's split count (W1's 2048)")
    ap.add_argument("--profile-steps", type=int, default=32)
    ap.add_argument("--ckpt-root", type=Path, default=Path("/tmp/prism-tp-decode"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/prism-tp-decode/out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.configs.split(","):
        results[name] = run_config(name, args, args.ckpt_root)
        print(f"[tp_decode] {name}: {results[name]['step_ms']:.3f} ms/step {results[name]['step_ms_all']}", flush=True)
    text = report(results)
    print(text, flush=True)
    (args.out / "tp_decode.md").write_text(text + "\n")
    (args.out / "tp_decode.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
