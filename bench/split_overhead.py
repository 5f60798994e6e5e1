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
  llm tier's sha256 check of the bytes;
- decode, the other thing only the split pays: every step's token of every request goes llm →
  gateway as its own GenerateResponse. 256 requests streaming, the device a sleep (host_overhead.py's
  SimulatedDevice, tests' tiny checkpoint), embedded (AsyncLLMEngine + ChatService in one process)
  against the real LLMServicer in its own process with ChatService over LLMClient in this one: ms
  per step of wall, exposed host (wall - device), engine thread CPU and the LLM process's event-loop
  thread CPU (it shares the GIL with the engine thread), and the gateway side's CPU.

    python bench/split_overhead.py [--images 256] [--repeats 3] [--parts wire,requests,grpc,decode]

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


# ---- decode: every step's tokens llm → gateway (split only) -----------------------------------

def _decode_window(marks: list[tuple], steps: int) -> dict[str, float]:
    """ms per step over `steps` consecutive pure-decode steps of the whole batch (after 4 of them):
    wall, exposed host (wall - device), engine thread CPU in and between steps, loop thread CPU.
    `marks`: per step (wall, engine CPU, loop CPU at entry; device time, engine CPU at exit; full decode)."""
    full = [i for i, m in enumerate(marks) if m[5]]
    a = full[4]
    b = a + steps
    if b >= len(marks) or not all(m[5] for m in marks[a:b]):
        raise RuntimeError(f"fewer than {steps + 4} pure-decode steps of the whole batch")
    return {
        "wall": 1e3 * (marks[b][0] - marks[a][0]) / steps,
        "exposed": 1e3 * (marks[b][0] - marks[a][0] - marks[b - 1][3] + marks[a - 1][3]) / steps,
        "step_cpu": 1e3 * sum(m[4] - m[1] for m in marks[a:b]) / steps,
        "between_steps_cpu": 1e3 * sum(marks[i + 1][1] - marks[i][4] for i in range(a, b)) / steps,
        "loop_cpu": 1e3 * (marks[b][2] - marks[a][2]) / steps,
    }


def _serve_llm(path: str, bs: int, steps: int, device_ms: float, port_queue: mp.Queue, stop: mp.Event,
               results: mp.Queue) -> None:
    """The LLM tier: the real LLMServicer over an AsyncLLMEngine whose forward is a sleep;
    every step is timed, with the CPU of the event loop (this process's main thread)."""
    import threading

    from host_overhead import SimulatedDevice, engine_config  # this script's neighbour
    from llm_service.engine.async_engine import AsyncLLMEngine
    from llm_service.server import SERVICE_NAME, LLMServicer
    from protos import llm_pb2_grpc
    from protos.serving import make_server

    torch.set_num_threads(1)
    llm = AsyncLLMEngine(path, engine_config(bs))
    device, engine = SimulatedDevice(llm.engine, device_ms), llm.engine
    loop_clock = time.pthread_getcpuclockid(threading.main_thread().ident)
    marks: list[tuple] = []
    step = engine.step

    def timed_step():
        w0, c0, l0 = time.perf_counter(), time.thread_time(), time.clock_gettime(loop_clock)
        try:
            return step()
        finally:
            log = engine.step_log[-1]
            marks.append((w0, c0, l0, device.slept, time.thread_time(),
                          log.prefill_tokens == 0 and log.decode_rows == bs))

    async def main() -> None:
        served = make_server([SERVICE_NAME], "127.0.0.1:0")
        llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(llm), served.server)
        await served.server.start()
        port_queue.put(served.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await served.server.stop(0)

    engine.step = timed_step
    try:
        asyncio.run(main())
        results.put(_decode_window(marks, steps))
    except Exception as e:  # the parent reports it
        results.put(e)
    finally:
        llm.close()


async def _gateway_decode(target: str, path: str, bs: int, steps: int) -> float:
    """The gateway's side (ChatService over LLMClient): `bs` requests at once, every one
    streamed and detokenized; this process's CPU per step."""
    from gateway.config import GenerationConfig
    from gateway.service import ChatService
    from host_overhead import TEXT
    from llm_service.client import LLMClient

    service = ChatService(path, LLMClient(target))
    tokens = steps + 48  # room for a window of `steps` with every request decoding, on a loaded machine too
    gen = GenerationConfig(max_new_tokens=tokens, ignore_eos=True)

    async def one(i: int) -> None:
        async for _ in service.stream([{"role": "user", "content": f"{i} {TEXT}"}], gen):
            pass

    cpu = time.process_time()
    await asyncio.gather(*(one(i) for i in range(bs)))
    await service.llm.aclose()
    return 1e3 * (time.process_time() - cpu) / tokens


def decode_stages(bs: int, steps: int, device_ms: float) -> None:
    from gateway.tiny_checkpoints import build_tiny_llava
    from host_overhead import pipeline_decode

    path = str(build_tiny_llava())
    print(f"decode, {bs} requests streaming, the device a {device_ms:g} ms sleep (ms per step):")
    keys = ("wall", "exposed", "step_cpu", "between_steps_cpu", "loop_cpu")
    print(f"  {'':<34}" + "".join(f"{k:>18}" for k in keys))
    embedded = pipeline_decode(Path(path), bs, steps, device_ms)
    print(f"  {'embedded (ChatService in-process)':<34}" + "".join(f"{embedded[k]:18.3f}" for k in keys))
    ctx = mp.get_context("spawn")
    ports, stop, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=_serve_llm, args=(path, bs, steps, device_ms, ports, stop, results), daemon=True)
    server.start()
    try:
        gateway_cpu = asyncio.run(_gateway_decode(f"127.0.0.1:{ports.get(timeout=120)}", path, bs, steps))
    finally:
        stop.set()
    split = results.get(timeout=60)
    server.join(10)
    if isinstance(split, Exception):
        raise split
    print(f"  {'split: the llm tier (gRPC out)':<34}" + "".join(f"{split[k]:18.3f}" for k in keys))
    print(f"  {'split: the gateway process CPU':<34}{gateway_cpu:18.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images per gRPC run (W2: 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="wire,requests,grpc,decode")
    parser.add_argument("--decode-batch", type=int, default=256, help="requests streaming in the decode part")
    parser.add_argument("--decode-steps", type=int, default=48)
    parser.add_argument("--device-ms", type=float, default=8.0, help="simulated device time of a decode step")
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES,
                        help="chunk size of the in-process stages and the raw transport (the servicer sends CHUNK_BYTES)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"cores {os.cpu_count()}, torch {torch.__version__}, chunk {args.chunk_bytes} bytes")
    parts = args.parts.split(",")
    if "wire" in parts:
        wire_stages(args.repeats, args.chunk_bytes)
    if "requests" in parts:
        request_stages(args.repeats)
    if "grpc" in parts:
        grpc_stages(args.images, args.repeats, args.chunk_bytes)
    if "decode" in parts:
        decode_stages(args.decode_batch, args.decode_steps, args.device_ms)


if __name__ == "__main__":
    main()
