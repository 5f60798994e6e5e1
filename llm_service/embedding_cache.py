"""LRU cache of image embeddings, keyed by the image's sha256 (and processor options).

A multi-turn chat re-sends its images on every turn; a hit skips the vision tier
entirely, and the sha256 the sender claims is checked against the bytes it already
verified instead of hashed again. Shared by every caller of the engine, whatever
thread or event loop they run on, hence the locks.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from protos import common_pb2
from vision_service.types import ImageEmbedding


class VerifiedDigests:
    """sha256 digests computed lately, each with the bytes it was computed from. A re-sent
    image (every turn of a chat re-sends the conversation's images) is then checked against
    its claimed digest by comparing bytes instead of hashing them again (a 336 px image's
    340 kB: ~10 µs instead of ~210 µs). Equal bytes have equal digests, so the answer is
    the one hashing gives. Holds at most `max_bytes` of images, least recently used out first."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()  # digest -> the bytes it was computed from
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, data: bytes, claimed: str) -> bool:
        """Whether `claimed` was computed lately from these very bytes (then it counts as used
        again): `digest` then only compares."""
        with self._lock:
            seen = self._entries.get(claimed) if claimed else None
            if seen is not None:
                self._entries.move_to_end(claimed)
        return seen is not None and seen == data

    def digest(self, data: bytes, claimed: str = "") -> str:
        """sha256 hex digest of `data`; `claimed` (lower case) is what the sender said it is."""
        if self.known(data, claimed):
            return claimed
        digest = hashlib.sha256(data).hexdigest()
        if len(data) <= self.max_bytes:
            with self._lock:
                old = self._entries.pop(digest, None)
                self._bytes += len(data) - (len(old) if old is not None else 0)
                self._entries[digest] = data
                while self._bytes > self.max_bytes:
                    self._bytes -= len(self._entries.popitem(last=False)[1])
        return digest


_VERIFIED = VerifiedDigests()
_HASHING_THREADS = 4
_hashing: ThreadPoolExecutor | None = None
_hashing_lock = threading.Lock()


def _hashing_pool() -> ThreadPoolExecutor:
    global _hashing
    with _hashing_lock:
        if _hashing is None:
            _hashing = ThreadPoolExecutor(max_workers=_HASHING_THREADS, thread_name_prefix="image-sha256")
        return _hashing


async def image_keys(images: Sequence[common_pb2.ImageInput], datas: Sequence[bytes] | None = None) -> list[str]:
    """`image_key` of each image. Bytes not verified lately are hashed on a pool of their own,
    off the event loop: under a burst of new images (256 at once) each hash, which lets go of
    the GIL, held the loop ~1.5 ms, and the loop it held is the one that hands the requests
    ahead their finished vision embeddings. A re-sent image (compare, no hash) stays inline.
    `datas`: each image's bytes, already read (every read of a bytes field copies it)."""
    if datas is None:
        datas = [image.data for image in images]

    def keys() -> list[str]:
        return [image_key(image, data) for image, data in zip(images, datas)]

    if all(not data or _VERIFIED.known(data, image.sha256.lower()) for image, data in zip(images, datas)):
        return keys()
    return await asyncio.get_running_loop().run_in_executor(_hashing_pool(), keys)


def image_key(image: common_pb2.ImageInput, data: bytes | None = None) -> str:
    """The cache key of an image: its verified sha256 (computed when not given), plus its
    options when it has any (the same bytes processed differently embed differently).
    `data`: image.data already read. Raises ValueError when a given sha256 does not match the bytes."""
    given = image.sha256.lower()
    data = image.data if data is None else data
    if data:
        digest = _VERIFIED.digest(data, given)
        if given and given != digest:
            raise ValueError(f"image sha256 {image.sha256!r} does not match its bytes (sha256 {digest})")
    elif given:
        digest = given  # a reference to an image the cache may still hold
    else:
        raise ValueError("image has neither bytes nor a sha256")
    if image.options:
        digest += "|" + ";".join(f"{k}={v}" for k, v in sorted(image.options.items()))
    return digest


class EmbeddingCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = embedding
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
