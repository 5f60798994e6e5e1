"""The vision engine on CUDA equals the CPU engine (run on a GPU machine: pytest tests/gpu)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from tests.test_vision_service import CPU, image_input, noise, png
from vision_service.config import VisionConfig
from vision_service.engine import VisionEngine
from vision_service.models.base import lookup_pixels
from PIL import Image


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_cpu_engine(tiny_llava, monkeypatch):
    """On CUDA images are prepared as uint8 in pageable memory (a burst must not pin a block
    per image), staged per batch through reused pinned buffers, looked up on the device (exactly
    the CPU pixel values) and copied out on a side stream; embeddings equal the CPU engine's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    inputs = [image_input(png(Image.fromarray(noise(90 + i, 40 + i, 37)))) for i in range(6)]

    async def run(device):
        engine = VisionEngine(str(tiny_llava), VisionConfig(max_batch_size=4, device=device, dtype="float32"))
        try:
            prepared = engine._prepare(0, inputs[0])
            pixels = (lookup_pixels(prepared.pixel_values.to(engine.device), engine.model.device_table).cpu()
                      if engine.model.lookup_on_device else prepared.pixel_values)
            return pixels, prepared.pixel_values, await asyncio.gather(*(engine.encode([i]) for i in inputs))
        finally:
            engine.close()

    cpu_pixels, _, on_cpu = asyncio.run(run("cpu"))
    cuda_pixels, staged, on_cuda = asyncio.run(run("cuda"))
    assert staged.dtype == torch.uint8 and not staged.is_pinned()
    assert torch.equal(cuda_pixels, cpu_pixels)
    for (a,), (b,) in zip(on_cuda, on_cpu):
        assert a.embedding.device == CPU and a.embedding.dtype == torch.float32
        torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=1e-4)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_replay_graphs(tiny_llava, monkeypatch):
    """Batches up to the engine's max_batch_size (24) replay a graph captured for the smallest
    size that holds them (1, 2, 4, 8, 16, 24; padded with the previous batch's rows) and give the
    eager module's embeddings; larger batches, and PRISM_EAGER=1, run eagerly."""
    from vision_service.graphs import GraphedForward

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    engine = VisionEngine(str(tiny_llava), VisionConfig(max_batch_size=24, device="cuda", dtype="float32"))
    try:
        model = engine.model
        assert isinstance(model.forward, GraphedForward) and sorted(model.forward.graphs) == [1, 2, 4, 8, 16, 24]
        generator = torch.Generator("cuda").manual_seed(0)
        for n in (1, 3, 8, 11, 2, 20, 24, 30):
            pixels = torch.randn(n, 3, model.image_size, model.image_size, device="cuda", generator=generator)
            torch.testing.assert_close(model.forward(pixels), model.module(pixels), rtol=1e-4, atol=1e-4)
    finally:
        engine.close()
    monkeypatch.setenv("PRISM_EAGER", "1")
    engine = VisionEngine(str(tiny_llava), VisionConfig(device="cuda", dtype="float32"))
    try:
        assert engine.model.forward is engine.model.module
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forwards_do_not_wait_behind_the_default_stream(tiny_llava):
    """An LLM engine in the same process queues its steps on the default stream: the vision
    engine's forwards run on a high-priority stream of their own, so an image is encoded while
    the default stream is still busy (a forward there would wait for it)."""
    engine = VisionEngine(str(tiny_llava), VisionConfig(max_batch_size=4, device="cuda", dtype="float32"))
    try:
        asyncio.run(engine.encode([image_input(png(Image.fromarray(noise(60, 50, 3))))]))  # warm
        assert engine._stream.priority < torch.cuda.default_stream().priority
        torch.cuda._sleep(1 << 32)  # several seconds of spinning on the default stream
        (embedding,) = asyncio.run(engine.encode([image_input(png(Image.fromarray(noise(70, 40, 5))))]))
        assert not torch.cuda.default_stream().query()  # the sleep is still running
        assert torch.isfinite(embedding.embedding).all()
    finally:
        torch.cuda.synchronize()
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staging_reuses_two_pinned_buffers():
    """Batches go to the device through two alternating pinned buffers reserved up front: the
    same two host blocks for every batch, each holding its batch's pixels exactly; with one
    buffer and a dtype, each call's parts arrive cast and in order."""
    from vision_service.staging import PinnedStaging

    staging = PinnedStaging()
    staging.reserve(5 * 8 * 8 * 3, torch.uint8)
    blocks = {b.data_ptr() for b in staging._buffers}
    assert len(blocks) == 2 and all(b.is_pinned() for b in staging._buffers)
    for n in (5, 3, 5, 4, 2):
        parts = [torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8) for _ in range(n)]
        on_device = staging.to_device(parts, torch.device("cuda"))
        assert torch.equal(on_device.cpu(), torch.cat(parts))
        assert {b.data_ptr() for b in staging._buffers} == blocks
    # one buffer, casting (the LLM tier's image rows, in the model's dtype): each step's rows exactly
    rows = PinnedStaging(buffers=1)
    for n in (3, 1, 2):
        parts = [torch.randn(4, 16, dtype=torch.bfloat16) for _ in range(n)]
        on_device = rows.to_device(parts, torch.device("cuda"), torch.float32)
        assert on_device.dtype == torch.float32 and torch.equal(on_device.cpu(), torch.cat(parts).float())
