"""Prism against transformers on a LLaVA-1.5-7B-shaped model with random weights, in one run.

    python bench/bench.py                       # GPU: build the 7B shape, check, W1-W4, HF, one table
    python bench/bench.py --tp 2 --skip-hf      # Prism alone, tensor parallel over 2 GPUs
    python bench/bench.py --tiny                # CPU smoke test of the whole flow (tiny shapes, small counts)

Why random weights: no hub here, and speed depends only on shapes. Why one run: transformers is
measured on the same machine, model and inputs as Prism, so the ratios mean something.
Order: tiny fp32 check -> build/save -> Prism embedded (7B logits, W1, W2, W3) -> W4 split ->
transformers (logits reference, eager, static cache + compile). Only one copy of the 7B weights
is on the GPU at a time. Every stage is guarded: a failure is reported in the table, not fatal,
and results.json / results.md are rewritten after every stage, so a cut-off run still reports.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

IMAGE_TOKEN_ID = 32000
SPECIAL_IDS = (0, 1, 2, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID + 1)  # <unk> <s> </s> <image> <pad>
PAD_TOKEN_ID = 32001
SESSION_LEN = 2048
# LMDeploy's llava-v1 template, written out so the transformers side does not depend on Prism's renderer.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CORPUS = [  # the words the tokenizer knows besides its fillers
    SYSTEM, "USER: ASSISTANT: describe this image. What else can you see in the picture?",
    "The quick brown fox jumps over the lazy dog while a tiger rests in the green grass near the river.",
    " ".join("0123456789,.;:!?'\"()[]{}<>/-_"),
]
TARGETS = {"w1_decode": 190.0, "w1_ceiling": 0.85, "w2_tok_s": 4000.0, "w3_ratio": 5.0, "w4_ratio": 0.95}


@dataclass(frozen=True)
class Shape:
    """Model shapes; vocab and image token follow llava-1.5-7b-hf (tokenizer 32002 ids, embedding 32064 rows)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image: int = 336
    patch: int = 14
    vocab: int = 32064
    init_std: float = 0.02

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def llm_params(self) -> int:
        """Embedding, decoder layers, final norm and lm_head: what a bs=1 decode step reads."""
        head_dim = self.hidden // self.heads
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * head_dim + self.hidden * self.hidden
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * layer + self.hidden


LLAVA_7B = Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                 vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096)
TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
             vision_hidden=32, vision_layers=2, vision_heads=4, vision_intermediate=64)


@dataclass(frozen=True)
class Counts:
    """Workload sizes: the issue's on the GPU, small ones for the CPU smoke test."""

    requests: int = 256      # W2 / W4
    new_tokens: int = 128
    text_tokens: int = 32
    hf_batch: int = 32       # transformers' W2 runs one batch of this many of the W2 requests
    vision_batch: int = 32
    repeats: int = 3         # W1 and W3 report the median over this many fresh images
    check_steps: int = 8     # bf16 logits compared over this many generated tokens
    warmup: int = 16


SMOKE = Counts(requests=8, new_tokens=8, hf_batch=4, vision_batch=4, repeats=1, check_steps=4, warmup=2)


# ---------------------------------------------------------------- results

class GcPauses:
    """The garbage collector's pauses while entered: count and ms per generation, and the longest."""

    def __init__(self):
        self.ms = {0: 0.0, 1: 0.0, 2: 0.0}
        self.counts = {0: 0, 1: 0, 2: 0}
        self.longest_ms = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = 1e3 * (time.perf_counter() - self._started)
        self.ms[info["generation"]] += ms
        self.counts[info["generation"]] += 1
        self.longest_ms = max(self.longest_ms, ms)

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {"gc_ms": {g: round(v, 1) for g, v in self.ms.items()}, "gc_counts": dict(self.counts),
                "gc_longest_ms": round(self.longest_ms, 1)}


class TritonCompiles:
    """Triton kernels compiled while entered (a compile mid-workload stalls the thread that
    launches: ~0.5-1 s each on the GPU machine): kernel name, seconds and the specialization
    (argument types, attributes such as divisibility by 16, arguments fixed as constants: what
    made it a new variant), in order."""

    def __init__(self):
        self.compiles: list[tuple[str, float | None, str]] = []
        self._started: dict = {}

    def _before(self, *, key, fn, **_) -> None:
        self._started[str(key)] = time.perf_counter()
        return None  # None: go on and compile

    def _after(self, *, key, fn, compile, **_) -> None:
        started = self._started.pop(str(key), None)
        try:  # Triton's hook arguments are not a stable interface
            spec = {name: ty for name, ty in compile["signature"].items() if ty != "constexpr"}
            spec["attrs"] = {fn.jit_function.arg_names[i[0]]: a for i, a in compile["configs"][0].items()}
            spec["constants"] = {str(k): str(v) for k, v in compile["constants"].items()}
        except Exception as e:  # noqa: BLE001
            spec = f"unread: {e!r}"
        self.compiles.append((fn.name, round(time.perf_counter() - started, 2) if started else None, str(spec)))

    def __enter__(self) -> "TritonCompiles":
        try:
            from triton import knobs
        except ImportError:
            return self
        self._knobs = knobs.runtime
        self._saved = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "_saved"):
            self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._saved


def _alloc_retries() -> int:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


class Report:
    """Results as nested dicts; rewritten to results.json and results.md after every stage."""

    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {"stage_seconds": {}}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, path: str, value) -> None:
        *parents, last = path.split(".")
        node = self.data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    def get(self, path: str):
        node = self.data
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    @contextlib.contextmanager
    def stage(self, path: str):
        """Run a stage: time it, and on failure store {"error": ...} at `path` and carry on.
        Also records what stalls a stage from outside its code: the garbage collector's pauses
        (every thread's), the CUDA allocator's retries (a cudaMalloc that failed, freed the
        cache and synchronized the device) and Triton's compiles."""
        t0 = time.perf_counter()
        print(f"[bench] {path} ...", flush=True)
        pauses, compiles = GcPauses(), TritonCompiles()
        retries = _alloc_retries()
        try:
            with pauses, compiles:
                yield
        except Exception as e:  # noqa: BLE001  (one failed stage must not lose the others)
            traceback.print_exc()
            error = f"failed: {type(e).__name__}: {e}".splitlines()[0][:200]
            self.put(path, {"error": error})
            self.data.setdefault("errors", {})[path] = error
        finally:
            seconds = round(time.perf_counter() - t0, 1)
            self.data["stage_seconds"][path] = seconds
            self.data.setdefault("stalls", {})[path] = {**pauses.summary(), "alloc_retries": _alloc_retries() - retries,
                                                        "triton_compiles": compiles.compiles}
            if compiles.compiles and path.startswith("prism.W"):
                print(f"[bench] {path}: Triton compiled {[c[:2] for c in compiles.compiles]} mid-workload", flush=True)
            print(f"[bench] {path} done in {seconds}s", flush=True)
            self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "results.md").write_text(render(self.data))


# ---------------------------------------------------------------- checkpoint

def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with llava's ids: <unk> <s> </s>, the words of CORPUS, filler words
    w<i> up to 31999, `<image>` = 32000, `<pad>` = 32001, and filler words for the model's 62 extra
    rows (llava-1.5-7b-hf's tokenizer has none: a trained model never says them, this random one
    does). Word-level so that any generated ids but the special ones decode to text that encodes
    back to the same ids, as a real tokenizer mostly does: in W3 the re-sent answer then costs what
    it costs with a real model, instead of exploding into characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = dict.fromkeys(word for text in CORPUS for word, _ in split.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    vocab.update({f"w{i}": i for i in range(len(vocab), IMAGE_TOKEN_ID)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<image>", "<pad>"])  # the last two get 32000, 32001
    tok.add_tokens([f"w{i}" for i in range(IMAGE_TOKEN_ID + 2, vocab_size)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def llava_config(shape: Shape):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image, patch_size=shape.patch, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=shape.image_tokens)
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def build_checkpoint(path: Path, shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Path:
    """Build on `device` directly (no slow CPU init), fill matrices with N(0, init_std), save in
    the llava-hf layout with tokenizer and processor. Reused when the folder holds this shape."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    stamp = {"shape": asdict(shape), "dtype": str(dtype), "seed": seed, "silent_special_ids": list(SPECIAL_IDS)}
    marker = path / "bench_shape.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return path
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(llava_config(shape)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, shape.init_std)
        # The special tokens' LM-head rows are zero, so a logit of 0 never wins against 32k random
        # ones: like a trained model, this one does not say them mid-answer. It matters in W3: the
        # detokenizer skips them, so a re-sent answer that held one would not encode back to its
        # ids, and turn 2 would prefill the answer from there on (27 vs 10 ms, 1 answer in 4).
        model.lm_head.weight[list(SPECIAL_IDS)] = 0
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    release_memory(device)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": shape.image},
                                            crop_size={"height": shape.image, "width": shape.image})
    LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(shape.vocab), patch_size=shape.patch,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   image_token="<image>").save_pretrained(path)
    marker.write_text(json.dumps(stamp))
    return path


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- inputs

def make_image(seed: int, size: tuple[int, int] = (336, 336)):
    """A smooth random picture (a 6x6 colour grid, bicubic-upscaled): distinct per seed and,
    unlike noise, compressible, so PNG encoding costs what it costs for photos."""
    from PIL import Image

    grid = np.random.RandomState(seed).randint(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.BICUBIC)


def make_texts(tokenizer, n: int, n_tokens: int, seed: int) -> list[str]:
    """n different texts of n_tokens words, one token each."""
    words = [w for w in tokenizer.get_vocab() if w.isalnum()]
    rng = np.random.RandomState(seed)
    texts = [" ".join(words[i] for i in rng.randint(len(words), size=n_tokens)) for _ in range(n)]
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) == n_tokens for t in texts)
    return texts


def llava_prompt(text: str) -> str:
    """What the llava-v1 template renders for (text, one image), in transformers' image token."""
    return f"{SYSTEM} USER: <image>\n{text} ASSISTANT:"


@dataclass
class Inputs:
    """Every prompt of the run, made once so Prism and transformers see the same ones."""

    check: tuple
    w1: list[tuple]
    w2: list[tuple]
    w3: list[tuple]
    warmup: list[tuple]


def make_inputs(path: Path, shape: Shape, counts: Counts) -> Inputs:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    size = (shape.image, shape.image)

    def prompts(n: int, seed: int) -> list[tuple]:
        texts = make_texts(tokenizer, n, counts.text_tokens, seed)
        return [(text, make_image(seed + i, size)) for i, text in enumerate(texts)]

    return Inputs(check=prompts(1, 5000)[0], w1=prompts(counts.repeats, 1000), w2=prompts(counts.requests, 2000),
                  w3=prompts(counts.repeats, 4000), warmup=prompts(counts.warmup, 3000))


# ---------------------------------------------------------------- measuring

def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    nbytes = (2 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    iters, t0 = 10, time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    release_memory(device)
    return 2 * nbytes * iters / seconds


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Trace:
    """One request as the client saw it; times in seconds since the batch was submitted."""

    first: float = math.nan
    last: float = math.nan
    tokens: int = 0
    text: str = ""


def stream(pipe, prompts: list, gen) -> tuple[list[Trace], float, float]:
    """Submit all prompts at once through stream_infer: (traces, wall seconds, start time)."""
    traces = [Trace() for _ in prompts]
    start = time.perf_counter()
    for r in pipe.stream_infer(prompts, gen_config=gen):
        trace = traces[r.index]
        trace.text += r.text or ""
        if r.token_ids:
            now = time.perf_counter() - start
            if not trace.tokens:
                trace.first = now
            trace.last = now
            trace.tokens += len(r.token_ids)
    return traces, time.perf_counter() - start, start


def decode_rate(trace: Trace) -> float:
    return (trace.tokens - 1) / (trace.last - trace.first)


class VisionWatch(threading.Thread):
    """Polls the vision tier's counters during a workload, to time the encoding of its images alone."""

    def __init__(self, read, images: int):
        super().__init__(daemon=True)
        self.read, self.images = read, images
        self.base = read()
        self.done_at = math.nan
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.005):
            if self.read()[0] - self.base[0] >= self.images:
                self.done_at = time.perf_counter()
                return

    def result(self, start: float) -> dict:
        self._halt.set()
        self.join()
        images, batches = (now - base for now, base in zip(self.read(), self.base))
        return {"images": images, "batches": batches, "mean_batch": images / max(batches, 1),
                "images_s": self.images / (self.done_at - start)}


class LLMWatch(threading.Thread):
    """Polls the LLM tier's running / waiting counts during a workload (every 50 ms): how fast the
    requests enter the engine, in either mode. `read()` -> (running, waiting, free_blocks, total_blocks)."""

    def __init__(self, read):
        super().__init__(daemon=True)
        self.read = read
        self.samples: list[tuple[float, tuple[int, int, int, int]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            self.samples.append((time.perf_counter(), self.read()))

    def result(self, start: float) -> dict:
        self._halt.set()
        self.join()
        if not self.samples:
            return {}
        timeline = [(round(t - start, 2), *counts[:3]) for t, counts in self.samples[::10]]  # every 0.5 s
        peak = max(counts[0] for _, counts in self.samples)
        at_peak = next(t for t, counts in self.samples if counts[0] == peak)
        return {"total_blocks": self.samples[0][1][3], "max_running": peak, "max_running_at_s": at_peak - start,
                "timeline_s_running_waiting_free": timeline}


def embedded_llm_reader(pipe):
    """(running, waiting, free_blocks, total_blocks) of the pipeline's in-process engine."""
    engine = pipe._service.llm.engine

    def read() -> tuple[int, int, int, int]:
        return (len(engine.scheduler.running), len(engine.scheduler.waiting), engine.blocks.num_free_blocks,
                engine.blocks.num_blocks)

    return read


def remote_llm_reader(target: str):
    """The same counts of an LLM tier over its gRPC Info."""
    import grpc

    from protos import llm_pb2, llm_pb2_grpc

    stub = llm_pb2_grpc.LLMServiceStub(grpc.insecure_channel(target))

    def read() -> tuple[int, int, int, int]:
        info = stub.Info(llm_pb2.LLMInfoRequest(), timeout=10)
        return info.running, info.waiting, info.free_blocks, info.total_blocks

    return read


def embedded_vision_reader(pipe):
    """(images_encoded, batches_run) of the pipeline's in-process vision engine."""
    engine = pipe._service.llm.vision  # the pipeline exposes no stats of its own

    def read() -> tuple[int, int]:
        info = engine.info()
        return info.images_encoded, info.batches_run

    return read


def remote_vision_reader(target: str):
    """(images_encoded, batches_run) of a vision tier over its gRPC Info."""
    import grpc

    from protos import vision_pb2, vision_pb2_grpc

    stub = vision_pb2_grpc.VisionServiceStub(grpc.insecure_channel(target))

    def read() -> tuple[int, int]:
        info = stub.Info(vision_pb2.VisionInfoRequest(), timeout=10)
        return info.images_encoded, info.batches_run

    return read


# ---------------------------------------------------------------- Prism workloads

def prism_pipeline(path: Path, args, counts: Counts):
    from gateway import TurbomindEngineConfig, VisionConfig, pipeline

    backend = TurbomindEngineConfig(session_len=SESSION_LEN, max_batch_size=counts.requests,
                                    cache_max_entry_count=0.8, enable_prefix_caching=True, tp=args.tp,
                                    device=args.device, quant_policy=args.quant_policy)
    return pipeline(str(path), backend_config=backend,
                    vision_config=VisionConfig(max_batch_size=counts.vision_batch, device=args.device))


def prism_check(pipe, prompt: tuple, steps: int) -> dict:
    """Prism's greedy tokens and their logits, compared with transformers later (it needs the GPU to itself)."""
    from gateway import GenerationConfig

    r = pipe([prompt], gen_config=GenerationConfig(max_new_tokens=steps, ignore_eos=True,
                                                   output_logits="generation"))[0]
    return {"token_ids": list(r.token_ids), "input_token_len": r.input_token_len,
            "logits": torch.as_tensor(r.logits, dtype=torch.float32).cpu()}


def w1_latency(pipe, inputs: Inputs, counts: Counts, ceiling: float) -> dict:
    """One request at a time, each with a new image: median TTFT and decode rate."""
    from gateway import GenerationConfig

    gen = GenerationConfig(max_new_tokens=counts.new_tokens, ignore_eos=True)
    traces = [stream(pipe, [prompt], gen)[0][0] for prompt in inputs.w1]
    decode = statistics.median(decode_rate(t) for t in traces)
    return {"ttft_ms": 1e3 * statistics.median(t.first for t in traces), "decode_tok_s": decode,
            "ceiling_frac": decode / ceiling, "tokens": [t.tokens for t in traces]}


def w2_throughput(pipe, inputs: Inputs, counts: Counts, vision_read, llm_read) -> dict:
    """All requests at once, each with its own image; a small warm-up batch first."""
    from gateway import GenerationConfig

    gen = GenerationConfig(max_new_tokens=counts.new_tokens, ignore_eos=True)
    stream(pipe, inputs.warmup, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    watch, llm_watch = VisionWatch(vision_read, len(inputs.w2)), LLMWatch(llm_read)
    watch.start()
    llm_watch.start()
    traces, wall, start = stream(pipe, inputs.w2, gen)
    tokens = sum(t.tokens for t in traces)
    ttfts = sorted(t.first for t in traces)
    out = {"output_tok_s": tokens / wall, "requests_s": len(traces) / wall, "wall_s": wall, "tokens": tokens,
           "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_max_s": ttfts[-1],
           "vision": watch.result(start), "llm": llm_watch.result(start)}
    print(f"[bench] W2 LLM tier: {out['llm']}", flush=True)
    engine = getattr(getattr(pipe, "_service", None), "llm", None)
    if hasattr(engine, "engine"):  # embedded: the engine's own step log tells the schedule
        out["steps"] = schedule_summary(engine.engine.step_log, start, start + wall)
        print(f"[bench] W2 schedule: {out['steps']}", flush=True)
    return out


def schedule_summary(log, start: float, end: float) -> dict:
    """Steps launched in [start, end]: how many mixed prefill in, for how long, and the
    pure-decode steps' batch size and duration (a step lasts until the next launch)."""
    steps = [r for r in list(log) if start <= r.launched_at <= end]
    if not steps:
        return {}
    ends = [r.launched_at for r in steps[1:]] + [end]
    prefill = [(r, e - r.launched_at) for r, e in zip(steps, ends) if r.prefill_tokens]
    decode = [(r, e - r.launched_at) for r, e in zip(steps, ends) if not r.prefill_tokens]
    return {
        "steps": len(steps),
        "first_step_s": steps[0].launched_at - start,
        "prefill_steps": len(prefill),
        "prefill_tokens": sum(r.prefill_tokens for r, _ in prefill),
        "prefill_step_s": sum(d for _, d in prefill),
        "last_prefill_at_s": (prefill[-1][0].launched_at - start) if prefill else None,
        "decode_steps": len(decode),
        "decode_step_s": sum(d for _, d in decode),
        "decode_rows_mean": statistics.fmean(r.decode_rows for r, _ in decode) if decode else 0,
        "max_running": max(r.running for r in steps),
        "first_steps_at_s_prefill_decode": [(round(r.launched_at - start, 3), r.prefill_tokens, r.decode_rows)
                                            for r in steps[:12]],
    }


def vision_alone(pipe, inputs: Inputs) -> dict:
    """The embedded vision tier by itself: all W2 images (already encoded to bytes, as the gateway
    sends them) submitted at once to its encode(): decode + preprocess + tower + projector, at its
    own batch size. Compare with transformers' tower alone on ready pixel values."""
    import asyncio

    from gateway.messages import encode_image

    engine = pipe._service.llm.vision
    images = [encode_image(image) for _, image in inputs.w2]

    async def all_at_once() -> None:
        await asyncio.gather(*(engine.encode([image]) for image in images))

    before, finishing = engine.info(), engine.finish_seconds
    t0 = time.perf_counter()
    asyncio.run(all_at_once())
    wall = time.perf_counter() - t0
    after = engine.info()
    batches = after.batches_run - before.batches_run
    return {"images_s": len(images) / wall, "images": len(images), "wall_s": wall,
            "mean_batch": (after.images_encoded - before.images_encoded) / max(1, batches),
            "finisher_s": engine.finish_seconds - finishing,  # forward waits + host copies, per wall_s
            "tower": tower_alone(engine, images[: engine.config.max_batch_size])}


def tower_alone(engine, images) -> dict:
    """The tier's tower + projector on ready pixels, one batch of `images`, timed as hf_vision
    times transformers' (the same work at the same batch size; the engine's threads are idle)."""
    from vision_service.preprocess import decode_image

    prepared = [engine.model.prepare(decode_image(image.data), {}) for image in images]
    device = str(engine.device)
    engine.model.encode(prepared)
    sync(device)
    iters, t0 = 3, time.perf_counter()
    for _ in range(iters):
        engine.model.encode(prepared)
    sync(device)
    return {"batch": len(images), "images_s": iters * len(images) / (time.perf_counter() - t0)}


def w3_multiturn(pipe, inputs: Inputs, counts: Counts) -> dict:
    """Turn 2 re-sends turn 1's image after the answer: prefix and embedding caches should hit."""
    from gateway import GenerationConfig

    gen = GenerationConfig(max_new_tokens=counts.new_tokens, ignore_eos=True)
    first, second = [], []
    for text, image in inputs.w3:
        turn1 = [{"role": "user", "content": [{"type": "text", "text": text},
                                              {"type": "image_url", "image_url": {"url": image}}]}]
        t1 = stream(pipe, [turn1], gen)[0][0]
        turn2 = turn1 + [{"role": "assistant", "content": t1.text},
                         {"role": "user", "content": "What else can you see in the picture?"}]
        t2 = stream(pipe, [turn2], gen)[0][0]
        first.append(t1.first)
        second.append(t2.first)
    ttft1, ttft2 = statistics.median(first), statistics.median(second)
    return {"ttft1_ms": 1e3 * ttft1, "ttft2_ms": 1e3 * ttft2, "ratio": ttft1 / ttft2,
            "turns_ms": [[round(1e3 * a, 1), round(1e3 * b, 1)] for a, b in zip(first, second)]}


def _profiled(name: str, run, out: Path, timeline: bool = True) -> None:
    """`run()` under torch.profiler: kernels by device time and host ops by host time,
    printed and written to OUT/profile_{name}.txt (and the timeline, unless too long to keep)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    tables = [f"{name}: {wall * 1e3:.1f} ms wall under the profiler"]
    if torch.cuda.is_available():
        tables.append(events.table(sort_by="self_cuda_time_total", row_limit=30))
    tables.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
    text = "\n\n".join(tables)
    (out / f"profile_{name}.txt").write_text(text)
    print(text, flush=True)
    if not timeline:
        return
    trace = out / f"profile_{name}.json"
    prof.export_chrome_trace(str(trace))  # the timeline: host gaps between the GPU's work
    with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()


def profile_w1(pipe, inputs: Inputs, counts: Counts, out: Path) -> None:
    """One W1 request: the kernels that make up a decode step (where the bs=1 step time goes)."""
    from gateway import GenerationConfig

    gen = GenerationConfig(max_new_tokens=counts.new_tokens, ignore_eos=True)
    _profiled("w1", lambda: stream(pipe, [inputs.w1[0]], gen), out)
    text, image = inputs.w1[0]
    with Stamps(TTFT_STAMPS + VISION_STAMPS) as stamps:
        for i in range(3):  # a new image each time: the first id waits for the vision tier
            stamps.clear()
            traces, _, start = stream(pipe, [(text, make_image(7000 + i, image.size))], gen)
            print(f"[bench] W1 new image, first id at {1e3 * traces[0].first:.2f} ms: {stamps.since(start, 24)}",
                  flush=True)


def profile_w2(pipe, inputs: Inputs, counts: Counts, out: Path) -> None:
    """W2 once more under the profiler (kernel totals only: its timeline is ~100k events): where
    the whole workload's GPU time goes, prefill GEMMs against decode attention and the rest."""
    from gateway import GenerationConfig

    gen = GenerationConfig(max_new_tokens=counts.new_tokens, ignore_eos=True)
    prompts = [(text, make_image(9000 + i, image.size)) for i, (text, image) in enumerate(inputs.w2)]  # uncached
    _profiled("w2", lambda: stream(pipe, prompts, gen), out, timeline=False)


def profile_w3(pipe, inputs: Inputs, counts: Counts, out: Path) -> None:
    """W3's turn 2 up to its first token (max_new_tokens 1): where the follow-up's TTFT goes."""
    from gateway import GenerationConfig

    text, image = inputs.warmup[-1]  # not one of W3's: those must find nothing cached
    turn1 = [{"role": "user", "content": [{"type": "text", "text": text},
                                          {"type": "image_url", "image_url": {"url": image}}]}]
    answer = stream(pipe, [turn1], GenerationConfig(max_new_tokens=counts.new_tokens, ignore_eos=True))[0][0]
    turn2 = turn1 + [{"role": "assistant", "content": answer.text},
                     {"role": "user", "content": "What else can you see in the picture?"}]
    gen = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    stream(pipe, [turn2], gen)  # warm: the same path once before it is traced
    _profiled("w3_turn2", lambda: stream(pipe, [turn2], gen), out)
    gen = GenerationConfig(max_new_tokens=counts.new_tokens, ignore_eos=True)  # as W3 runs it
    with Stamps(TTFT_STAMPS) as stamps:
        for _ in range(5):  # the host's share: when each stage of turn 2 ran, when its first id arrived
            stamps.clear()
            traces, _, start = stream(pipe, [turn2], gen)
            print(f"[bench] W3 turn 2, first id at {1e3 * traces[0].first:.2f} ms: {stamps.since(start)}", flush=True)


# The stages of a request up to its first id, as (module, class or None, function).
TTFT_STAMPS = [
    ("gateway.service", "ChatService", "prepare"),
    ("llm_service.engine.async_engine", None, "build_sequence"),
    ("llm_service.engine.async_engine", "AsyncLLMEngine", "_start"),
    ("llm_service.engine.scheduler", "Scheduler", "schedule"),
    ("llm_service.engine.model_runner", "ModelRunner", "prepare"),
    ("llm_service.engine.cuda_graph", "PrefillGraphs", "run"),
    ("llm_service.engine.cuda_graph", "DecodeGraphs", "run"),
    ("llm_service.engine.llm_engine", "LLMEngine", "_sample"),
    ("llm_service.engine.llm_engine", "LLMEngine", "_complete"),
    ("llm_service.engine.async_engine", "AsyncLLMEngine", "_flush"),
]


VISION_STAMPS = [
    ("vision_service.engine", "VisionEngine", "encode"),
    ("vision_service.engine", "VisionEngine", "_prepare"),
    ("vision_service.engine", "VisionEngine", "_launch"),
    ("vision_service.engine", "VisionEngine", "_finish"),
    ("vision_service.engine", "VisionEngine", "_to_host"),
    ("vision_service.staging", "PinnedStaging", "to_device"),  # the pixels, then the LLM's image rows
    ("llm_service.engine.model_runner", "ModelRunner", "forward"),
]


class Stamps:
    """Wraps functions (sync or async) to record when each call started and ended, on any
    thread: a request's host timeline without a profiler's own overhead."""

    def __init__(self, targets: list[tuple[str, str | None, str]]):
        import importlib

        self.targets = [(importlib.import_module(m), c, f) for m, c, f in targets]
        self.calls: list[tuple[str, float, float]] = []
        self.saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> "Stamps":
        import inspect

        for module, cls, name in self.targets:
            owner = getattr(module, cls) if cls else module
            fn = owner.__dict__[name] if cls else getattr(module, name)
            label = f"{cls}.{name}" if cls else name
            self.saved.append((owner, name, fn))
            setattr(owner, name, self._async(fn, label) if inspect.iscoroutinefunction(fn) else self._sync(fn, label))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)

    def _sync(self, fn, label):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.append((label, t0, time.perf_counter()))
        return timed

    def _async(self, fn, label):
        async def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.calls.append((label, t0, time.perf_counter()))
        return timed

    def clear(self) -> None:
        self.calls.clear()

    def since(self, start: float, limit: int = 14) -> str:
        """The first `limit` calls as 'name start-end' in ms after `start`."""
        calls = sorted(self.calls, key=lambda c: c[1])[:limit]
        return ", ".join(f"{n} {1e3 * (a - start):.2f}-{1e3 * (b - start):.2f}" for n, a, b in calls)


def run_prism(report: Report, path: Path, args, counts: Counts, inputs: Inputs, ceiling: float) -> dict | None:
    """Embedded: the 7B logits sample first (doubles as warm-up), then W1-W3."""
    check = None
    with report.stage("prism.load"):
        t0 = time.perf_counter()
        pipe = prism_pipeline(path, args, counts)
        report.put("prism.load", {"seconds": time.perf_counter() - t0})
    if report.get("prism.load.error"):
        return None
    try:
        with report.stage("correctness.bf16_prism"):
            check = prism_check(pipe, inputs.check, counts.check_steps)
        if "W1" in args.workloads:
            with report.stage("prism.W1"):
                report.put("prism.W1", w1_latency(pipe, inputs, counts, ceiling))
        if args.profile:
            with report.stage("prism.profile"):
                if "W1" in args.workloads:
                    profile_w1(pipe, inputs, counts, args.out)
                if "W3" in args.workloads:
                    profile_w3(pipe, inputs, counts, args.out)
        if "W2" in args.workloads:
            with report.stage("prism.W2"):
                report.put("prism.W2", w2_throughput(pipe, inputs, counts, embedded_vision_reader(pipe),
                                                          embedded_llm_reader(pipe)))
            with report.stage("prism.vision"):
                report.put("prism.vision", vision_alone(pipe, inputs))
            if args.profile:
                with report.stage("prism.profile_w2"):
                    profile_w2(pipe, inputs, counts, args.out)
        if "W3" in args.workloads:
            with report.stage("prism.W3"):
                report.put("prism.W3", w3_multiturn(pipe, inputs, counts))
    finally:
        pipe.close()
        del pipe
        release_memory(args.device)
    return check


def run_split(report: Report, path: Path, args, counts: Counts, inputs: Inputs) -> None:
    """W4: W2 through vision, llm and gateway as three processes on the same GPU(s)."""
    from gateway import pipeline
    from gateway.tiers import start_tiers

    with report.stage("prism.W4"):
        vision_args = ["--device", args.device, "--vision-max-batch-size", str(counts.vision_batch)]
        llm_args = ["--device", args.device, "--tp", str(args.tp), "--session-len", str(SESSION_LEN),
                    "--max-batch-size", str(counts.requests), "--cache-max-entry-count", "0.8",
                    "--enable-prefix-caching", "--quant-policy", str(args.quant_policy)]
        log_dir = args.out / "tiers"  # the tiers' logs come back with the results
        log_dir.mkdir(parents=True, exist_ok=True)
        free = torch.cuda.mem_get_info()[0] / 1e9 if args.device.startswith("cuda") else None  # leak check
        t0 = time.perf_counter()
        with start_tiers(str(path), vision_args=vision_args, llm_args=llm_args, log_dir=log_dir) as tiers:
            started = time.perf_counter() - t0
            pipe = pipeline(f"grpc://{tiers.gateway}")
            try:
                result = w2_throughput(pipe, inputs, counts, remote_vision_reader(tiers.tiers["vision"].target),
                                       remote_llm_reader(tiers.tiers["llm"].target))
            finally:
                pipe.close()
        embedded = report.get("prism.W2.output_tok_s")
        result.update(start_s=started, gpu_free_GB_before=free,
                      ratio=result["output_tok_s"] / embedded if embedded else math.nan)
        report.put("prism.W4", result)


# ---------------------------------------------------------------- transformers

class Clock:
    """A generate() streamer that timestamps every put: the prompt first, then one per step."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_inputs(processor, prompts: list[tuple], device: str, dtype: torch.dtype) -> dict:
    inputs = processor(text=[llava_prompt(text) for text, _ in prompts], images=[image for _, image in prompts],
                       return_tensors="pt", padding=True)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def hf_generate(model, inputs: dict, new_tokens: int, device: str, **kwargs) -> dict:
    """Time one greedy generate of exactly new_tokens per row: TTFT, decode rate, output rate."""
    clock = Clock()
    sync(device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=PAD_TOKEN_ID, streamer=clock, **kwargs)
    sync(device)
    wall = time.perf_counter() - start
    steps = clock.times[1:]  # [0] is the prompt
    rows = inputs["input_ids"].shape[0]
    return {"ttft_ms": 1e3 * (steps[0] - start), "ttft_p50_s": steps[0] - start,  # one first token for all rows
            "decode_tok_s": (len(steps) - 1) / (steps[-1] - steps[0]),
            "output_tok_s": rows * len(steps) / wall, "requests_s": rows / wall, "wall_s": wall, "batch": rows}


def hf_logits(model, processor, prompt: tuple, prism: dict, device: str) -> dict:
    """transformers' logits on Prism's own greedy sequence (teacher-forced, one forward), in the
    model's dtype and in fp32; the fp32 pass sets the tolerance: Prism's bf16 error against fp32
    may be at most twice transformers' own bf16 error against fp32."""
    dtype = next(model.parameters()).dtype
    inputs = hf_inputs(processor, [prompt], device, torch.float32)
    n, steps = inputs["input_ids"].shape[1], len(prism["token_ids"])
    ids = torch.cat([inputs["input_ids"], torch.tensor([prism["token_ids"][:-1]], device=device)], dim=1)

    def forward(d: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=inputs["pixel_values"].to(d))
        return out.logits[0, n - 1: n - 1 + steps].float().cpu()

    ref = forward(dtype)
    model.float()
    exact = forward(torch.float32)
    model.to(dtype)  # bf16 -> fp32 -> bf16 is lossless
    ours = prism["logits"]
    tokens = torch.tensor(prism["token_ids"])
    floor = (ref - exact).abs().max().item()
    tol = max(2 * floor, 1e-3)
    err = (ours - exact).abs().max().item()
    return {"input_len_equal": n == prism["input_token_len"], "steps": steps,
            "max_abs_diff_vs_hf": (ours - ref).abs().max().item(),
            "mean_abs_diff_vs_hf": (ours - ref).abs().mean().item(),
            "max_abs_err_vs_fp32": err, "hf_max_abs_err_vs_fp32": floor, "tolerance": tol,
            "top1_agree_hf": int((ref.argmax(-1) == tokens).sum()),
            "top1_agree_fp32": int((exact.argmax(-1) == tokens).sum()),
            "logit_std": exact.std().item(), "ok": bool(err <= tol and n == prism["input_token_len"])}


def hf_vision(model, processor, prompts: list[tuple], device: str, dtype: torch.dtype) -> dict:
    """transformers' own vision tower + projector at the vision batch size, for images/s."""
    pixels = processor.image_processor(images=[image for _, image in prompts], return_tensors="pt")["pixel_values"]
    pixels = pixels.to(device, dtype)
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)
        sync(device)
        iters, t0 = 3, time.perf_counter()
        for _ in range(iters):
            model.get_image_features(pixel_values=pixels)
        sync(device)
    return {"batch": len(prompts), "images_s": iters * len(prompts) / (time.perf_counter() - t0)}


def run_hf(report: Report, path: Path, args, counts: Counts, inputs: Inputs, check: dict | None, dtype,
           ceiling: float) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = args.device
    model = None
    with report.stage("hf.load"):
        t0 = time.perf_counter()
        processor = AutoProcessor.from_pretrained(path, backend="pil")  # Prism preprocesses like the PIL backend
        processor.tokenizer.padding_side = "left"
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        report.put("hf.load", {"seconds": time.perf_counter() - t0})
    if model is None:
        return
    try:
        if check is not None:
            with report.stage("correctness.bf16"):
                report.put("correctness.bf16", hf_logits(model, processor, inputs.check, check, device))
        w1 = hf_inputs(processor, inputs.w1[:1], device, dtype)
        w2 = hf_inputs(processor, inputs.w2[:counts.hf_batch], device, dtype)
        if "eager" in args.hf_modes:
            with report.stage("hf.eager.W1"):
                hf_generate(model, w1, 8, device)  # warm-up
                result = hf_generate(model, w1, counts.new_tokens, device)
                report.put("hf.eager.W1", {**result, "ceiling_frac": result["decode_tok_s"] / ceiling})
            with report.stage("hf.eager.W2"):
                report.put("hf.eager.W2", hf_generate(model, w2, counts.new_tokens, device))
            with report.stage("hf.eager.vision"):
                report.put("hf.eager.vision", hf_vision(model, processor, inputs.w2[:counts.vision_batch], device, dtype))
        if "compile" in args.hf_modes:
            # Static cache makes generate compile the decode step (mode reduce-overhead: CUDA graphs).
            # The warm-up call compiles and records; same lengths after it, so no recompile.
            for name, batch in (("W1", w1), ("W2", w2)):
                with report.stage(f"hf.compile.{name}"):
                    t0 = time.perf_counter()
                    hf_generate(model, batch, counts.new_tokens, device, cache_implementation="static")
                    result = hf_generate(model, batch, counts.new_tokens, device, cache_implementation="static")
                    result["warmup_s"] = time.perf_counter() - t0 - result["wall_s"]
                    if name == "W1":
                        result["ceiling_frac"] = result["decode_tok_s"] / ceiling
                    report.put(f"hf.compile.{name}", result)
    finally:
        del model
        torch._dynamo.reset()
        release_memory(device)


# ---------------------------------------------------------------- tiny fp32 check

def tiny_check(report: Report, args) -> None:
    """Greedy tokens through Prism on the device equal transformers' fp32 generate on CPU."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from gateway import GenerationConfig, TurbomindEngineConfig, VisionConfig, pipeline
    from gateway.tiny_checkpoints import build_tiny_llava

    path = build_tiny_llava(args.ckpt_root / "tiny-llava-1.5-hf")
    texts = ["describe this image", "What is the tiger doing?", "Is it a dog?", "Name the colors."]
    prompts = [(text, make_image(100 + i, (32 + 8 * i, 40 - 2 * i))) for i, text in enumerate(texts)]
    backend = TurbomindEngineConfig(dtype="float32", device=args.device, session_len=512, max_batch_size=8,
                                    cache_max_entry_count=0.05)
    pipe = pipeline(str(path), backend_config=backend,
                    vision_config=VisionConfig(max_batch_size=4, dtype="float32", device=args.device))
    try:
        responses = pipe(prompts, gen_config=GenerationConfig(max_new_tokens=16))
    finally:
        pipe.close()
        del pipe
        release_memory(args.device)
    processor = AutoProcessor.from_pretrained(path, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    equal, margins = 0, []
    for (text, image), r in zip(prompts, responses):
        inputs = processor(text=llava_prompt(text), images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        expected = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        if r.finish_reason == "stop" and expected[:-1] == list(r.token_ids):
            expected = expected[:-1]  # Prism does not return the stop token
        equal += expected == list(r.token_ids)
        top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
    report.put("correctness.tiny_fp32", {"requests": len(prompts), "equal": equal, "min_margin": min(margins),
                                         "ok": equal == len(prompts)})


# ---------------------------------------------------------------- the table

def _num(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _node(data: dict, path: str) -> dict:
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def _cell(data: dict, path: str, key: str, spec: str) -> str:
    node = _node(data, path)
    return node["error"][:100] if "error" in node else _num(node.get(key), spec) if node else "–"


def _target(text: str, value, goal) -> str:
    """The target, marked met or missed once there is a value."""
    if value is None or goal is None or (isinstance(value, float) and math.isnan(value)):
        return text
    return text + (" ✓" if value >= goal else " ✗")


def render(data: dict) -> str:
    """One markdown table: rows are metrics; columns transformers' two paths and Prism."""
    env, prism, args = data.get("env", {}), data.get("prism", {}), data.get("args", {})
    kv = {0: str(args.get("dtype", "?")).removeprefix("torch."), 8: "int8 (quant_policy=8)"}.get(
        args.get("quant_policy"), "?")
    w1, w2, w3, w4 = (_node(prism, w) for w in ("W1", "W2", "W3", "W4"))
    hf_bs = _node(data, "hf.eager.W2").get("batch") or _node(data, "hf.compile.W2").get("batch")
    w3_goal, w4_goal = TARGETS["w3_ratio"], TARGETS["w4_ratio"]
    lines = [f"device: {env.get('device', '?')} · torch {env.get('torch', '?')} · transformers "
             f"{env.get('transformers', '?')} · commit {env.get('commit', '?')} · tp {args.get('tp', '?')} · KV cache {kv}"
             f" · copy {_num(data.get('copy_bw_GBps'), '.0f')} GB/s · LLM weights {_num(data.get('llm_weight_GB'), '.2f')} GB",
             "", "| metric | transformers eager | transformers static+compile | Prism | target |",
             "| --- | --- | --- | --- | --- |"]

    def row(label: str, workload: str, key: str, spec: str, target: str = "") -> None:
        cells = [_cell(data, f"{side}.{workload}", key, spec) for side in ("hf.eager", "hf.compile", "prism")]
        lines.append(f"| {label} | {' | '.join(cells)} | {target} |")

    row("W1 TTFT (ms)", "W1", "ttft_ms", ".0f")
    row("W1 decode tok/s", "W1", "decode_tok_s", ".1f",
        _target(f"≥ {TARGETS['w1_decode']:.0f}", w1.get("decode_tok_s"), TARGETS["w1_decode"]))
    row(f"W1 % of bandwidth ceiling ({_num(data.get('ceiling_tok_s'), '.0f')} tok/s)", "W1", "ceiling_frac", ".1%",
        _target(f"≥ {TARGETS['w1_ceiling']:.0%}", w1.get("ceiling_frac"), TARGETS["w1_ceiling"]))
    row(f"W2 output tok/s (transformers: bs {hf_bs or '?'})", "W2", "output_tok_s", ".0f",
        _target(f"≥ {TARGETS['w2_tok_s']:.0f}", w2.get("output_tok_s"), TARGETS["w2_tok_s"]))
    row("W2 requests/s", "W2", "requests_s", ".2f")
    row("W2 TTFT p50 (s)", "W2", "ttft_p50_s", ".2f")
    vision, hf_vision = w2.get("vision") or {}, _node(data, "hf.eager.vision")
    prism_vision = (f"{_num(vision.get('images_s'), '.0f')} (mean batch {_num(vision.get('mean_batch'), '.1f')})"
                    if vision else w2.get("error", "–")[:100])
    lines.append(f"| W2 vision images/s, timed from the workload's start | | | {prism_vision} | |")
    alone = _node(data, "prism.vision")
    alone_cell = alone.get("error") or (f"{_num(alone.get('images_s'), '.0f')} (mean batch "
                                        f"{_num(alone.get('mean_batch'), '.1f')})" if alone else "–")
    lines.append(f"| vision images/s alone: Prism's tier from image bytes, {_num(alone.get('images'), '.0f')} at once"
                 f" (transformers: tower on ready pixels, bs {hf_vision.get('batch', '?')}) | "
                 f"{_cell(data, 'hf.eager.vision', 'images_s', '.0f')} | | {alone_cell} | "
                 f"{_target('≥ transformers tower', alone.get('images_s'), hf_vision.get('images_s'))} |")
    tower = alone.get("tower") or {}
    lines.append(f"| vision tower + projector on ready pixels, images/s (bs {hf_vision.get('batch', '?')} / "
                 f"{tower.get('batch', '?')}) | {_cell(data, 'hf.eager.vision', 'images_s', '.0f')} | | "
                 f"{_num(tower.get('images_s'), '.0f')} | "
                 f"{_target('≥ transformers tower', tower.get('images_s'), hf_vision.get('images_s'))} |")
    w3_cell = w3.get("error") or (f"{_num(w3.get('ttft1_ms'), '.0f')} → {_num(w3.get('ttft2_ms'), '.0f')} "
                                  f"({_num(w3.get('ratio'), '.1f')}× lower)" if w3 else "–")
    lines.append(f"| W3 TTFT turn 1 → turn 2 (ms) | | | {w3_cell} | "
                 f"{_target(f'≥ {w3_goal:.0f}× lower', w3.get('ratio'), w3_goal)} |")
    w4_cell = w4.get("error") or (f"{_num(w4.get('output_tok_s'), '.0f')} tok/s, {_num(w4.get('ratio'), '.0%')} of "
                                  f"embedded (vision {_num((w4.get('vision') or {}).get('images_s'), '.0f')} images/s)"
                                  if w4 else "–")
    lines.append(f"| W4 split output tok/s | | | {w4_cell} | "
                 f"{_target(f'≥ {w4_goal:.0%} of embedded', w4.get('ratio'), w4_goal)} |")
    tiny = _node(data, "correctness.tiny_fp32")
    tiny_cell = tiny.get("error") or (f"{tiny['equal']}/{tiny['requests']} requests token-equal "
                                      f"(min top-1/top-2 margin {tiny['min_margin']:.3f})" if tiny else "–")
    lines.append(f"| tiny fp32 greedy = transformers (on the device) | | | {tiny_cell} | all equal{_ok(tiny)} |")
    bf16 = _node(data, "correctness.bf16") or _node(data, "correctness.bf16_prism")
    bf16_cell = bf16.get("error") or (
        f"max abs diff {bf16['max_abs_diff_vs_hf']:.3f} (mean {bf16['mean_abs_diff_vs_hf']:.4f}, logit std "
        f"{bf16['logit_std']:.2f}), top-1 {bf16['top1_agree_hf']}/{bf16['steps']}; max err vs fp32 "
        f"{bf16['max_abs_err_vs_fp32']:.3f}, input ids {'equal' if bf16['input_len_equal'] else 'DIFFER'}"
        if "steps" in bf16 else "–")
    tol = f"err vs fp32 ≤ {bf16['tolerance']:.3f} (2× transformers' own)" if "tolerance" in bf16 else ""
    lines.append(f"| bf16 logits vs transformers (first {bf16.get('steps', '?')} steps) | | | {bf16_cell} | "
                 f"{tol}{_ok(bf16)} |")
    lines += ["", f"transformers W2 is one batch of {hf_bs or '?'} of the W2 requests; Prism's W2/W4 are all "
              f"{w2.get('tokens', '?')} output tokens of the whole workload, submitted at once.",
              "stage seconds: " + ", ".join(f"{k} {v}" for k, v in data.get("stage_seconds", {}).items())]
    lines += [f"- {stage} {error}" for stage, error in data.get("errors", {}).items()]
    return "\n".join(lines) + "\n"


def _ok(result: dict) -> str:
    return "" if "ok" not in result else (" ✓" if result["ok"] else " ✗")


# ---------------------------------------------------------------- main

def environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"}
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="Prism's tensor parallel size")
    parser.add_argument("--quant-policy", type=int, default=0, choices=[0, 8],
                        help="Prism's KV cache in W1-W4: 0 the model's dtype, 8 int8 (the tiny check keeps 0)")
    parser.add_argument("--workloads", default="W1,W2,W3,W4", help="Prism workloads to run (comma list; '' for none)")
    parser.add_argument("--skip-hf", action="store_true", help="skip transformers (and the bf16 logits check)")
    parser.add_argument("--hf-modes", default="eager,compile", help="transformers paths to time")
    parser.add_argument("--skip-tiny-check", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also profile one W1 request, W2 again and W3's turn 2 (kernels by device time, host ops by host time)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and small counts (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--ckpt-root", type=Path, default=Path(os.environ.get("PRISM_BENCH_CKPT", "/tmp/prism-bench")),
                        help="where checkpoints are built (and reused when already there)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/prism-bench/out"))
    args = parser.parse_args(argv)
    args.workloads = {w.strip().upper() for w in args.workloads.split(",") if w.strip()}
    args.hf_modes = {m.strip() for m in args.hf_modes.split(",") if m.strip()}
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape, counts = (TINY, SMOKE) if args.tiny else (LLAVA_7B, Counts())
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    report = Report(args.out)
    report.put("env", environment(args.device))
    report.put("args", {"tp": args.tp, "quant_policy": args.quant_policy, "workloads": sorted(args.workloads),
                        "tiny": args.tiny, "dtype": str(dtype),
                        "counts": asdict(counts), "device": args.device})
    weight_bytes = shape.llm_params * torch.tensor([], dtype=dtype).element_size()
    report.put("llm_weight_GB", weight_bytes / 1e9)
    bandwidth = copy_bandwidth(args.device)
    ceiling = args.tp * bandwidth / weight_bytes
    report.put("copy_bw_GBps", bandwidth / 1e9)
    report.put("ceiling_tok_s", ceiling)
    if not args.skip_tiny_check:
        with report.stage("correctness.tiny_fp32"):
            tiny_check(report, args)
    name = "llava-1.5-tiny-hf-random" if args.tiny else "llava-1.5-7b-hf-random"  # 'llava-1.5' selects llava-v1
    path = args.ckpt_root / name
    with report.stage("build"):
        t0 = time.perf_counter()
        build_checkpoint(path, shape, dtype, args.device)
        report.put("build", {"seconds": time.perf_counter() - t0, "path": str(path)})
    if report.get("build.error"):
        return report.data
    inputs = make_inputs(path, shape, counts)
    check = None
    if args.workloads & {"W1", "W2", "W3"}:
        check = run_prism(report, path, args, counts, inputs, ceiling)
    if "W4" in args.workloads:
        run_split(report, path, args, counts, inputs)
    if not args.skip_hf:
        run_hf(report, path, args, counts, inputs, check, dtype, bandwidth / weight_bytes)  # one GPU
    report.save()
    print(render(report.data), flush=True)
    print(f"[bench] results: {args.out / 'results.json'}, {args.out / 'results.md'}", flush=True)
    return report.data


if __name__ == "__main__":
    main()
