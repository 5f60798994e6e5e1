"""Embeddings on the wire: split into `EmbeddingChunk`s of whole rows, and back.

Every chunk repeats the header (rows, hidden size, dtype, grid), so a receiver can
allocate on the first chunk it sees and needs no other state. Payloads are raw
little-endian row-major bytes; bfloat16 travels as its 2-byte pattern (numpy has
no bfloat16, so the conversions reinterpret bytes in torch).
"""
from __future__ import annotations

from typing import Iterator

import torch

from protos import vision_pb2
from protos.serving import CHUNK_BYTES
from vision_service.devices import DTYPES
from vision_service.types import ImageEmbedding

_NAMES = {v: k for k, v in DTYPES.items()}


def to_chunks(index: int, emb: ImageEmbedding, chunk_bytes: int = CHUNK_BYTES) -> Iterator[vision_pb2.EmbeddingChunk]:
    """The chunks (about `chunk_bytes` each, at least one row) of image `index`'s embedding."""
    t = emb.embedding.detach().to("cpu").contiguous()
    if t.dim() != 2 or t.dtype not in _NAMES:
        raise TypeError(f"embedding must be 2-D float32/float16/bfloat16, got {tuple(t.shape)} {t.dtype}")
    rows, hidden = t.shape
    raw = t.view(torch.uint8).numpy()  # [rows, hidden * itemsize]
    per = max(1, chunk_bytes // max(1, raw.shape[1]))
    header = dict(
        image_index=index, rows=rows, hidden_size=hidden, dtype=_NAMES[t.dtype], grid_thw=list(emb.grid_thw or ())
    )
    for start in range(0, max(rows, 1), per):  # an empty embedding still sends its header
        yield vision_pb2.EmbeddingChunk(row_offset=start, data=raw[start : start + per].tobytes(), **header)


class _Partial:
    """One image being reassembled."""

    def __init__(self, chunk: vision_pb2.EmbeddingChunk):
        if chunk.dtype not in DTYPES:
            raise RuntimeError(f"unknown embedding dtype {chunk.dtype!r}")
        if chunk.rows < 0 or chunk.hidden_size < 1:
            raise RuntimeError(f"bad embedding shape {chunk.rows}x{chunk.hidden_size}")
        self.header = (chunk.rows, chunk.hidden_size, chunk.dtype, tuple(chunk.grid_thw))
        self.row_bytes = chunk.hidden_size * DTYPES[chunk.dtype].itemsize
        self.data = bytearray(chunk.rows * self.row_bytes)
        self.seen = bytearray(chunk.rows)  # 1 per received row, to catch gaps and overlaps

    def add(self, chunk: vision_pb2.EmbeddingChunk) -> None:
        if (chunk.rows, chunk.hidden_size, chunk.dtype, tuple(chunk.grid_thw)) != self.header:
            raise RuntimeError(f"image {chunk.image_index}: chunk header changed mid-stream")
        n, rest = divmod(len(chunk.data), self.row_bytes)
        start = chunk.row_offset
        if rest or start < 0 or start + n > self.header[0]:
            raise RuntimeError(f"image {chunk.image_index}: chunk at row {start} does not hold whole rows in range")
        if any(self.seen[start : start + n]):
            raise RuntimeError(f"image {chunk.image_index}: rows {start}..{start + n} received twice")
        self.seen[start : start + n] = b"\x01" * n
        self.data[start * self.row_bytes : (start + n) * self.row_bytes] = chunk.data

    def finish(self) -> ImageEmbedding:
        rows, hidden, dtype, grid = self.header
        if not all(self.seen):
            raise RuntimeError(f"embedding incomplete: {sum(self.seen)} of {rows} rows received")
        if rows == 0:
            t = torch.empty(0, hidden, dtype=DTYPES[dtype])
        else:
            t = torch.frombuffer(self.data, dtype=DTYPES[dtype]).view(rows, hidden)
        return ImageEmbedding(t, tuple(grid) if grid else None)


class EmbeddingAssembler:
    """Collects the chunks of `count` images, in any order, into ImageEmbeddings.
    A malformed stream (a server bug, not bad input)
    raises RuntimeError."""

    def __init__(self, count: int):
        self.count = count
        self._parts: dict[int, _Partial] = {}

    def add(self, chunk: vision_pb2.EmbeddingChunk) -> None:
        if chunk.image_index >= self.count:
            raise RuntimeError(f"chunk for image {chunk.image_index}, but only {self.count} were sent")
        part = self._parts.get(chunk.image_index)
        if part is None:
            part = self._parts[chunk.image_index] = _Partial(chunk)
        part.add(chunk)

    def finish(self) -> list[ImageEmbedding]:
        missing = [i for i in range(self.count) if i not in self._parts]
        if missing:
            raise RuntimeError(f"no embedding received for images {missing}")
        return [self._parts[i].finish() for i in range(self.count)]
