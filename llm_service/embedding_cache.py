"""LRU cache of image embeddings, keyed by the image's sha256 (and processor options).

A multi-turn chat re-sends its images on every turn; a hit skips the vision tier
entirely. Shared by every caller of the engine, whatever thread or event loop they
run on, hence the lock.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from protos import common_pb2
from vision_service.types import ImageEmbedding


def image_key(image: common_pb2.ImageInput) -> str:
    """The cache key of an image: its verified sha256 (computed when not given), plus its
    options when it has any (the same bytes processed differently embed differently).
    Raises ValueError when a given sha256 does not match the bytes."""
    given = image.sha256.lower()
    if image.data:
        digest = hashlib.sha256(image.data).hexdigest()
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
