"""AsyncLLMEngine against transformers on the tiny LLaVA checkpoint: greedy tokens equal
HF generate (text-only and with image embeddings from HF's own tower + projector),
logits within 1e-4, continuous batching, prefix caching, chunked prefill, preemption,
cancellation, bad requests and sampling semantics."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import threading
from dataclasses import dataclass, field

import pytest
import torch

from llm_service.config import EngineConfig
from llm_service.engine import AsyncLLMEngine
from protos import common_pb2, llm_pb2
from tests.conftest import make_image
from tests.hf_reference import _load
from vision_service.types import ImageEmbedding

MARGIN = 1e-3  # smallest top-1/top-2 logit gap a reference may have (ours agree within 1e-4)
IMAGE_TOKEN, ROWS = 3, 16


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    make_image(seed).save(buf, format="PNG")
    return buf.getvalue()


def text_seg(ids: list[int]) -> llm_pb2.Segment:
    return llm_pb2.Segment(text=llm_pb2.TextSegment(token_ids=ids))


def image_seg(data: bytes, sha256: str | None = None) -> llm_pb2.Segment:
    sha = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
    return llm_pb2.Segment(image=llm_pb2.ImageSegment(image=common_pb2.ImageInput(data=data, sha256=sha)))


def request(segments, **sampling) -> llm_pb2.GenerateRequest:
    sampling.setdefault("top_p", 1.0)
    sampling.setdefault("max_new_tokens", 8)
    return llm_pb2.GenerateRequest(segments=segments, sampling=llm_pb2.SamplingParams(**sampling))


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish: str = ""
    usage: llm_pb2.Usage | None = None
    chunks: int = 0


def tensor(t: common_pb2.Tensor) -> torch.Tensor:
    assert t.dtype == "float32"
    return torch.frombuffer(bytearray(t.data), dtype=torch.float32).view(*t.shape)


async def collect(source, req) -> Result:
    out = Result()
    async for chunk in source.generate(req):
        assert not out.finish, "nothing may follow the last chunk"
        out.chunks += 1
        out.tokens += chunk.token_ids
        if chunk.HasField("logits"):
            out.logits.append(tensor(chunk.logits))
        if chunk.finish_reason:
            out.finish, out.usage = chunk.finish_reason, chunk.usage
    assert out.finish
    return out


def run(coro):
    return asyncio.run(coro)


class FakeVision:
    """Embeddings looked up by image bytes (what HF's own tower + projector computed)."""

    def __init__(self):
        self.table: dict[bytes, torch.Tensor] = {}
        self.calls: list[list[str]] = []

    async def encode(self, images):
        self.calls.append([im.sha256 for im in images])
        for im in images:
            if im.data not in self.table:
                raise ValueError("cannot identify image file")
        return [ImageEmbedding(self.table[im.data].clone()) for im in images]


@dataclass
class Prompt:
    segments: list[llm_pb2.Segment]
    ids: list[int]  # as HF sees them: image positions hold the image token
    images: list[bytes]


def build_prompt(path, parts) -> Prompt:
    """parts: str (tokenized) or int (an image seed); BOS first, as the gateway sends it."""
    tok = _load(str(path))[0].tokenizer
    ids, segments, pending, images = [1], [], [1], []
    for part in parts:
        if isinstance(part, str):
            t = tok(part, add_special_tokens=False).input_ids
            ids += t
            pending += t
        else:
            if pending:
                segments.append(text_seg(pending))
            pending = []
            images.append(png(part))
            segments.append(image_seg(images[-1]))
            ids += [IMAGE_TOKEN] * ROWS
    if pending:
        segments.append(text_seg(pending))
    return Prompt(segments, ids, images)


@dataclass
class Reference:
    tokens: list[int]
    logits: torch.Tensor
    margin: float
    features: torch.Tensor | None  # [n_images, rows, hidden] from HF's projector


def hf_greedy(path, prompt: Prompt, max_new_tokens: int = 8, **kwargs) -> Reference:
    from PIL import Image

    processor, model = _load(str(path))
    if prompt.images:
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in prompt.images]
        kwargs["pixel_values"] = processor.image_processor(pil, return_tensors="pt")["pixel_values"]
    feats = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: feats.append(o.detach().clone()))
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt.ids]), attention_mask=torch.ones(1, len(prompt.ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=2, **kwargs)
    finally:
        hook.remove()
    logits = torch.stack([step[0] for step in out.logits])
    top2 = logits.topk(2, dim=-1).values
    return Reference(out.sequences[0, len(prompt.ids):].tolist(), logits,
                     float((top2[:, 0] - top2[:, 1]).min()), feats[0] if feats else None)


PARTS = {
    "chat": ["USER: describe this image ASSISTANT:"],
    "fox": ["The quick brown fox jumps over the lazy dog."],
    "one image": [1, "\ndescribe this image"],
    "two images": ["What is the woman doing?", 2, " and ", 3, " Please answer in one sentence."],
}


@pytest.fixture(scope="module")
def vision():
    return FakeVision()


@pytest.fixture(scope="module")
def prompts(tiny_llava, vision) -> dict[str, tuple[Prompt, Reference]]:
    out = {}
    for name, parts in PARTS.items():
        prompt = build_prompt(tiny_llava, parts)
        ref = hf_greedy(tiny_llava, prompt)
        assert ref.margin > MARGIN, f"{name}: reference has a near-tie"
        for data, feat in zip(prompt.images, ref.features if ref.features is not None else []):
            vision.table[data] = feat
        out[name] = (prompt, ref)
    return out


def _engine(path, vision=None, **config):
    config.setdefault("session_len", 128)
    config.setdefault("max_batch_size", 8)
    return AsyncLLMEngine(str(path), EngineConfig(device="cpu", **config), vision)


@pytest.fixture(scope="module")
def engine(tiny_llava, vision):
    """session_len 512: a request generating to the end takes long enough to be cancelled mid-way."""
    eng = _engine(tiny_llava, vision, block_size=16, session_len=512)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def pc_engine(tiny_llava, vision):
    """Prefix caching on, small blocks, prefill budget of 20 tokens (so prompts chunk)."""
    eng = _engine(tiny_llava, vision, block_size=8, enable_prefix_caching=True, max_prefill_token_num=20)
    yield eng
    eng.close()


def assert_matches(result: Result, prompt: Prompt, ref: Reference) -> None:
    assert result.tokens == ref.tokens
    assert result.usage.input_tokens == len(prompt.ids)
    assert result.usage.output_tokens == len(ref.tokens)
    assert result.finish == ("stop" if ref.tokens[-1] == 2 else "length")
    if result.logits:
        torch.testing.assert_close(torch.cat(result.logits), ref.logits, atol=1e-4, rtol=0)


def assert_all_free(engine) -> llm_pb2.LLMInfo:
    info = run(engine.info())
    assert info.free_blocks == info.total_blocks and info.running == 0 and info.waiting == 0
    return info


def test_greedy_equals_hf_text_and_images(engine, prompts):
    for name, (prompt, ref) in prompts.items():
        result = run(collect(engine, request(prompt.segments, output_logits="generation")))
        assert sum(len(x) for x in result.logits) == len(ref.tokens)  # one row per token
        assert_matches(result, prompt, ref)
    assert_all_free(engine)


def test_concurrent_requests_equal_each_alone(engine, prompts):
    async def all_at_once():
        return await asyncio.gather(*(collect(engine, request(p.segments, output_logits="generation"))
                                      for p, _ in prompts.values()))

    for result, (prompt, ref) in zip(run(all_at_once()), prompts.values()):
        assert_matches(result, prompt, ref)
    assert_all_free(engine)


def test_callers_on_their_own_threads_and_loops(engine, prompts):
    results = {}

    def worker(name):
        results[name] = run(collect(engine, request(prompts[name][0].segments)))

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("fox", "one image")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, result in results.items():
        assert result.tokens == prompts[name][1].tokens


def test_prefix_cache_hit_gives_identical_tokens(pc_engine, prompts, vision):
    prompt, ref = prompts["two images"]
    first = run(collect(pc_engine, request(prompt.segments)))
    second = run(collect(pc_engine, request(prompt.segments)))
    assert first.tokens == second.tokens == ref.tokens  # also: 50+ tokens prefilled in chunks of 20
    assert second.usage.cached_tokens == (len(prompt.ids) - 1) // 8 * 8 > first.usage.cached_tokens
    # same text, a different second image: only blocks before that image are reused
    vision.table[png(40)] = torch.randn(ROWS, 64)
    segments = list(prompt.segments)
    segments[3] = image_seg(png(40))
    other = run(collect(pc_engine, request(segments)))
    second_image_at = prompt.ids.index(IMAGE_TOKEN, prompt.ids.index(IMAGE_TOKEN) + ROWS)
    assert other.usage.cached_tokens == second_image_at // 8 * 8
    assert_all_free(pc_engine)


def test_chunked_prefill_in_a_busy_batch(pc_engine, prompts):
    async def all_at_once():
        return await asyncio.gather(*(collect(pc_engine, request(p.segments)) for p, _ in prompts.values()))

    for result, (prompt, ref) in zip(run(all_at_once()), prompts.values()):
        assert_matches(result, prompt, ref)
    assert_all_free(pc_engine)


def test_preemption_by_recompute_when_blocks_run_out(tiny_llava, prompts):
    """A cache of 12 blocks x 4 tokens cannot hold three ~20-token sequences at once."""
    eng = _engine(tiny_llava, None, session_len=64, block_size=4, cache_max_entry_count=12)
    try:
        names = ["chat", "fox", "chat"]
        async def all_at_once():
            return await asyncio.gather(*(collect(eng, request(prompts[n][0].segments)) for n in names))

        for result, name in zip(run(all_at_once()), names):
            assert_matches(result, *prompts[name])
        assert eng.engine.scheduler.num_preemptions > 0
        assert_all_free(eng)
        # no vision tier: images are refused; a prompt larger than the whole cache too
        with pytest.raises(ValueError, match="no vision"):
            run(collect(eng, request(prompts["one image"][0].segments)))
        with pytest.raises(ValueError, match="KV cache"):
            run(collect(eng, request([text_seg([5] * 48)])))

        async def close_with_a_request_in_flight():
            held, gate = threading.Event(), threading.Event()
            eng._submit(lambda: (held.set(), gate.wait()))  # hold the engine thread: the request stays queued
            await asyncio.to_thread(held.wait)
            stream = eng.generate(request(prompts["fox"][0].segments))
            first = asyncio.ensure_future(stream.__anext__())
            while eng._inbox.empty():  # the request has been handed to the engine thread
                await asyncio.sleep(0.01)
            closer = threading.Thread(target=eng.close)
            closer.start()
            while not eng._closed:
                await asyncio.sleep(0.01)
            gate.set()
            chunks = [await first] + [c async for c in stream]
            await asyncio.to_thread(closer.join)
            return chunks

        chunks = run(close_with_a_request_in_flight())
        assert [(c.finish_reason, list(c.token_ids)) for c in chunks] == [("abort", [])]
        assert eng.engine.blocks.num_free_blocks == eng.engine.blocks.num_blocks
        with pytest.raises(RuntimeError, match="closed"):
            run(collect(eng, request(prompts["fox"][0].segments)))
    finally:
        eng.close()


def test_running_ahead_never_takes_more_blocks_than_are_free(tiny_llava, prompts):
    """Two equal sequences cross a block boundary in the same step while one block is free:
    the step launched ahead would need two, so it is not launched and the scheduler preempts
    one sequence instead."""
    prompt, ref = prompts["chat"]
    blocks = 2 * -(-len(prompt.ids) // 4) + 1  # both prompts, and one block to grow into
    eng = _engine(tiny_llava, None, session_len=64, block_size=4, cache_max_entry_count=blocks)
    eng.engine.run_ahead = True
    try:
        async def two_at_once():
            return await asyncio.gather(*(collect(eng, request(prompt.segments)) for _ in range(2)))

        for result in run(two_at_once()):
            assert_matches(result, prompt, ref)
        assert eng.engine.scheduler.num_preemptions > 0
        assert_all_free(eng)
    finally:
        eng.close()


def test_prefill_graph_layout_keeps_tokens_and_logits(tiny_llava, vision, prompts):
    """PrefillGraphs' static layout (decode slots, then prompt slots; rows past the step's in no
    sequence; image rows a step lacks into the spare row), run eagerly on the CPU: every prefill
    and mixed step of a chunked, batched workload through it keeps transformers' tokens and logits."""
    from llm_service.engine.cuda_graph import PrefillGraphs, prefill_graph_sizes

    eng = _engine(tiny_llava, vision, block_size=8, enable_prefix_caching=True, max_prefill_token_num=20)
    runner = eng.engine.runner
    max_blocks = -(-eng.engine.session_len // runner.block_size)
    cpu = torch.device("cpu")
    runner.prefill_graphs = [
        PrefillGraphs(runner.model, [16, 32, 64], 0, 1, max_blocks, cpu, images=False),
        PrefillGraphs(runner.model, prefill_graph_sizes(20 + 8 + 1), 8, 2, max_blocks, cpu, images=True),
    ]
    ran: list[tuple[int, int, int]] = []  # (graph's prompt slots, decodes, image rows) of each step
    for graphs in runner.prefill_graphs:
        def spy(ids, positions, meta, logits_rows, image_index=None, image_rows=None, graphs=graphs,
                run_graph=graphs.run):
            ran.append((graphs.max_prefills, meta.num_decodes, 0 if image_index is None else image_index.shape[0]))
            return run_graph(ids, positions, meta, logits_rows, image_index, image_rows)
        graphs.run = spy
    try:
        names = list(prompts) * 2

        async def all_at_once():
            return await asyncio.gather(*(collect(eng, request(prompts[n][0].segments, output_logits="generation"))
                                          for n in names))

        for result, name in zip(run(all_at_once()), names):
            assert_matches(result, *prompts[name])
        assert any(slots == 2 and decodes for slots, decodes, _ in ran)  # prompts beside decodes
        assert any(rows for _, _, rows in ran)
        for name in prompts:  # alone, after a prefix-cache hit: a few new tokens, the short graphs
            assert_matches(run(collect(eng, request(prompts[name][0].segments, output_logits="generation"))),
                           *prompts[name])
        assert any(slots == 1 for slots, _, _ in ran)
        assert_all_free(eng)
    finally:
        eng.close()


def test_cancel_mid_stream_frees_every_block(engine, prompts):
    prompt, ref = prompts["one image"]

    async def close_after_two_chunks():
        stream = engine.generate(request(prompt.segments, max_new_tokens=0, ignore_eos=True))
        got = [await stream.__anext__(), await stream.__anext__()]
        busy = await engine.info()
        await stream.aclose()
        return got, busy

    got, busy = run(close_after_two_chunks())
    assert busy.free_blocks < busy.total_blocks and busy.running == 1
    assert [t for c in got for t in c.token_ids] == ref.tokens[: sum(len(c.token_ids) for c in got)]
    assert_all_free(engine)

    async def cancel_task_while_another_runs():
        first = asyncio.Event()

        async def consume():
            async for _ in engine.generate(request(prompt.segments, max_new_tokens=0, ignore_eos=True)):
                first.set()

        task = asyncio.create_task(consume())
        other = asyncio.create_task(collect(engine, request(prompts["fox"][0].segments)))
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await other

    assert run(cancel_task_while_another_runs()).tokens == prompts["fox"][1].tokens
    assert_all_free(engine)


def test_decode_runs_a_step_ahead_of_the_host(tiny_llava, vision, prompts, monkeypatch):
    """Decodes launch the next step before the previous ids reach the host (ids taken on
    the device). Tokens stay HF's; a stop met meanwhile wastes that one row; block
    boundaries and prefix-cache commits of generated blocks stay right."""
    from llm_service.engine.llm_engine import LLMEngine

    ahead: list[bool] = []
    launch_ahead = LLMEngine._launch_ahead

    def spy(self, prev):
        launched = launch_ahead(self, prev)
        ahead.append(launched is not None)
        return launched

    monkeypatch.setattr(LLMEngine, "_launch_ahead", spy)
    eng = _engine(tiny_llava, vision, block_size=4, enable_prefix_caching=True)
    assert not eng.engine.run_ahead  # on CPU only on request: the forward itself is host time there
    eng.engine.run_ahead = True
    try:
        prompt, ref = prompts["one image"]
        result = run(collect(eng, request(prompt.segments, output_logits="generation")))
        assert_matches(result, prompt, ref)
        assert sum(ahead) >= len(ref.tokens) - 2
        i = next(i for i in range(1, len(ref.tokens) - 1) if ref.tokens[i] not in ref.tokens[:i])
        stopped = run(collect(eng, request(prompt.segments, stop_token_ids=[ref.tokens[i]])))
        assert stopped.tokens == ref.tokens[: i + 1] and stopped.finish == "stop"
        again = run(collect(eng, request(prompt.segments)))  # the cached generated blocks are right
        assert again.tokens == ref.tokens and again.usage.cached_tokens > 0
        before = len(ahead)
        run(collect(eng, request(prompt.segments, repetition_penalty=1.3)))
        assert len(ahead) == before  # a penalty reads the ids so far: no step runs ahead of them
        assert_all_free(eng)
    finally:
        eng.close()


def test_bad_requests_raise_value_error_before_any_token(engine, prompts):
    ok = prompts["chat"][0].segments
    cases = {
        "empty": request([]),
        "empty text": request([text_seg([])]),
        "session_len": request([text_seg([5] * 512)]),
        "top_p > 1": request(ok, top_p=1.5),
        "top_p = 0 sampling": request(ok, do_sample=True, top_p=0.0),
        "temperature < 0": request(ok, temperature=-0.5),
        "top_k < 0": request(ok, top_k=-1),
        "max_new_tokens < 0": request(ok, max_new_tokens=-1),
        "token id": request([text_seg([1, 10_000])]),
        "negative token id": request([text_seg([5, -1, 5])]),
        "stop id": request(ok, stop_token_ids=[-3]),
        "output_logits": request(ok, output_logits="all"),
        "undecodable image": request([text_seg([1]), image_seg(b"\x89PNG not really")]),
        "sha256 mismatch": request([text_seg([1]), image_seg(png(1), sha256="0" * 64)]),
        "unknown image by hash only": request([text_seg([1]), image_seg(b"", sha256="ab" * 32)]),
    }
    for name, req in cases.items():
        with pytest.raises(ValueError) as err:
            run(collect(engine, req))
        assert str(err.value), name
    assert_all_free(engine)


def test_embedding_cache_calls_vision_once_per_image(engine, vision, prompts):
    data = png(41)
    vision.table[data] = torch.randn(ROWS, 64)
    segments = [text_seg([1, 20]), image_seg(data), text_seg([21]), image_seg(data, sha256="")]
    before = len(vision.calls)
    first = run(collect(engine, request(segments)))
    assert vision.calls[before:] == [[hashlib.sha256(data).hexdigest()]]
    # a hit: no vision call, even when only the hash is sent
    by_hash = [segments[0], image_seg(b"", sha256=hashlib.sha256(data).hexdigest()), segments[2], segments[1]]
    again = run(collect(engine, request(by_hash)))
    assert len(vision.calls) == before + 1 and again.tokens == first.tokens
    assert first.usage.input_tokens == 3 + 2 * ROWS


def test_sampling_seed_top_k_and_length_limits(engine, prompts):
    prompt, ref = prompts["one image"]
    sampled = dict(do_sample=True, temperature=1.0, max_new_tokens=12, ignore_eos=True)
    a = run(collect(engine, request(prompt.segments, random_seed=1234, **sampled)))
    b = run(collect(engine, request(prompt.segments, random_seed=1234, **sampled)))
    others = {tuple(run(collect(engine, request(prompt.segments, random_seed=s, **sampled))).tokens) for s in (1, 2, 3)}
    assert a.tokens == b.tokens and len(a.tokens) == 12
    assert len(others | {tuple(a.tokens)}) > 1
    top1 = run(collect(engine, request(prompt.segments, do_sample=True, top_k=1, temperature=0.7)))
    assert top1.tokens == ref.tokens
    short = run(collect(engine, request(prompt.segments, max_new_tokens=3)))
    assert short.tokens == ref.tokens[:3] and short.finish == "length"
    whole = run(collect(engine, request(prompt.segments, max_new_tokens=0, ignore_eos=True)))
    assert len(prompt.ids) + len(whole.tokens) == 512 and whole.finish == "length"
    assert whole.tokens[:8] == ref.tokens


def test_stop_ids_and_min_new_tokens(engine, prompts):
    prompt, ref = prompts["fox"]
    i = next(i for i in range(1, len(ref.tokens)) if ref.tokens[i] not in ref.tokens[:i])
    stop = ref.tokens[i]
    stopped = run(collect(engine, request(prompt.segments, stop_token_ids=[stop])))
    assert stopped.tokens == ref.tokens[: i + 1] and stopped.finish == "stop"
    held = run(collect(engine, request(prompt.segments, stop_token_ids=[stop], min_new_tokens=i + 2)))
    assert held.tokens[:i] == ref.tokens[:i] and stop not in held.tokens[: i + 2]


def test_bad_ids_and_repetition_penalty_equal_hf(engine, prompts, tiny_llava):
    prompt, ref = prompts["one image"]
    banned = run(collect(engine, request(prompt.segments, bad_token_ids=[ref.tokens[0]])))
    hf_banned = hf_greedy(tiny_llava, prompt, bad_words_ids=[[ref.tokens[0]]])
    assert banned.tokens == hf_banned.tokens and ref.tokens[0] not in banned.tokens
    for name, penalty in (("chat", 1.3), ("one image", 0.7)):  # < 1 favours repeats, image ids included
        prompt, ref = prompts[name]
        ours = run(collect(engine, request(prompt.segments, repetition_penalty=penalty, max_new_tokens=12)))
        theirs = hf_greedy(tiny_llava, prompt, max_new_tokens=12, repetition_penalty=penalty)
        assert theirs.margin > MARGIN
        assert ours.tokens == theirs.tokens and ours.tokens[:8] != ref.tokens


def test_eos_from_generation_config_and_ignore_eos(tiny_llava, prompts, tmp_path):
    prompt, ref = prompts["chat"]
    i = next(i for i in range(1, len(ref.tokens)) if ref.tokens[i] not in ref.tokens[:i])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = [ref.tokens[i], 2]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    eng = _engine(ckpt)
    try:
        assert sorted(run(eng.info()).eos_token_ids) == sorted({2, ref.tokens[i]})
        stopped = run(collect(eng, request(prompt.segments)))
        assert stopped.tokens == ref.tokens[: i + 1] and stopped.finish == "stop"
        ignored = run(collect(eng, request(prompt.segments, ignore_eos=True)))
        assert ignored.tokens == ref.tokens and ignored.finish == "length"
    finally:
        eng.close()


def test_with_the_real_vision_engine(tiny_llava, prompts):
    from vision_service.config import VisionConfig
    from vision_service.engine import VisionEngine

    vision = VisionEngine(str(tiny_llava), VisionConfig(device="cpu"))
    eng = _engine(tiny_llava, vision)
    try:
        for name in ("one image", "two images"):
            prompt, ref = prompts[name]
            result = run(collect(eng, request(prompt.segments, output_logits="generation")))
            assert_matches(result, prompt, ref)
    finally:
        eng.close()
        vision.close()


def _relayout(src, dst, rename, config=None) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {rename(k): v for k, v in tensors.items() if rename(k)}
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))


def test_loader_reads_hub_v5_and_plain_llama_layouts(tiny_llava, tmp_path):
    from llm_service.models.loader import load_model, read_spec

    def v5(key):  # transformers v5 names: model.language_model.*, lm_head.*, model.vision_tower.*
        if key.startswith("language_model.model."):
            return "model.language_model." + key.removeprefix("language_model.model.")
        if key.startswith("language_model.lm_head."):
            return key.removeprefix("language_model.")
        return "model." + key

    def plain(key):  # a text-only Llama: model.*, lm_head.*; no vision weights
        return key.removeprefix("language_model.") if key.startswith("language_model.") else None

    text_config = json.loads((tiny_llava / "config.json").read_text())["text_config"]
    _relayout(tiny_llava, tmp_path / "v5", v5)
    _relayout(tiny_llava, tmp_path / "llama", plain, dict(text_config, architectures=["LlamaForCausalLM"]))
    _relayout(tiny_llava, tmp_path / "broken", lambda k: None if "layers.1.self_attn.k_proj" in k else k)
    cpu = torch.device("cpu")
    hub = load_model(read_spec(tiny_llava), torch.float32, cpu, 64).state_dict()
    for name in ("v5", "llama"):
        spec = read_spec(tmp_path / name)
        other = load_model(spec, torch.float32, cpu, 64).state_dict()
        assert hub.keys() == other.keys() and all(torch.equal(hub[k], other[k]) for k in hub), name
    plain_spec = read_spec(tmp_path / "llama")
    assert plain_spec.architecture == "LlamaForCausalLM" and plain_spec.image_token_id is None
    assert read_spec(tiny_llava).image_token_id == IMAGE_TOKEN
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight:k"):
        load_model(read_spec(tmp_path / "broken"), torch.float32, cpu, 64)
