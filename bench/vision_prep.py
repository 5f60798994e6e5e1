"""The vision tier's host-side image path: what it costs to turn encoded bytes into what
the tower consumes, and how many images/s the engine sustains when the tower itself
costs next to nothing.

Inputs, 256 of each: 336x336 uncompressed TIFFs (what the gateway sends for RGB PIL
images), the same as PNGs at compress level 1 (the gateway's encoding for other modes,
and for all PIL images before d2e3ad6), and 640x480 JPEGs (quality 90) as a typical
photo upload; smooth pictures like bench.py's. Reported:
- per-stage ms, single thread (sha256, decode, convert/resize/crop, then rescale +
  normalize on the CPU or, on a GPU host, a uint8 copy into the staging buffer);
- images/s of sha256 + decode + prepare, one thread and on a pool of --threads threads,
  for both paths (the GPU-host one without pinned memory when run on CPU);
- images/s of the whole engine (prep pool, batcher, forward, copy out) on --device, with
  a tiny 336-px LLaVA checkpoint whose tower is cut down to its patch embedding (so the
  host path, not the forward, is what is timed), every image its own caller, all at
  once, and the batch sizes it formed.

    python bench/vision_prep.py [--device cpu] [--n 256] [--threads 0] [--max-batch 32]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.tiny_checkpoints import build_tiny_llava  # noqa: E402
from protos import common_pb2  # noqa: E402
from vision_service.config import VisionConfig  # noqa: E402
from vision_service.engine import VisionEngine, usable_cores  # noqa: E402
from vision_service.preprocess import decode_image, lookup, to_pixels  # noqa: E402


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random picture (colour grid, bicubic-upscaled), compressible like a photo."""
    grid = np.random.RandomState(seed).randint(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.BICUBIC)


KINDS = {  # name -> (size, PIL save arguments)
    "tiff336": ((336, 336), {"format": "TIFF"}),  # uncompressed
    "png336": ((336, 336), {"format": "PNG", "compress_level": 1}),
    "jpeg640x480": ((640, 480), {"format": "JPEG", "quality": 90}),
}


def encoded(n: int, kind: str) -> list[common_pb2.ImageInput]:
    size, save = KINDS[kind]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        picture(i, size).save(buf, **save)
        data = buf.getvalue()
        out.append(common_pb2.ImageInput(data=data, sha256=hashlib.sha256(data).hexdigest()))
    return out


def per_image_ms(fn, items) -> float:
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return 1e3 * (time.perf_counter() - t0) / len(items)


def stages(engine: VisionEngine, inputs: list[common_pb2.ImageInput]) -> dict[str, float]:
    """Mean ms per image of each stage, one thread. `to_pixels` is convert + resize + crop;
    then the CPU path looks rescale + normalize up (`lookup`), while on a GPU host the
    uint8 pixels are only copied into a staging buffer (`stage`) and looked up there."""
    cfg, table = engine.model.processor, engine.model.table
    decoded = [decode_image(i.data) for i in inputs]
    pixels = [to_pixels(im, cfg) for im in decoded]
    staged = np.empty(pixels[0].shape, dtype=np.uint8)  # reused, as the pinned allocator's blocks are
    return {
        "sha256": per_image_ms(lambda i: hashlib.sha256(i.data).hexdigest(), inputs),
        "decode": per_image_ms(lambda i: decode_image(i.data), inputs),
        "to_pixels": per_image_ms(lambda im: to_pixels(im, cfg), decoded),
        "lookup": per_image_ms(lambda a: lookup(a, table), pixels),
        "stage": per_image_ms(lambda a: np.copyto(staged, a), pixels),
    }


def prep_rate(engine: VisionEngine, inputs: list[common_pb2.ImageInput], threads: int, on_device: bool) -> float:
    """Best of 3: images/s of the engine's per-image work (sha256, decode, prepare) on
    `threads` threads, for the CPU path or the path a GPU host takes (`on_device`)."""
    engine.model.lookup_on_device, was = on_device, engine.model.lookup_on_device
    rates = []
    try:
        for _ in range(4):  # the first round warms the allocator up and is not counted
            t0 = time.perf_counter()
            if threads == 1:
                for i, item in enumerate(inputs):
                    engine._prepare(i, item)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(engine._prepare, range(len(inputs)), inputs))
            rates.append(len(inputs) / (time.perf_counter() - t0))
    finally:
        engine.model.lookup_on_device = was
    return max(rates[1:])


def engine_rate(engine: VisionEngine, inputs: list[common_pb2.ImageInput]) -> tuple[float, dict[int, int]]:
    """Best of 3: images/s with every image its own caller, all at once (after a warm-up
    round), and the batch sizes formed over the 3 rounds."""

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(engine.encode([i]) for i in inputs))
        return len(inputs) / (time.perf_counter() - t0)

    asyncio.run(run())
    engine.batch_sizes.clear()
    rate = max(asyncio.run(run()) for _ in range(3))
    return rate, dict(sorted(engine.batch_sizes.items()))


def tiny_checkpoint(folder: Path) -> Path:
    """A 336-px tiny LLaVA whose features are CLIP's hidden state 0: no encoder layer runs."""
    path = build_tiny_llava(folder / "tiny-llava-336", image_size=336, patch_size=14)
    config = json.loads((path / "config.json").read_text())
    config["vision_feature_layer"] = 0
    (path / "config.json").write_text(json.dumps(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="where the engine runs (cpu, cuda)")
    parser.add_argument("--n", type=int, default=256, help="images per measurement")
    parser.add_argument("--threads", type=int, default=0, help="pool size for the pooled rate (0: usable cores)")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    threads = args.threads or usable_cores()
    torch.set_num_threads(1)  # the tiny tower's forward should not compete with the prep threads

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp))
        engine = VisionEngine(str(ckpt), VisionConfig(max_batch_size=args.max_batch, device=args.device))
        try:
            print(f"torch {torch.__version__}, engine on {engine.device}, {usable_cores()} usable cores, "
                  f"pool of {threads} threads, n={args.n}")
            for kind in KINDS:
                inputs = encoded(args.n, kind)
                ms = stages(engine, inputs)
                print(f"{kind}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
                for path, on_device in (("CPU path", False), ("GPU-host path", True)):
                    one, pooled = (prep_rate(engine, inputs, t, on_device) for t in (1, threads))
                    print(f"  prep images/s, {path}: 1 thread {one:.0f}, {threads} threads {pooled:.0f}")
                rate, sizes = engine_rate(engine, inputs)
                print(f"  engine images/s on {engine.device}: {rate:.0f} (tiny 336-px tower), batch sizes {sizes}")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
