"""Prompt forms → OpenAI messages, and messages → GenerateRequest segments whose ids
equal the HF processor's (with each image's run of image ids collapsed to one)."""
from __future__ import annotations

import base64
import hashlib
import io

import pytest
from PIL import Image

from gateway.config import GenerationConfig
from gateway.messages import build_request, fetches_images, normalize_messages, normalize_prompts
from gateway.service import RAW_TEMPLATE
from gateway.templates import get_template
from gateway.tokenizer import Tokenizer
from gateway.vl.constants import IMAGE_TOKEN
from tests.conftest import make_image

IMG = make_image(1, size=(40, 30))
IMG2 = make_image(2, size=(30, 50))


def _parts(message):
    return [(p["type"], p.get("text", p.get("image_url", {}).get("url"))) for p in message["content"]]


def test_str():
    assert normalize_prompts("hi") == ([[{"role": "user", "content": "hi"}]], False)


def test_text_image_tuple():
    [[message]], is_batch = normalize_prompts(("describe", IMG))
    assert not is_batch and message["role"] == "user"
    assert _parts(message) == [("text", "describe"), ("image_url", IMG)]


def test_image_list_and_reversed_tuple():
    [[a]], _ = normalize_prompts(("describe", [IMG, "http://x/b.png"]))
    [[b]], _ = normalize_prompts(([IMG, "http://x/b.png"], "describe"))
    assert _parts(a) == _parts(b) == [("text", "describe"), ("image_url", IMG), ("image_url", "http://x/b.png")]


def test_openai_messages_are_one_conversation():
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA",
                                                                                 "max_dynamic_patch": 6}},
                                             {"type": "image_data", "image_data": {"data": IMG}},
                                             {"type": "image", "image": IMG2}]}]
    [conversation], is_batch = normalize_prompts(messages)
    assert not is_batch and len(conversation) == 2
    parts = conversation[1]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "max_dynamic_patch": 6}}
    assert parts[2]["image_url"]["url"] is IMG and parts[3]["image_url"]["url"] is IMG2


def test_only_http_images_are_fetched(tmp_path):
    """What waits on the network is prepared on the wide default executor (service.prepare_in_order)."""
    assert fetches_images(normalize_messages(("a", ["/x.png", "http://h/y.png"])))
    assert not fetches_images(normalize_messages(("a", [IMG, b"\x89PNG", "file:///x.png", "data:image/png;base64,AA"])))
    assert not fetches_images(normalize_messages("http://h/y.png is a link, not an image"))


def test_batches():
    conversations, is_batch = normalize_prompts(["a", ("b", IMG), [{"role": "user", "content": "c"}]])
    assert is_batch and [c[-1]["role"] for c in conversations] == ["user"] * 3
    assert normalize_prompts(["only"])[1] is True  # a list of one str is a batch of one


@pytest.mark.parametrize("bad,match", [
    ([], "empty"),
    (42, "unsupported prompt"),
    (("a", "b", "c"), "tuple"),
    ((IMG, IMG2), "text item"),
    ([{"role": "user", "content": "x"}, "y"], "mixes"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": [{"type": "audio_url"}]}], "unsupported content part"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "no image"),
    (("x", 3.5), "PIL image"),
])
def test_bad_prompts(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_prompts(bad)


@pytest.fixture(scope="module")
def tok(tiny_llava):
    return Tokenizer(tiny_llava)


@pytest.fixture(scope="module")
def processor(tiny_llava):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_llava), backend="pil")


def _flatten(request, image_token_id):
    ids, images = [], []
    for segment in request.segments:
        if segment.WhichOneof("kind") == "text":
            ids += list(segment.text.token_ids)
        else:
            ids.append(image_token_id)
            images.append(segment.image.image)
    return ids, images


def _collapse(ids, image_token_id):
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


@pytest.mark.parametrize("prompt,images", [
    (("describe this image", IMG), [IMG]),
    (("describe these images", [IMG, IMG2]), [IMG, IMG2]),
    ((f"compare {IMAGE_TOKEN} with {IMAGE_TOKEN} please", [IMG, IMG2]), [IMG, IMG2]),
    ("no image here", []),
])
def test_ids_equal_hf_processor(prompt, images, tok, processor):
    template = get_template("llava-v1")
    messages = normalize_messages(prompt)
    request = build_request(messages, template, tok)
    ids, sent = _flatten(request, tok.image_token_id)
    text = template.messages2prompt(messages).replace(IMAGE_TOKEN, "<image>")
    expected = processor(text=text, images=images or None)["input_ids"][0]
    assert ids == _collapse(list(expected), tok.image_token_id)
    assert len(sent) == len(images)
    for image, original in zip(sent, images):
        assert hashlib.sha256(image.data).hexdigest() == image.sha256
        assert Image.open(io.BytesIO(image.data)).tobytes() == original.tobytes()  # lossless PNG


def test_second_turn_ids_equal_hf_processor(tok, processor):
    template = get_template("llava-v1")
    messages = normalize_messages(("describe this image", IMG)) + [
        {"role": "assistant", "content": "A tiger."}, {"role": "user", "content": "What is it doing?"}]
    ids, sent = _flatten(build_request(messages, template, tok), tok.image_token_id)
    text = template.messages2prompt(messages).replace(IMAGE_TOKEN, "<image>")
    assert ids == _collapse(list(processor(text=text, images=[IMG])["input_ids"][0]), tok.image_token_id)
    assert len(sent) == 1


def test_original_bytes_kept_for_files_urls_and_data_urls(tok, tmp_path, image_server):
    base_url, folder = image_server
    path = tmp_path / "a.jpg"
    IMG.save(path, format="JPEG")
    data_url = "data:image/png;base64," + base64.b64encode((folder / "img2.png").read_bytes()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "x"},
        {"type": "image_url", "image_url": {"url": str(path), "detail": "low"}},
        {"type": "image_url", "image_url": {"url": f"{base_url}/img1.png"}},
        {"type": "image_url", "image_url": {"url": data_url}},
    ]}]
    request = build_request(normalize_messages(messages), get_template("llava-v1"), tok)
    images = [s.image.image for s in request.segments if s.WhichOneof("kind") == "image"]
    assert [i.data for i in images] == [path.read_bytes(), (folder / "img1.png").read_bytes(),
                                        (folder / "img2.png").read_bytes()]
    assert dict(images[0].options) == {"detail": "low"} and not images[1].options


def test_same_image_same_hash(tok):
    request = build_request(normalize_messages(("x", [IMG, IMG.copy()])), get_template("llava-v1"), tok)
    hashes = [s.image.image.sha256 for s in request.segments if s.WhichOneof("kind") == "image"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


def test_image_token_text_in_prompt_is_rejected(tok):
    with pytest.raises(ValueError, match="image token"):
        build_request(normalize_messages(("look <image> here", IMG)), get_template("llava-v1"), tok)


def test_bad_image_fails_in_the_gateway(tok):
    with pytest.raises(ValueError, match="not found"):
        build_request(normalize_messages(("x", "/no/such.png")), get_template("llava-v1"), tok)
    with pytest.raises(ValueError, match="cannot decode"):
        build_request(normalize_messages(("x", b"garbage")), get_template("llava-v1"), tok)


def test_sampling_rides_along(tok):
    request = build_request(normalize_messages("hi"), get_template("llava-v1"), tok,
                            GenerationConfig(max_new_tokens=7, stop_token_ids=[9]))
    assert request.sampling.max_new_tokens == 7
    assert list(request.sampling.stop_token_ids) == [tok.eos_token_id, 9]  # '</s>' is one token
    assert request.request_id


def test_segments_split_at_every_image(tok):
    """Images first, side by side and last: each is its own segment, with its options, and
    the text between them goes whole."""
    messages = normalize_messages([{"role": "user", "content": [
        {"type": "text", "text": f"{IMAGE_TOKEN}{IMAGE_TOKEN} tiger {IMAGE_TOKEN}"},
        {"type": "image_url", "image_url": {"url": IMG, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": IMG2}},
        {"type": "image_url", "image_url": {"url": IMG, "detail": "high"}}]}])
    request = build_request(messages, RAW_TEMPLATE, tok)
    kinds = [s.WhichOneof("kind") for s in request.segments]
    assert kinds == ["text", "image", "image", "text", "image"]
    ids, _ = _flatten(request, tok.image_token_id)
    assert ids == tok.encode("<image><image> tiger <image>")
    images = [s.image.image for s in request.segments if s.WhichOneof("kind") == "image"]
    assert [dict(i.options) for i in images] == [{"detail": "low"}, {}, {"detail": "high"}]
    assert images[0].data == images[2].data and images[0].sha256 == images[2].sha256 != images[1].sha256
    assert all(hashlib.sha256(i.data).hexdigest() == i.sha256 for i in images)
