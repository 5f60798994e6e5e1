"""vision_service against transformers: preprocessing bit for bit, embeddings within
1e-5 (fp32), the dynamic batcher, the wire format and the gRPC server on loopback."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from protos import common_pb2
from vision_service.checkpoint import Checkpoint
from vision_service.config import VisionConfig
from vision_service.engine import VisionEngine
from vision_service.models import load_vision_model
from vision_service.models.base import lookup_pixels
from vision_service.preprocess import (ImageProcessorConfig, decode_image, lookup, pixel_table, preprocess,
                                       rescale_normalize)
from vision_service.tiff import plain_rgb_tiff
from vision_service.types import ImageEmbedding
from vision_service.wire import EmbeddingAssembler, parse_chunk, to_wire

CPU = torch.device("cpu")


def noise(seed: int, width: int, height: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def odd_images() -> list[Image.Image]:
    """Odd sizes, both orientations, smaller and larger than the model input, many modes."""
    out = []
    sizes = [(45, 71), (71, 45), (17, 33), (300, 7), (31, 32), (5, 5), (129, 64),
             (32, 32), (32, 48), (48, 32)]  # the last three need no resize (the tiny model's input is 32)
    for i, (w, h) in enumerate(sizes):
        a = noise(i, w, h, 4)
        out += [Image.fromarray(a, "RGBA"), Image.fromarray(a[..., :3]), Image.fromarray(a[..., 0], "L"),
                Image.fromarray(a[..., :2], "LA"), Image.fromarray(a[..., :3]).convert("P"),
                Image.fromarray(a[..., :3]).convert("CMYK")]
    p = Image.fromarray(noise(9, 20, 30)[..., 0], "L").convert("P")
    p.info["transparency"] = 5
    return out + [p]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def image_input(data: bytes) -> common_pb2.ImageInput:
    return common_pb2.ImageInput(data=data, sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def hf(tiny_llava):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    processor = AutoImageProcessor.from_pretrained(str(tiny_llava), backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava), dtype=torch.float32).eval()
    return processor, model


def hf_features(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    cfg = model.config
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out  # v5 output object / v4 tensor
    return list(feats)


def assert_close_with_margin(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert ref.abs().max() > 1.0  # random weights give large values: 1e-5 is a real bound
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# ---- preprocessing -------------------------------------------------------------------

def hf_composites_alpha(processor) -> bool:
    """transformers 5.23 composites transparency onto white, 5.17 drops the alpha channel:
    ask the installed one with a fully transparent black image."""
    clear = processor(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))["pixel_values"][0]
    white = processor(Image.new("RGB", (32, 32), (255, 255, 255)))["pixel_values"][0]
    return bool(np.array_equal(clear, white))


def test_preprocess_bit_exact_vs_transformers(hf, tiny_llava):
    processor, _ = hf
    cfg = ImageProcessorConfig.from_pretrained(tiny_llava)
    cfg.composite_alpha = hf_composites_alpha(processor)
    for image in odd_images():
        ref = processor(image)["pixel_values"][0]
        ours = preprocess(image, cfg)
        assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape == (3, 32, 32)
        assert np.array_equal(ours, ref), (image.mode, image.size)


@pytest.mark.parametrize("options", [{}, {"do_rescale": False}, {"do_normalize": False},
                                     {"do_rescale": False, "do_normalize": False},
                                     {"rescale_factor": 1 / 127.5, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}])
def test_table_lookup_equals_direct_arithmetic(options):
    """Rescale + normalize looked up per uint8 value == computed on every pixel, bit for bit,
    on the CPU (numpy) and as the device does it (torch)."""
    cfg = ImageProcessorConfig.from_dict(options)
    pixels = noise(70, 41, 23)
    direct = rescale_normalize(pixels, cfg).transpose(2, 0, 1)
    table = pixel_table(cfg)
    assert direct.dtype == np.float32 and np.array_equal(lookup(pixels, table), direct)
    on_device = lookup_pixels(torch.from_numpy(pixels).unsqueeze(0), torch.from_numpy(table))
    assert on_device.is_contiguous() and np.array_equal(on_device[0].numpy(), direct)


def test_device_path_equals_cpu_path(tiny_llava):
    """uint8 pixels looked up on the device (torch, here on CPU) give the same pixel values
    and embeddings as the float32 pixels prepared on the host."""
    model = load_vision_model(Checkpoint.open(tiny_llava), CPU, torch.float32)
    images = [Image.fromarray(noise(75 + i, 33 + 9 * i, 40)) for i in range(3)]
    host = [model.prepare(im, {}) for im in images]
    model.lookup_on_device = True
    staged = [model.prepare(im, {}) for im in images]
    assert staged[0].pixel_values.dtype == torch.uint8 and staged[0].tiles == 1
    assert torch.equal(lookup_pixels(torch.cat([p.pixel_values for p in staged]), model.device_table),
                       torch.cat([p.pixel_values for p in host]))
    from_staged = model.encode(staged)
    model.lookup_on_device = False
    for a, b in zip(from_staged, model.encode(host)):
        assert torch.equal(a.embedding, b.embedding)


def test_preprocess_reads_legacy_preprocessor_config(tiny_llava, tmp_path):
    d = json.loads((tiny_llava / "processor_config.json").read_text())["image_processor"]
    d.update(size=24, crop_size=20, resample=2)  # v4-era int sizes, bilinear
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    cfg = ImageProcessorConfig.from_pretrained(tmp_path)
    assert (cfg.shortest_edge, cfg.crop_size, cfg.resample) == (24, (20, 20), 2)
    assert preprocess(Image.fromarray(noise(0, 50, 30)), cfg).shape == (3, 20, 20)


def test_decode_image_round_trip_and_errors():
    image = Image.fromarray(noise(1, 23, 19, 4), "RGBA")
    decoded = decode_image(png(image))
    assert decoded.mode == "RGBA" and np.array_equal(np.asarray(decoded), np.asarray(image))
    data = png(Image.fromarray(noise(2, 64, 64)))
    for bad in [b"", b"not an image at all", data[: len(data) // 2]]:
        with pytest.raises(ValueError, match="cannot decode image"):
            decode_image(bad)
    with pytest.raises(ValueError, match="exceeds the limit"):
        decode_image(data, max_pixels=64 * 63)


def tiff(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "TIFF", **options)
    return buf.getvalue()


def test_plain_rgb_tiff_is_read_directly_and_equals_pil():
    """The gateway's uncompressed RGB TIFFs skip PIL's parser and decode to PIL's pixels;
    every other TIFF still goes through PIL; bad ones fail as before."""
    from PIL import ImageCms

    def pil(data):
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    rgb = Image.fromarray(noise(3, 33, 17))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb_icc = Image.open(io.BytesIO(tiff(rgb, icc_profile=icc)))
    plain = [tiff(rgb), tiff(Image.fromarray(noise(4, 1, 1))), tiff(Image.fromarray(noise(5, 336, 336))),
             tiff(rgb_icc), tiff(rgb, compression="raw")]  # the last through libtiff
    others = [tiff(Image.fromarray(noise(6, 9, 7, 4), "RGBA")), tiff(rgb.convert("L")), tiff(rgb.convert("CMYK")),
              tiff(rgb, compression="tiff_lzw"), tiff(rgb, save_all=True, append_images=[rgb])]
    for data in plain + others:
        ours, ref = decode_image(data), pil(data)
        assert (plain_rgb_tiff(data, 1 << 20) is not None) == (data in plain)
        assert ours.mode == ref.mode and np.array_equal(np.asarray(ours), np.asarray(ref))
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(plain[0][:-1])
    with pytest.raises(ValueError, match="exceeds the limit"):
        decode_image(plain[0], max_pixels=33 * 17 - 1)


# ---- model ---------------------------------------------------------------------------

def test_embeddings_match_transformers(hf, tiny_llava):
    processor, model = hf
    ours = load_vision_model(Checkpoint.open(tiny_llava), CPU, torch.float32)
    images = [Image.fromarray(noise(10 + i, 40 + 7 * i, 30 + 3 * i)) for i in range(3)]
    refs = hf_features(model, processor(images, return_tensors="pt")["pixel_values"])
    embs = ours.encode([ours.prepare(im, {}) for im in images])
    assert ours.hidden_size == 64 and len(embs) == 3
    for emb, ref in zip(embs, refs):
        assert emb.rows == 16 and emb.grid_thw is None
        assert_close_with_margin(emb.embedding, ref)


def _v4_sharded_copy(src, dst) -> None:
    """Rewrite a checkpoint in the v4/hub layout (vision_model infix), in two shards."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in keys}, dst / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def test_feature_layer_list_full_strategy_and_v4_sharded_layout(hf, tiny_llava, tmp_path):
    """A variant with vision_feature_layer=[-2, -1] and 'full' (keeps CLS), stored in the
    hub layout across two shards, still equals transformers."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    processor, _ = hf
    config = LlavaConfig.from_pretrained(str(tiny_llava))
    config.vision_feature_layer = [-2, -1]
    config.vision_feature_select_strategy = "full"
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "v5")
    for f in ("processor_config.json",):
        shutil.copy(tiny_llava / f, tmp_path / "v5" / f)
    _v4_sharded_copy(tmp_path / "v5", tmp_path / "v4")
    ckpt = Checkpoint.open(tmp_path / "v4")
    assert any(k.startswith("vision_tower.vision_model.") for keys in ckpt.files.values() for k in keys)

    ours = load_vision_model(ckpt, CPU, torch.float32)
    images = [Image.fromarray(noise(20 + i, 33, 47)) for i in range(2)]
    refs = hf_features(model, processor(images, return_tensors="pt")["pixel_values"])
    for emb, ref in zip(ours.encode([ours.prepare(im, {}) for im in images]), refs):
        assert emb.rows == 17  # 16 patches + CLS
        assert_close_with_margin(emb.embedding, ref)


# ---- engine --------------------------------------------------------------------------

def test_batches_across_callers_and_bad_image_fails_only_its_caller(tiny_llava):
    inputs = [image_input(png(Image.fromarray(noise(30 + i, 36 + i, 41)))) for i in range(9)]
    corrupt = common_pb2.ImageInput(data=b"\x89PNG\r\n\x1a\n broken")

    async def run():
        engine = VisionEngine(str(tiny_llava), VisionConfig(max_batch_size=4, batch_window_ms=300, device="cpu"))
        try:
            model = engine.model  # unbatched reference: one forward per image
            alone = [model.encode([model.prepare(decode_image(i.data), {})])[0] for i in inputs]
            results = await asyncio.gather(*(engine.encode([i]) for i in inputs), engine.encode([inputs[0], corrupt]),
                                           return_exceptions=True)
            return alone, results, engine.info(), dict(engine.batch_sizes)
        finally:
            engine.close()

    alone, results, info, sizes = asyncio.run(run())
    assert isinstance(results[-1], ValueError) and "image 1: cannot decode image" in str(results[-1])
    assert max(sizes) > 1 and max(sizes) <= 4
    assert info.images_encoded == 9 and info.batches_run == sum(sizes.values()) and dict(info.batch_sizes) == sizes
    assert (info.architecture, info.hidden_size, info.dtype, info.device) == ("LlavaForConditionalGeneration", 64,
                                                                              "float32", "cpu")
    for (batched,), single in zip(results[:-1], alone):
        assert batched.embedding.device == CPU and batched.embedding.dtype == torch.float32
        torch.testing.assert_close(batched.embedding, single.embedding, rtol=0, atol=1e-5)


def test_cancelled_caller_is_dropped_from_the_queue(tiny_llava):
    a, b, c = (image_input(png(Image.fromarray(noise(40 + i, 32, 32)))) for i in range(3))

    async def run():
        engine = VisionEngine(str(tiny_llava), VisionConfig(max_batch_size=2, batch_window_ms=5000, device="cpu"))
        try:
            waiting = asyncio.create_task(engine.encode([a]))  # waits for a second image
            await asyncio.sleep(0.2)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            out = await asyncio.gather(engine.encode([b]), engine.encode([c]))  # fills a batch of 2
            return out, engine.info(), dict(engine.batch_sizes)
        finally:
            engine.close()

    out, info, sizes = asyncio.run(run())
    assert len(out) == 2 and info.images_encoded == 2 and sizes == {2: 1}


def test_next_forward_runs_while_the_previous_batch_is_copied_out(tiny_llava):
    """Two batches in flight at most: while one is being finished, the next one's forward
    runs, and a third waits (growing meanwhile) until the first is done."""
    inputs = [image_input(png(Image.fromarray(noise(80 + i, 32, 32)))) for i in range(4)]
    with pytest.raises(ValueError, match="preprocess_threads"):
        VisionConfig(preprocess_threads=-1)

    async def run():
        engine = VisionEngine(str(tiny_llava), VisionConfig(max_batch_size=1, device="cpu", preprocess_threads=1))
        real_encode, real_finish = engine.model.encode, engine._finish
        launched, release = [], threading.Event()
        engine.model.encode = lambda batch: launched.append(len(batch)) or real_encode(batch)
        engine._finish = lambda item: release.wait() and real_finish(item)
        try:
            calls = [asyncio.create_task(engine.encode([i])) for i in inputs]
            while len(launched) < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            held = len(launched)
            release.set()
            await asyncio.gather(*calls)
            return held, launched, dict(engine.batch_sizes)
        finally:
            engine.close()

    held, launched, sizes = asyncio.run(run())
    assert held == 2 and sum(launched) == 4 and sum(sizes.values()) == len(launched)


def test_engine_rejects_sha256_mismatch_and_closed_use(tiny_llava):
    data = png(Image.fromarray(noise(50, 32, 32)))

    async def run():
        engine = VisionEngine(str(tiny_llava), VisionConfig(device="cpu"))
        with pytest.raises(ValueError, match="image 0: sha256 does not match"):
            await engine.encode([common_pb2.ImageInput(data=data, sha256="00" * 32)])
        engine.close()
        with pytest.raises(RuntimeError, match="closed"):
            await engine.encode([image_input(data)])

    asyncio.run(run())


def test_failed_forward_fails_its_batch_not_the_worker(tiny_llava):
    data = png(Image.fromarray(noise(55, 32, 32)))

    async def run():
        engine = VisionEngine(str(tiny_llava), VisionConfig(device="cpu"))
        real, failures = engine.model.encode, [RuntimeError("out of memory")]

        def flaky(batch):
            if failures:
                raise failures.pop()
            return real(batch)

        engine.model.encode = flaky
        try:
            with pytest.raises(RuntimeError, match="vision forward failed: out of memory"):
                await engine.encode([image_input(data)])
            return await engine.encode([image_input(data)]), engine.info()
        finally:
            engine.close()

    out, info = asyncio.run(run())
    assert out[0].rows == 16 and info.images_encoded == 1


def test_graph_sizes_cover_every_batch_up_to_the_max():
    """The vision graphs' sizes (vision_service/graphs.py): 1, 2, 4, 8, then powers of two below
    the engine's max_batch_size and the max itself, so every batch the engine forms replays one."""
    from vision_service.graphs import graph_sizes, pick_batch_size

    assert graph_sizes(1) == [1, 2, 4, 8]
    assert graph_sizes(9) == [1, 2, 4, 8, 9]
    assert graph_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert graph_sizes(32) == [1, 2, 4, 8, 16, 32]
    for max_batch in (1, 5, 24, 32, 100):
        sizes = graph_sizes(max_batch)
        assert all(pick_batch_size(sizes, n) is not None for n in range(1, max_batch + 1))


# ---- wire + gRPC ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunks_reassemble_exactly(dtype):
    emb = torch.randn(37, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    chunks = list(to_wire(1, ImageEmbedding(emb, (1, 4, 6)), chunk_bytes=5 * 24 * emb.element_size()))
    assert len(chunks) == 8 and all(parse_chunk(c)[1].nbytes % (24 * emb.element_size()) == 0 for c in chunks)
    assembler = EmbeddingAssembler(2)
    for chunk in reversed(chunks):
        assembler.add(chunk)
    for chunk in to_wire(0, ImageEmbedding(emb[:0])):
        assembler.add(chunk)
    empty, out = assembler.finish()
    assert out.embedding.dtype == dtype and torch.equal(out.embedding, emb) and out.grid_thw == (1, 4, 6)
    assert empty.rows == 0
    broken = EmbeddingAssembler(2)
    broken.add(chunks[0])
    broken.add(next(to_wire(0, ImageEmbedding(emb[:0]))))
    with pytest.raises(RuntimeError, match="incomplete"):
        broken.finish()


def test_chunks_are_protobuf_serializations():
    """The hand-joined bytes are SerializeToString's, and parsing takes any protobuf encoding."""
    from protos import vision_pb2

    emb = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    raw = emb.view(torch.uint8).numpy()
    for grid, index in (((1, 4, 6), 3), (None, 0)):
        chunks = list(to_wire(index, ImageEmbedding(emb, grid), chunk_bytes=16 * raw.shape[1]))
        expected = [vision_pb2.EmbeddingChunk(image_index=index, rows=37, hidden_size=24, dtype="bfloat16",
                                              row_offset=start, data=raw[start : start + 16].tobytes(),
                                              grid_thw=list(grid or ())).SerializeToString()
                    for start in (0, 16, 32)]
        assert chunks == expected
    assert list(to_wire(0, ImageEmbedding(emb[:0]))) == [
        vision_pb2.EmbeddingChunk(rows=0, hidden_size=24, dtype="bfloat16").SerializeToString()]
    # a sender that writes the payload first, and twice (the last one counts, as in protobuf)
    message = vision_pb2.EmbeddingChunk(data=b"\0" * 48, rows=1, hidden_size=24, dtype="bfloat16")
    header, payload = parse_chunk(vision_pb2.EmbeddingChunk(data=b"\1" * 48).SerializeToString()
                                  + message.SerializeToString())
    assert (header.rows, header.hidden_size, header.dtype, header.data) == (1, 24, "bfloat16", b"")
    assert bytes(payload) == b"\0" * 48
    for junk in (b"\x32\x05ab", b"\x0b", b"\x08\xff"):  # truncated payload, a group, a cut varint
        with pytest.raises(RuntimeError, match="malformed embedding chunk"):
            parse_chunk(junk)


def test_grpc_round_trip(tiny_llava):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos import vision_pb2, vision_pb2_grpc
    from protos.serving import channel
    from vision_service.client import VisionClient
    from vision_service.server import serve

    inputs = [image_input(png(Image.fromarray(noise(60 + i, 45, 38)))) for i in range(3)]
    config = VisionConfig(max_batch_size=1, device="cpu")

    async def health(target):
        async with channel(target) as ch:
            return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status

    async def run():
        engine = VisionEngine(str(tiny_llava), config)
        local = await engine.encode(inputs)
        engine.close()
        port: asyncio.Future = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(serve(str(tiny_llava), config, "127.0.0.1:0", on_started=port.set_result))
        await asyncio.wait({server, port}, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()  # raises why it could not start
        target = f"127.0.0.1:{port.result()}"
        client = VisionClient(target)
        try:
            assert await health(target) == health_pb2.HealthCheckResponse.SERVING
            remote = await client.encode(inputs)
            with pytest.raises(ValueError, match="image 1: cannot decode image"):
                await client.encode([inputs[0], common_pb2.ImageInput(data=b"junk")])
            async with channel(target) as ch:  # the raw status code, as other languages see it
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in vision_pb2_grpc.VisionServiceStub(ch).Encode(
                            vision_pb2.EncodeRequest(images=[common_pb2.ImageInput(data=b"junk")])):
                        pass
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(TimeoutError):
                await client.encode(inputs, timeout=1e-6)
            assert await health(target) == health_pb2.HealthCheckResponse.SERVING
            again = await client.encode(inputs[:1])
            info = await client.info()
        finally:
            await client.close()
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
        return local, remote, again, info

    local, remote, again, info = asyncio.run(run())
    for ours, theirs in zip(remote, local):
        assert ours.embedding.dtype == torch.float32 and torch.equal(ours.embedding, theirs.embedding)
    assert torch.equal(again[0].embedding, local[0].embedding)
    assert info.architecture == "LlavaForConditionalGeneration" and info.images_encoded >= 4


def test_client_refuses_a_malformed_stream():
    """A server sending bytes that are no EmbeddingChunk: RuntimeError from encode (the
    chunks are parsed on the client's assembly threads), and the client stays usable."""
    import grpc

    from protos.serving import make_server
    from vision_service.client import ENCODE_METHOD, VisionClient

    good = list(to_wire(0, ImageEmbedding(torch.ones(3, 4))))
    calls = []

    async def encode(request: bytes, context):  # the first call gets junk after a good chunk
        calls.append(request)
        for chunk in [good[0], b"\x0b"] if len(calls) == 1 else good:
            yield chunk

    async def run():
        service, method = ENCODE_METHOD.strip("/").split("/")
        served = make_server([service], "127.0.0.1:0")
        served.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_stream_rpc_method_handler(encode)})])
        await served.server.start()
        client = VisionClient(f"127.0.0.1:{served.port}")
        try:
            with pytest.raises(RuntimeError, match="malformed embedding chunk"):
                await client.encode([common_pb2.ImageInput(data=b"x")])
            return await client.encode([common_pb2.ImageInput(data=b"x")])
        finally:
            await client.close()
            await served.server.stop(0)

    (out,) = asyncio.run(run())
    assert torch.equal(out.embedding, torch.ones(3, 4))


def test_host_copy_is_a_plain_byte_copy():
    """staging.host_copy: the bytes of any dtype (bf16 has no numpy dtype) into a row slice."""
    from vision_service.staging import host_copy

    for dtype in (torch.bfloat16, torch.float32, torch.uint8):
        src = (torch.arange(60) * 7 % 251).to(dtype).view(3, 4, 5)
        dst = torch.zeros(6, 4, 5, dtype=dtype)
        host_copy(dst[2:5], src)
        assert torch.equal(dst[2:5], src) and not dst[:2].any() and not dst[5:].any()
