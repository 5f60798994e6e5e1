"""Host overhead of the LLM tier and the gateway, measured on the CPU with the tiny checkpoint.

The tiny LLaVA's forward is a few small matmuls, so what the clock sees here is the
Python and bookkeeping around it: the part a GPU step cannot hide (with CUDA graphs the
forward is one replay, everything else is this). Four measurements:

- decode: the engine's own step split into scheduler / prepare / forward / sample / other
  (bookkeeping: block commits, appending ids, stop checks), at several batch sizes; then
  the same decode through the embedded stack (AsyncLLMEngine + the gateway's ChatService)
  with the forward replaced by a sleep standing in for the GPU (`--device-ms`): the wall
  time beyond the sleep is host time a GPU would idle through (host work of the step, and
  waits for the GIL the event loop holds), plus the CPU time per step of the engine
  thread inside and between steps (the hand-off to asyncio) and of the event-loop thread
  (merging deltas, protos, detokenizing, stop strings);
- TTFT of one request (a 336×336 PIL image + 32 words), split into the gateway's stages
  (template, tokenize, image encode + sha256), vision, the prefill step and the first
  decode step, plus the end-to-end TTFT;
- W3 as bench.py runs it: turn 2 re-sends turn 1's image and answer: TTFT of both turns,
  how many prompt tokens turn 2 found in the prefix cache, and whether the gateway's
  re-rendered history kept the answer's ids;
- intake (`--parts intake`, not in the default set): W2's start, `--requests` requests with
  their own image submitted at once through the embedded pipeline as bench.py's `stream`
  does, the vision tower and the LLM's forward simulated by sleeps (`--vision-ms` per image,
  `--device-ms` per step), so what remains is the host path every request takes through the
  three tiers, all in one process under one GIL: when the 1st, 16th, middle and last request
  left the gateway, reached the vision tier, got its embedding, was queued in the engine and
  got its first token, and when the engine launched its first step. `--cores N` sizes the
  thread pools as on an N-core host (the loop's default executor, the vision prep pool).
  `--launch-us U`: each prefill step first spins 400 times for U µs holding the GIL, releasing
  it in between (an eager prefill's launches from Python), so the engine thread's wait for the
  GIL under the burst shows in when its second step comes.

The decode parts use the tiny checkpoint of the tests (vocab 512); TTFT, W3 and intake use
bench.py's tiny one (word-level tokenizer, 576 image rows), built once under /tmp/prism-bench.

    python bench/host_overhead.py [--batch-sizes 1,64,256] [--steps 64] [--repeats 5] [--device-ms 8]
    python bench/host_overhead.py --parts intake [--requests 256] [--cores 16] [--vision-ms 1.85]
                                  [--launch-us 50] [--prep-threads 16]

Runs on one torch thread so that the numbers are the host cost, not intra-op parallelism.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from bench import TINY, Stamps, build_checkpoint, make_image, make_texts, stream  # bench/bench.py, this script's neighbour
from gateway.config import GenerationConfig, TurbomindEngineConfig
from gateway.messages import build_request, encode_image, normalize_messages
from gateway.service import ChatService
from gateway.tiny_checkpoints import build_tiny_llava
from gateway.vl.constants import IMAGE_TOKEN
from llm_service.config import EngineConfig
from llm_service.engine import llm_engine
from llm_service.distributed.step import PackedStep
from llm_service.engine.async_engine import AsyncLLMEngine
from llm_service.engine.model_runner import StepLogits
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.sequence import Sequence
from vision_service.config import VisionConfig
from vision_service.engine import VisionEngine
from vision_service.types import ImageEmbedding

STAGES = ("scheduler", "prepare", "forward", "sample", "other")
TEXT = ("Describe the picture in one sentence, then say what the woman is doing and whether "
        "the quick brown fox jumps over the lazy dog.")


class Timers:
    """Seconds per named stage, collected by wrapping the callables that do the work."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.laps: dict[str, list[float]] = defaultdict(list)

    def wrap(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.total[stage] += dt
                self.laps[stage].append(dt)

        setattr(owner, name, timed)


@contextmanager
def instrumented(engine: llm_engine.LLMEngine):
    """The engine's step stages timed (wrappers on the instances, undone after)."""
    timers = Timers()
    wrapped = ((engine, "step", "step"), (engine.scheduler, "schedule", "scheduler"),
               (engine.runner, "prepare", "prepare"), (engine.runner, "forward", "forward"),
               (engine, "_sample", "sample"))
    before = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in wrapped]
    for owner, name, stage in wrapped:
        timers.wrap(owner, name, stage)
    try:
        yield timers
    finally:
        for owner, name, attr in before:
            if attr is None:
                del owner.__dict__[name]
            else:
                setattr(owner, name, attr)


def engine_config(bs: int, **kw) -> EngineConfig:
    return EngineConfig(device="cpu", max_batch_size=bs, session_len=2048, cache_max_entry_count=1.0,
                        block_size=64, **kw)


# ---------------------------------------------------------------- decode

def decode_stages(engine: llm_engine.LLMEngine, bs: int, steps: int) -> dict[str, float]:
    """ms per decode step and stage, `bs` sequences of 32 prompt tokens running."""
    gen = torch.Generator().manual_seed(bs)
    vocab = engine.spec.args.vocab_size
    seqs = [Sequence([1] + torch.randint(4, vocab, (31,), generator=gen).tolist(),
                     SamplingParams(max_new_tokens=steps + 32, ignore_eos=True)) for _ in range(bs)]
    for seq in seqs:
        engine.add(seq)
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    for _ in range(4):
        engine.step()
    with instrumented(engine) as timers:
        for _ in range(steps):
            engine.step()
    for seq in seqs:
        engine.abort(seq)
    t = {k: 1e3 * v / steps for k, v in timers.total.items()}
    t["other"] = t["step"] - sum(t[s] for s in STAGES if s != "other")
    t["host"] = t["step"] - t["forward"]
    return t


class SimulatedDevice:
    """Stands in for the GPU: the runner's forward becomes a sleep, which releases the GIL as
    waiting on a GPU step does, and returns fixed logits (each request repeats one token).
    The wall time a step takes beyond the sleep is host time the device would sit idle.

    launches, launch_us: a step with prompt tokens (an eager prefill on the GPU, ~400 kernels
    launched from Python) first spins `launches` times for `launch_us` holding the GIL, each
    followed by a release (`time.sleep(0)`, as a launch's C call lets it go): what the engine
    thread needs the GIL for, and waits on it for, while other threads run Python."""

    def __init__(self, engine: llm_engine.LLMEngine, ms: float, launches: int = 0, launch_us: float = 0.0):
        self.ms, self.slept = ms, 0.0
        self.launches, self.launch_s = launches, launch_us / 1e6
        self.logits = torch.randn(engine.max_batch_size, engine.spec.args.vocab_size)
        engine.runner.forward = self.forward

    def forward(self, step: PackedStep) -> StepLogits:
        tokens, logits_rows = step.header[1], step.header[4]
        if self.launches and tokens > logits_rows:
            for _ in range(self.launches):
                until = time.perf_counter() + self.launch_s
                while time.perf_counter() < until:
                    pass
                time.sleep(0)
        t0 = time.perf_counter()
        time.sleep(self.ms / 1e3)
        self.slept += time.perf_counter() - t0
        return StepLogits(self.logits[:logits_rows], None)


async def _pipeline_decode(service: ChatService, llm: AsyncLLMEngine, device: SimulatedDevice, bs: int,
                           steps: int) -> dict[str, float]:
    """All `bs` requests through ChatService at once; over `steps` decode steps: wall time,
    the device's (sleep) time, the engine thread's CPU inside `step` and between steps
    (handing outputs over), and the event-loop thread's CPU (the requests' consumers)."""
    gen = GenerationConfig(max_new_tokens=steps + 16, ignore_eos=True)
    messages = [[{"role": "user", "content": f"{i} {TEXT}"}] for i in range(bs)]
    engine = llm.engine
    marks: list[tuple[float, float, float, float]] = []  # per step: wall, thread CPU at entry; slept, CPU at exit
    step = engine.step

    def timed_step():
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return step()
        finally:
            marks.append((w0, c0, device.slept, time.thread_time()))

    window: dict[str, float] = {}
    reached = defaultdict(int)  # generated-token mark -> requests past it

    def count(before: int, after: int) -> None:
        for mark, key in ((4, "0"), (steps + 4, "1")):  # 4: every request past its prefill
            if before < mark <= after:
                reached[mark] += 1
                if reached[mark] == bs:
                    window["step" + key], window["loop" + key] = len(marks), time.thread_time()

    async def one(i: int) -> None:
        got = 0
        async for delta in service.stream(messages[i], gen):
            count(got, got + len(delta.token_ids))
            got += len(delta.token_ids)

    engine.step = timed_step
    try:
        await asyncio.gather(*(one(i) for i in range(bs)))
    finally:
        del engine.step
    a, b = int(window["step0"]), int(window["step1"])
    n = b - a
    wall = 1e3 * (marks[b][0] - marks[a][0]) / n
    slept = 1e3 * (marks[b - 1][2] - marks[a - 1][2]) / n
    return {
        "wall": wall,
        "exposed": wall - slept,
        "step_cpu": 1e3 * sum(m[3] - m[1] for m in marks[a:b]) / n,
        "between_steps_cpu": 1e3 * sum(marks[i + 1][1] - marks[i][3] for i in range(a, b)) / n,
        "loop_cpu": 1e3 * (window["loop1"] - window["loop0"]) / n,
    }


def pipeline_decode(path: Path, bs: int, steps: int, device_ms: float) -> dict[str, float]:
    llm = AsyncLLMEngine(str(path), engine_config(bs))
    device = SimulatedDevice(llm.engine, device_ms)
    service = ChatService(str(path), llm)
    try:
        asyncio.run(_pipeline_decode(service, llm, device, min(bs, 4), 8))  # warm-up
        return asyncio.run(_pipeline_decode(service, llm, device, bs, steps))
    finally:
        llm.close()


# ---------------------------------------------------------------- TTFT and W3

def word_checkpoint() -> Path:
    """bench.py's tiny LLaVA: its word-level tokenizer (a generated answer re-encodes to its
    ids, as with a real tokenizer) and 336-px images of 576 rows, so prompts have W1's length."""
    return build_checkpoint(Path("/tmp/prism-bench/llava-1.5-tiny-hf-random"), TINY, torch.float32, "cpu")


def _stack(path: Path, vision: VisionEngine) -> tuple[AsyncLLMEngine, ChatService]:
    llm = AsyncLLMEngine(str(path), engine_config(8, enable_prefix_caching=True), vision=vision)
    return llm, ChatService(str(path), llm)


def _texts(service: ChatService, n: int, seed: int) -> list[str]:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(service.model_path) / "tokenizer.json"))
    return make_texts(tok, n, 32, seed)


def _user(text: str, image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image}}]}]


async def _ttft(service: ChatService, messages: list[dict], gen: GenerationConfig) -> tuple[float, str, list[int]]:
    """(seconds to the first token, whole text, ids) of one request through the gateway service."""
    t0, first, text, ids = time.perf_counter(), None, [], []
    async for r in service.stream(messages, gen):
        if r.token_ids and first is None:
            first = time.perf_counter() - t0
        text.append(r.text)
        ids += r.token_ids
    return first, "".join(text), ids


def ttft_split(path: Path, repeats: int) -> dict[str, float]:
    """Medians (ms) over `repeats` fresh images of every stage up to the first decode."""
    vision = VisionEngine(str(path), VisionConfig(device="cpu"))
    llm, service = _stack(path, vision)
    tok, template = service.tokenizer, service.template
    laps: dict[str, list[float]] = defaultdict(list)
    gen = GenerationConfig(max_new_tokens=2, ignore_eos=True)

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        laps[name].append(1e3 * (now - t0))
        return now

    async def one(text: str, image) -> None:
        messages = normalize_messages(_user(text, image))
        t = time.perf_counter()
        prompt = template.messages2prompt(messages)
        t = lap("gateway: template", t)
        tok.encode_prompt(prompt.replace(IMAGE_TOKEN, tok.image_token))
        t = lap("gateway: tokenize", t)
        encode_image(image)
        t = lap("gateway: image encode + sha256", t)
        request = build_request(messages, template, tok, gen)
        t = lap("gateway: build_request (all of the above; the image object seen before)", t)
        await vision.encode([s.image.image for s in request.segments if s.WhichOneof("kind") == "image"])
        lap("vision: encode (decode, preprocess, tower)", t)
        with instrumented(llm.engine) as timers:
            laps["e2e TTFT, new image"].append(1e3 * (await _ttft(service, messages, gen))[0])
            steps = list(timers.laps["step"])
        laps["llm: prefill step"].append(1e3 * steps[0])
        laps["llm: first decode step"].append(1e3 * steps[1])
        laps["e2e TTFT, same request again"].append(1e3 * (await _ttft(service, messages, gen))[0])

    try:
        _warm_then_measure(one, _texts(service, repeats + 1, 1000), 1000, laps)
    finally:
        llm.close()
        vision.close()
    return {name: statistics.median(v) for name, v in laps.items()}


def _warm_then_measure(one, texts: list[str], seed: int, results: dict) -> None:
    """Run `one` on the first text as a warm-up, forget what it recorded, then on the rest,
    each with a fresh image (seeds seed-1, seed, seed+1, ...)."""
    asyncio.run(one(texts[0], make_image(seed - 1)))
    results.clear()
    for i, text in enumerate(texts[1:]):
        asyncio.run(one(text, make_image(seed + i)))


class _Usage:
    """Wraps an LLM backend; keeps the request and the usage of the last chunk it saw."""

    def __init__(self, llm):
        self.llm, self.request, self.usage = llm, None, None

    async def info(self):
        return await self.llm.info()

    async def generate(self, request):
        self.request = request
        async for chunk in self.llm.generate(request):
            self.usage = chunk.usage
            yield chunk


def _ids(request) -> list[int]:
    """The request's prompt ids, an image as one -1."""
    ids: list[int] = []
    for seg in request.segments:
        ids += seg.text.token_ids if seg.WhichOneof("kind") == "text" else [-1]
    return ids


def w3(path: Path, repeats: int, new_tokens: int) -> dict[str, float]:
    """bench.py's W3: turn 1, then turn 2 re-sending turn 1's image and answer; medians."""
    vision = VisionEngine(str(path), VisionConfig(device="cpu"))
    llm = AsyncLLMEngine(str(path), engine_config(8, enable_prefix_caching=True), vision=vision)
    backend = _Usage(llm)
    service = ChatService(str(path), backend)
    gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    out: dict[str, list[float]] = defaultdict(list)

    async def one(text: str, image) -> None:
        turn1 = _user(text, image)
        ttft1, answer, ids = await _ttft(service, turn1, gen)
        prompt1, u1 = _ids(backend.request), backend.usage
        turn2 = turn1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "What else can you see in the picture?"}]
        ttft2, _, _ = await _ttft(service, turn2, gen)
        prompt2, u2 = _ids(backend.request), backend.usage
        out["ttft1_ms"].append(1e3 * ttft1)
        out["ttft2_ms"].append(1e3 * ttft2)
        out["turn1_tokens"].append(u1.input_tokens + u1.output_tokens)
        out["turn2_input"].append(u2.input_tokens)
        out["turn2_cached"].append(u2.cached_tokens)
        out["answer_ids_kept"].append(float(prompt2[:len(prompt1) + len(ids)] == prompt1 + ids))

    try:
        _warm_then_measure(one, _texts(service, repeats + 1, 4000), 4000, out)
    finally:
        llm.close()
        vision.close()
    return {k: statistics.median(v) for k, v in out.items()}


# ---------------------------------------------------------------- intake of a burst (W2's start)

class SimulatedTower:
    """Stands in for the vision tower on the GPU: a sleep of `ms` per image (the 7B bench's tier
    encodes ~540 images/s on an H100: 1.85 ms), zero embeddings of the tower's shape."""

    def __init__(self, model, ms: float):
        self.ms, self.real, self.shape = ms, model.encode, None
        model.encode = self.encode

    def encode(self, batch: list) -> list[ImageEmbedding]:
        if self.shape is None:
            self.shape = self.real(batch[:1])[0].embedding.shape
        time.sleep(self.ms * len(batch) / 1e3)
        return [ImageEmbedding(torch.zeros(self.shape)) for _ in batch]


INTAKE_STAGES = (  # (label, Stamps target, start or end of its calls)
    ("gateway: prepare started", "ChatService.prepare", 1),
    ("gateway: prepared", "ChatService.prepare", 2),
    ("llm: request in (build_sequence)", "build_sequence", 1),
    ("vision: encode called", "VisionEngine.encode", 1),
    ("vision: embedding back", "VisionEngine.encode", 2),
    ("llm: queued in the engine", "AsyncLLMEngine._start", 1),
)


def intake(path: Path, requests: int, repeats: int, cores: int, vision_ms: float, device_ms: float,
           launch_us: float = 0.0, prep_threads: int = 0) -> tuple[dict[str, list[float]], dict[str, float]]:
    """ms after submission at which the 1st, 16th, middle and last request passed each stage,
    and the engine's first and second steps, the vision batches and the wall (medians over
    `repeats` bursts). launch_us: each prefill step's 400 launches (SimulatedDevice)."""
    from gateway import pipeline
    from vision_service.engine import DEFAULT_PREP_THREADS

    prep_threads = prep_threads or (min(DEFAULT_PREP_THREADS, cores) if cores else 0)
    backend = TurbomindEngineConfig(session_len=2048, max_batch_size=requests, cache_max_entry_count=0.8,
                                    enable_prefix_caching=True, device="cpu")
    pipe = pipeline(str(path), backend_config=backend, vision_config=VisionConfig(
        max_batch_size=32, device="cpu", preprocess_threads=prep_threads))
    llm = pipe._service.llm
    if cores:
        pipe._thread.loop.set_default_executor(ThreadPoolExecutor(min(32, cores + 4)))  # asyncio's default size
    SimulatedTower(llm.vision.model, vision_ms)
    SimulatedDevice(llm.engine, device_ms, 400 if launch_us else 0, launch_us)
    texts = _texts(pipe._service, requests, 9000)
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    stamps = Stamps([("gateway.service", "ChatService", "prepare"),
                     ("llm_service.engine.async_engine", None, "build_sequence"),
                     ("vision_service.engine", "VisionEngine", "encode"),
                     ("vision_service.engine", "VisionEngine", "_launch"),
                     ("llm_service.engine.async_engine", "AsyncLLMEngine", "_start")])
    ranks = sorted({0, min(15, requests - 1), requests // 2, requests - 1})
    cells: dict[str, list[list[float]]] = defaultdict(list)
    totals: dict[str, list[float]] = defaultdict(list)
    try:
        stream(pipe, [(t, make_image(8000 + i)) for i, t in enumerate(texts[:16])], gen)  # warm-up
        with stamps:
            for r in range(repeats):
                stamps.clear()
                prompts = [(t, make_image(10000 + 1000 * r + i)) for i, t in enumerate(texts)]
                traces, wall, start = stream(pipe, prompts, gen)
                for label, name, end in INTAKE_STAGES:
                    times = sorted(call[end] for call in stamps.calls if call[0] == name)
                    cells[label].append([1e3 * (times[k] - start) for k in ranks])
                firsts = sorted(t.first for t in traces)
                cells["first token"].append([1e3 * firsts[k] for k in ranks])
                steps = [s.launched_at for s in llm.engine.step_log if s.launched_at >= start]
                totals["engine's first step (ms)"].append(1e3 * (steps[0] - start))
                totals["second step (ms)"].append(1e3 * (steps[1] - start))
                totals["vision batches"].append(sum(call[0] == "VisionEngine._launch" for call in stamps.calls))
                totals["wall (ms)"].append(1e3 * wall)
    finally:
        pipe.close()
    table = {label: [statistics.median(col) for col in zip(*rows)] for label, rows in cells.items()}
    table["requests"] = [k + 1 for k in ranks]
    return table, {k: statistics.median(v) for k, v in totals.items()}


# ---------------------------------------------------------------- report

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device-ms", type=float, default=8.0, help="simulated device time of a decode step")
    parser.add_argument("--parts", default="decode,pipeline,ttft,w3", help="and intake")
    parser.add_argument("--requests", type=int, default=256, help="intake: requests submitted at once")
    parser.add_argument("--cores", type=int, default=0, help="intake: size the thread pools as on this many cores")
    parser.add_argument("--vision-ms", type=float, default=1.85, help="intake: simulated tower time per image")
    parser.add_argument("--launch-us", type=float, default=0.0,
                        help="intake: Python µs holding the GIL per launch of a prefill step's 400 (0: none)")
    parser.add_argument("--prep-threads", type=int, default=0,
                        help="intake: the vision tier's preprocessing threads (0: its default for --cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = build_tiny_llava()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    parts = args.parts.split(",")

    if "decode" in parts:
        print("## engine decode step (ms/step)\n")
        print("| bs | scheduler | prepare | forward | sample | other | host (step - forward) | step |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for bs in sizes:
            engine = llm_engine.LLMEngine(str(path), engine_config(bs))
            t = decode_stages(engine, bs, args.steps)
            cells = " | ".join(f"{t[s]:.3f}" for s in (*STAGES, "host", "step"))
            print(f"| {bs} | {cells} |", flush=True)
    if "pipeline" in parts:
        print(f"\n## decode through AsyncLLMEngine + ChatService, the device simulated by a {args.device_ms:g} ms "
              "sleep (ms/step)\n")
        print("| bs | wall | exposed host (wall - device) | engine thread CPU: step | between steps "
              "| event-loop thread CPU |")
        print("|---:|---:|---:|---:|---:|---:|")
        for bs in sizes:
            t = pipeline_decode(path, bs, args.steps, args.device_ms)
            cells = " | ".join(f"{t[k]:.3f}" for k in ("wall", "exposed", "step_cpu", "between_steps_cpu", "loop_cpu"))
            print(f"| {bs} | {cells} |", flush=True)
    if {"ttft", "w3", "intake"} & set(parts):
        words = word_checkpoint()
    if "ttft" in parts:
        print("\n## TTFT of one request: 336x336 PIL image + 32 words, bench.py's tiny checkpoint (ms, median)\n")
        for name, ms in ttft_split(words, args.repeats).items():
            print(f"- {name}: {ms:.2f}")
    if "w3" in parts:
        print("\n## W3: turn 2 re-sends turn 1's image and answer, 128 new tokens (median)\n")
        r = w3(words, args.repeats, 128)
        print(f"- TTFT turn 1 → turn 2: {r['ttft1_ms']:.2f} → {r['ttft2_ms']:.2f} ms "
              f"({r['ttft1_ms'] / r['ttft2_ms']:.1f}x lower)")
        print(f"- turn 1 prompt + answer: {r['turn1_tokens']:.0f} tokens; turn 2 prompt {r['turn2_input']:.0f} tokens, "
              f"{r['turn2_cached']:.0f} from the prefix cache")
        print(f"- turn 2's ids start with turn 1's prompt and answer ids: {r['answer_ids_kept']:.0%} of turns")
    if "intake" in parts:
        table, totals = intake(words, args.requests, args.repeats, args.cores, args.vision_ms, args.device_ms,
                               args.launch_us, args.prep_threads)
        launches = f", prefill launches 400 x {args.launch_us:g} µs" if args.launch_us else ""
        print(f"\n## intake: {args.requests} requests with their own image at once, tower {args.vision_ms:g} ms/image, "
              f"LLM step {args.device_ms:g} ms{launches} (simulated)"
              f"{f', pools sized for {args.cores} cores' if args.cores else ''}"
              f"{f', {args.prep_threads} prep threads' if args.prep_threads else ''}; "
              f"ms after submission, median of {args.repeats}\n")
        ranks = table.pop("requests")
        print("| stage | " + " | ".join(f"request {k}" for k in ranks) + " |")
        print("|---" + "|---:" * len(ranks) + "|")
        for label, row in table.items():
            print(f"| {label} | " + " | ".join(f"{ms:.0f}" for ms in row) + " |")
        print("\n" + ", ".join(f"{k}: {v:.0f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
