"""Per-image host cost of the split deployment's embedding path, on the CPU (W4's extra work).

In the split deployment every image's embedding (LLaVA-1.5-7B: 576 rows x 4096 bf16 = 4.7 MB)
goes vision_service → llm_service over gRPC, which the embedded mode never pays. This times
each stage of that path with a 7B-shaped embedding, per image and as MB/s:

- vision: embedding → the bytes gRPC sends (`wire.to_wire`, as the server does);
- llm: those bytes → the tensor the engine takes (`wire.EmbeddingAssembler`, as the client does;
  in a loop that frees each tensor, so its memory is reused: no page faults);
- gRPC over loopback between two processes: first the transport alone (pre-serialized chunks
  streamed as raw bytes, nothing parsed), then the whole path through the real `VisionServicer`
  (over an engine that returns a ready embedding) and `VisionClient`, all images requested at once
  (one request per image, as W2 does). With each: the client's CPU per image, of the process and
  of its event-loop thread, and the longest the loop went without running a 1 ms ticker (in
  llm_service that loop also takes requests in and streams every request's tokens);
- the hops before that proportional to the image's bytes (a 336x336 image as the gateway sends it):
  gateway → llm GenerateRequest and llm → vision EncodeRequest, serialized and parsed, and the
  llm tier's sha256 check of the bytes.

    python bench/split_overhead.py [--images 256] [--repeats 3] [--chunk-bytes 1048576]

Runs on one torch thread. GPU-only costs (the vision tier's device → host copy, the LLM tier's
pinned copy and host → device copy at prefill) exist in the embedded mode too and are not here.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protos import common_pb2, llm_pb2, vision_pb2  # noqa: E402
from protos.serving import CHUNK_BYTES, channel  # noqa: E402
from vision_service.types import ImageEmbedding  # noqa: E402
from vision_service.wire import EmbeddingAssembler, to_wire  # noqa: E402

ROWS, HIDDEN, DTYPE = 576, 4096, torch.bfloat16  # LLaVA-1.5-7B: 24x24 patches, Llama-2-7B width
RAW_METHOD = "/prism.bench.Raw/Stream"


def embedding() -> ImageEmbedding:
    return ImageEmbedding(torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(0)).to(DTYPE))


def image_mb() -> float:
    return ROWS * HIDDEN * DTYPE.itemsize / 1e6


def timed(fn: Callable[[], object], repeats: int, number: int = 20) -> float:
    """Best seconds per call over `repeats` runs of `number` calls."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def row(stage: str, seconds: float, mb: float) -> None:
    print(f"  {stage:<58} {seconds * 1e3:8.3f} ms/image {mb / seconds:9.0f} MB/s")


# ---- in-process stages --------------------------------------------------------------------

def wire_stages(repeats: int, chunk_bytes: int) -> None:
    emb, mb = embedding(), image_mb()
    wire = list(to_wire(0, emb, chunk_bytes))
    print(f"embedding {ROWS}x{HIDDEN} {str(DTYPE).removeprefix('torch.')}: {mb:.2f} MB in {len(wire)} chunks")

    def send() -> list[bytes]:
        return list(to_wire(0, emb, chunk_bytes))

    def receive() -> torch.Tensor:
        assembler = EmbeddingAssembler(1)
        for data in wire:
            assembler.add(data)
        return assembler.finish()[0].embedding

    assert torch.equal(receive(), emb.embedding)
    row("vision: embedding -> wire bytes (chunks + serialize)", timed(send, repeats), mb)
    row("llm: wire bytes -> tensor (parse + reassemble)", timed(receive, repeats), mb)


def request_stages(repeats: int) -> None:
    """The image's bytes on the hops before the embedding exists."""
    from bench import make_image  # bench/bench.py, this script's neighbour
    from gateway.vl.image import encode_lossless
    from llm_service.embedding_cache import VerifiedDigests

    data = encode_lossless(make_image(0))
    mb = len(data) / 1e6
    print(f"image as the gateway sends it (336x336 RGB, lossless): {mb:.2f} MB")
    request = llm_pb2.GenerateRequest(request_id="r")
    request.segments.add().text.token_ids.extend(range(1, 6))
    request.segments.add().image.image.data = data
    request.segments.add().text.token_ids.extend(range(100, 132))
    sent = request.SerializeToString()
    encode = vision_pb2.EncodeRequest(images=[common_pb2.ImageInput(data=data)])
    encode_sent = encode.SerializeToString()

    def forward_image() -> bytes:  # what the llm tier does: read the segment's image, send it on
        parsed = llm_pb2.GenerateRequest.FromString(sent)
        images = [s.image.image for s in parsed.segments if s.WhichOneof("kind") == "image"]
        return vision_pb2.EncodeRequest(images=images).SerializeToString()

    row("gateway: GenerateRequest serialize", timed(request.SerializeToString, repeats), mb)
    row("llm: GenerateRequest parse + EncodeRequest serialize", timed(forward_image, repeats), mb)
    row("vision: EncodeRequest parse", timed(lambda: vision_pb2.EncodeRequest.FromString(encode_sent), repeats), mb)
    row("llm: sha256 of a new image (off the loop, a pool of 4)",
        timed(lambda: VerifiedDigests(max_bytes=0).digest(data), repeats), mb)


# ---- two processes over loopback -------------------------------------------------------------

class _ReadyEngine:
    """Stands in for the VisionEngine: every image's embedding is ready at once."""

    def __init__(self):
        self.embedding = embedding()

    async def encode(self, images) -> list[ImageEmbedding]:
        return [self.embedding for _ in images]


def _serve(port_queue: mp.Queue, stop: mp.Event, chunk_bytes: int) -> None:
    """The vision side: the real servicer over `_ReadyEngine`, plus the raw transport method."""
    import grpc

    from vision_service.server import VisionServicer, build_server

    torch.set_num_threads(1)
    raw = list(to_wire(0, embedding(), chunk_bytes))

    async def stream_raw(request: bytes, context) -> object:
        for _ in range(int(request or b"1")):
            for data in raw:
                yield data

    async def main() -> None:
        served = build_server(VisionServicer(_ReadyEngine()), "127.0.0.1:0")
        served.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            RAW_METHOD.split("/")[1], {"Stream": grpc.unary_stream_rpc_method_handler(stream_raw)})])
        await served.server.start()
        port_queue.put(served.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await served.server.stop(0)

    asyncio.run(main())


class _LoopWatch:
    """A 1 ms ticker on the loop: how long the loop went without running it."""

    def __init__(self):
        self.longest = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.001)
            last = now

    def __enter__(self) -> "_LoopWatch":
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()


async def _grpc_stages(target: str, images: int, repeats: int) -> None:
    from vision_service.client import VisionClient

    mb = image_mb()
    inputs = [common_pb2.ImageInput(data=b"x") for _ in range(images)]

    async def raw_once() -> None:
        async with channel(target) as ch:
            call = ch.unary_stream(RAW_METHOD)(str(images).encode())
            async for _ in call:
                pass

    async def client_once(client: VisionClient) -> None:
        results = await asyncio.gather(*(client.encode(inputs[i : i + 1]) for i in range(images)))
        assert all(r[0].embedding.shape == (ROWS, HIDDEN) for r in results)

    async def best(run: Callable[[], object]) -> tuple[float, float, float, float]:
        """(wall, process CPU, loop thread CPU) per image and the longest loop stall, of the
        fastest of `repeats` runs."""
        await run()  # warm-up
        runs = []
        for _ in range(repeats):
            with _LoopWatch() as watch:
                cpu, loop_cpu, start = time.process_time(), time.thread_time(), time.perf_counter()
                await run()
                wall = time.perf_counter() - start
                cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
            runs.append((wall / images, cpu / images, loop_cpu / images, watch.longest))
        return min(runs)

    def report(wall: float, cpu: float, loop_cpu: float, stall: float) -> None:
        row("  client CPU (process, incl. gRPC threads)", cpu, mb)
        row("  client CPU (event-loop thread)", loop_cpu, mb)
        print(f"  {'  client event loop: longest stall':<58} {stall * 1e3:8.3f} ms")

    runs = await best(raw_once)
    row(f"gRPC transport alone ({images} images' chunks, one stream)", runs[0], mb)
    report(*runs)
    client = VisionClient(target)
    try:
        runs = await best(lambda: client_once(client))
    finally:
        await client.close()
    row(f"whole path: servicer -> VisionClient.encode ({images} at once)", runs[0], mb)
    report(*runs)


def grpc_stages(images: int, repeats: int, chunk_bytes: int) -> None:
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(ports, stop, chunk_bytes), daemon=True)
    server.start()
    try:
        target = f"127.0.0.1:{ports.get(timeout=60)}"
        asyncio.run(_grpc_stages(target, images, repeats))
    finally:
        stop.set()
        server.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images per gRPC run (W2: 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES,
                        help="chunk size of the in-process stages and the raw transport (the servicer sends CHUNK_BYTES)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"cores {os.cpu_count()}, torch {torch.__version__}, chunk {args.chunk_bytes} bytes")
    wire_stages(args.repeats, args.chunk_bytes)
    request_stages(args.repeats)
    grpc_stages(args.images, args.repeats, args.chunk_bytes)


if __name__ == "__main__":
    main()
