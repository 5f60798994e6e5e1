"""The gateway's image encoding: lossless bytes that decode to the same pixels, PIL images
encoded once per object (again after an in-place edit), and only a header check for files
(the vision tier decodes them, and a corrupt one is still a clear ValueError)."""
from __future__ import annotations

import gc
import io

import pytest
from PIL import Image, ImageDraw

from gateway import GenerationConfig, pipeline
from gateway import messages
from gateway.messages import EncodedImages, encode_image
from gateway.vl.image import encode_lossless
from tests.conftest import make_image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "1"])
def test_lossless_bytes_decode_to_the_same_pixels(mode):
    image = make_image(1, mode=mode)
    back = Image.open(io.BytesIO(encode_lossless(image)))
    assert (back.mode, back.size, back.tobytes()) == (image.mode, image.size, image.tobytes())


def test_a_transparency_key_travels_as_png():
    image = make_image(2, mode="P")
    image.info["transparency"] = 3
    data = encode_lossless(image)
    assert data.startswith(b"\x89PNG") and Image.open(io.BytesIO(data)).info["transparency"] == 3


def test_a_pil_image_is_encoded_once_until_edited(monkeypatch):
    calls = []
    monkeypatch.setattr(messages, "encode_lossless", lambda im: calls.append(im.size) or encode_lossless(im))
    cache = EncodedImages()
    image = make_image(3)
    first = cache.encode(image)
    assert cache.encode(image) == first and len(calls) == 1
    assert cache.encode(image.copy()) == first and len(calls) == 2  # another object, same pixels: same sha256
    ImageDraw.Draw(image).rectangle((0, 0, 5, 5), fill=(255, 0, 0))  # in place: same object, size and mode
    edited = cache.encode(image)
    assert edited[1] != first[1] and len(calls) == 3
    del image
    gc.collect()
    assert len(cache._entries) == 0  # entries go with their images


def test_the_cache_keeps_the_most_recent_within_its_bytes():
    images = [make_image(i) for i in range(4)]
    size = len(encode_lossless(images[0]))
    cache = EncodedImages(max_bytes=2 * size)
    for image in images:
        cache.encode(image)
    assert list(cache._entries) == [id(images[2]), id(images[3])]


def test_what_is_no_image_fails_in_the_gateway_naming_its_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.png").write_bytes(b"just some text")
    with pytest.raises(ValueError, match="cannot decode image from notes.png"):
        encode_image("notes.png")


def test_a_truncated_image_is_a_value_error_from_the_vision_tier(tiny_llava):
    buffer = io.BytesIO()
    make_image(4).save(buffer, format="PNG")
    truncated = buffer.getvalue()[:-40]
    assert encode_image(truncated).data == truncated  # the header is fine: the gateway passes it on
    with pipeline(str(tiny_llava)) as pipe:
        with pytest.raises(ValueError, match="decode"):
            pipe(("describe this image", truncated), gen_config=GenerationConfig(max_new_tokens=2))
        assert pipe(("describe this image", make_image(4)), gen_config=GenerationConfig(max_new_tokens=2)).text
