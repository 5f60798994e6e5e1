"""Every prompt form LMDeploy's pipeline accepts → OpenAI messages → an LLM request.

Forms: `str`; `(text, image)`, `(text, [images])`, `(image(s), text)`; one OpenAI
message list; and a list of any of these, which is a batch (a list whose items are
all message dicts is one conversation, anything else is a batch). Images are PIL
images, http(s) / data URLs, local paths / file:// URLs or encoded bytes.

`build_request` renders the template, swaps each IMAGE_TOKEN for the model's image
token, tokenizes the whole prompt once (so the ids are what the HF processor produces
before it expands each image token) and splits the ids at the image token into text
and image segments. It loads images, so call it off the event loop.
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
import weakref
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from gateway.config import GenerationConfig
from gateway.templates import IMAGE_PART_TYPES, ROLES, ChatTemplate
from gateway.tokenizer import Tokenizer
from gateway.vl.constants import IMAGE_TOKEN
from gateway.vl.image import describe, encode_lossless, probe_image, read_image_bytes
from protos import common_pb2, llm_pb2

_URL_PREFIXES = ("http://", "https://", "data:", "file://")
_REMOTE_PREFIXES = ("http://", "https://")
_LOADERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="prism-image")


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, bytes)) or (isinstance(x, str) and x.startswith(_URL_PREFIXES))


def _image_part(source, options: dict | None = None) -> dict:
    if not isinstance(source, (str, os.PathLike, bytes, Image.Image)):
        raise ValueError(f"an image must be a PIL image, URL, data URL, path or bytes, got {type(source).__name__}")
    return {"type": "image_url", "image_url": {"url": source, **(options or {})}}


def _from_tuple(prompt: tuple) -> list[dict]:
    if len(prompt) != 2:
        raise ValueError(f"a tuple prompt is (text, image(s)) or (image(s), text), got {len(prompt)} items")
    first, second = prompt
    if isinstance(first, str) and not _is_image(first):
        text, images = first, second
    elif isinstance(second, str):
        images, text = first, second
    else:
        raise ValueError("a tuple prompt needs a text item: (text, image(s)) or (image(s), text)")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    content = [{"type": "text", "text": text}] + [_image_part(image) for image in images]
    return [{"role": "user", "content": content}]


def _normalize_part(part) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict) or "type" not in part:
        raise ValueError(f"a content part must be a dict with a 'type', got {part!r:.80}")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError("a text part needs a 'text' string")
        return {"type": "text", "text": part["text"]}
    if kind not in IMAGE_PART_TYPES:
        raise ValueError(f"unsupported content part type {kind!r}; expected 'text' or one of {IMAGE_PART_TYPES}")
    body = part.get(kind)
    if kind == "image" and body is None:  # {'type': 'image', 'image': ...} or {'type': 'image', 'url': ...}
        body = {k: v for k, v in part.items() if k != "type"}
    if isinstance(body, dict):
        body = dict(body)
        source = body.pop("url", None) if kind != "image_data" else body.pop("data", None)
        if source is None:
            source = body.pop("image", None)
        if source is None:
            raise ValueError(f"the {kind!r} part has no image ('url' or 'data')")
        return _image_part(source, body)
    return _image_part(body)


def _normalize_message(message) -> dict:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"a message must be a dict with 'role' and 'content', got {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"unsupported role {role!r}; expected one of {ROLES}")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message content must be a str or a list of parts, got {type(content).__name__}")
    return {"role": role, "content": [_normalize_part(p) for p in content]}


def normalize_messages(prompt) -> list[dict]:
    """One prompt (not a batch) → OpenAI messages with canonical parts: text parts and
    {'type': 'image_url', 'image_url': {'url': source, **options}}."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, tuple):
        return _from_tuple(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return [_normalize_message(m) for m in prompt]
    raise ValueError(f"unsupported prompt {prompt!r:.80}: use a str, a (text, image) tuple or OpenAI messages")


def normalize_prompts(prompts) -> tuple[list[list[dict]], bool]:
    """(conversations, is_batch) for anything the pipeline accepts."""
    if isinstance(prompts, list):
        if not prompts:
            raise ValueError("empty prompt list")
        if all(isinstance(p, dict) for p in prompts):
            return [normalize_messages(prompts)], False
        if any(isinstance(p, dict) for p in prompts):
            raise ValueError("a prompt list mixes message dicts with other prompts")
        return [normalize_messages(p) for p in prompts], True
    return [normalize_messages(prompts)], False


def image_parts(messages: list[dict]) -> list[dict]:
    """The image parts in prompt order (messages, then parts) — the IMAGE_TOKEN order."""
    return [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] in IMAGE_PART_TYPES]


def fetches_images(messages: list[dict]) -> bool:
    """Whether preparing these messages waits on the network (http(s) image URLs)."""
    return any(isinstance(p["image_url"]["url"], str) and p["image_url"]["url"].startswith(_REMOTE_PREFIXES)
               for p in image_parts(messages))


@dataclass
class _Encoded:
    image: weakref.ref
    size: tuple[int, int]
    mode: str
    crc: int  # of the pixels (and palette, transparency): an image edited in place is encoded again
    data: bytes
    sha256: str


class EncodedImages:
    """PIL images already encoded, by object: a chat re-sends the same image object every
    turn, and then costs a CRC of its pixels instead of an encode and a sha256. An entry
    goes with its image (weak reference); the least recently used go past `max_bytes`."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Encoded] = OrderedDict()  # id(image) -> encoding
        self._bytes = 0
        self._lock = threading.RLock()  # images are encoded on the loader threads; GC may call _drop anywhere

    def encode(self, image: Image.Image) -> tuple[bytes, str]:
        """(encoded bytes, their sha256)."""
        crc = _fingerprint(image)
        key = id(image)
        with self._lock:
            hit = self._entries.get(key)
            if hit and hit.image() is image and (hit.size, hit.mode, hit.crc) == (image.size, image.mode, crc):
                self._entries.move_to_end(key)
                return hit.data, hit.sha256
        data = encode_lossless(image)
        entry = _Encoded(weakref.ref(image, lambda _: self._drop(key)), image.size, image.mode, crc, data,
                         hashlib.sha256(data).hexdigest())
        with self._lock:
            self._remove(key)
            self._entries[key] = entry
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._entries:
                self._remove(next(iter(self._entries)))
        return entry.data, entry.sha256

    def _drop(self, key: int) -> None:
        with self._lock:
            self._remove(key)

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.data)


def _fingerprint(image: Image.Image) -> int:
    crc = zlib.crc32(image.tobytes())
    if image.palette is not None:
        crc = zlib.crc32(bytes(image.getpalette() or ()), crc)
    return zlib.crc32(repr(image.info.get("transparency")).encode(), crc)


_ENCODED = EncodedImages()


def _encoded(source) -> tuple[bytes, str]:
    if isinstance(source, Image.Image):
        return _ENCODED.encode(source)
    data = source if isinstance(source, bytes) else read_image_bytes(source)
    probe_image(data, describe(source))
    return data, hashlib.sha256(data).hexdigest()


def encode_image(source) -> common_pb2.ImageInput:
    """Encoded bytes and their sha256: the original file for URLs, data URLs, paths and
    bytes, a lossless encoding for PIL images. Of the original files only the header is read
    here (what is no image fails now, naming its source); the vision tier decodes the pixels
    and rejects corrupt ones itself, so they are not decoded twice."""
    data, sha256 = _encoded(source)
    return common_pb2.ImageInput(data=data, sha256=sha256)


def _options(part: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in part["image_url"].items() if k != "url"}


def load_images(parts: list[dict]) -> list[tuple[bytes, str]]:
    """(bytes, sha256) of each image (see encode_image), several side by side (URLs may be slow)."""
    sources = [p["image_url"]["url"] for p in parts]
    return list(_LOADERS.map(_encoded, sources)) if len(sources) > 1 else [_encoded(s) for s in sources]


def build_request(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer,
                  gen_config: GenerationConfig | None = None, request_id: str | None = None) -> llm_pb2.GenerateRequest:
    """Render, tokenize and segment one conversation (already normalized)."""
    gen_config = gen_config or GenerationConfig()
    sampling = gen_config.to_sampling_params(tokenizer, template.stop_words or [])
    prompt = template.messages2prompt(messages)
    parts = image_parts(messages)
    if prompt.count(IMAGE_TOKEN) != len(parts):
        raise ValueError(f"the rendered prompt has {prompt.count(IMAGE_TOKEN)} image placeholders "
                         f"for {len(parts)} image(s)")
    if parts and tokenizer.image_token_id is None:
        raise ValueError("this model has no image token: it cannot take images")
    if parts:
        prompt = prompt.replace(IMAGE_TOKEN, tokenizer.image_token)
    ids = tokenizer.encode_prompt(prompt)
    image_id = tokenizer.image_token_id
    if image_id is not None and ids.count(image_id) != len(parts):
        raise ValueError(f"the prompt text contains the model's image token {tokenizer.image_token!r}; "
                         f"mark images with {IMAGE_TOKEN} or image parts instead")
    images = load_images(parts)
    request = llm_pb2.GenerateRequest(request_id=request_id or uuid.uuid4().hex, sampling=sampling)
    start = 0
    for (data, sha256), part in zip(images, parts):  # the text between image ids goes as slices
        at = ids.index(image_id, start)
        if at > start:
            request.segments.add().text.token_ids.extend(ids[start:at])
        image = request.segments.add().image.image  # filled in place: the bytes are copied once
        image.data, image.sha256 = data, sha256
        image.options.update(_options(part))
        start = at + 1
    if start < len(ids):
        request.segments.add().text.token_ids.extend(ids[start:])
    return request
