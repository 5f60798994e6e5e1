"""Embeddings on the wire: serialized `EmbeddingChunk`s of whole rows, and back.

Every chunk repeats the header (rows, hidden size, dtype, grid), so a receiver can
allocate on the first chunk it sees and needs no other state. Payloads are raw
little-endian row-major bytes; bfloat16 travels as its 2-byte pattern (numpy has
no bfloat16, so the conversions reinterpret bytes in torch).

A 7B model's image is 4.7 MB of embedding, so the payload bytes are handled by hand
on both ends and copied once each: the sender writes the header fields through protobuf
and joins the payload in straight from the tensor (protobuf's way copies it three times:
`tobytes`, the message, the serialization); the receiver locates the payload in the bytes
gRPC hands it and copies it straight into the embedding's tensor (protobuf's way copies
it three times: the parse, the `data` field read, the reassembly). The bytes are the
same as `EmbeddingChunk.SerializeToString()`'s, so any protobuf client reads them.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from google.protobuf.message import DecodeError

from protos import vision_pb2
from protos.serving import CHUNK_BYTES
from vision_service.devices import DTYPES
from vision_service.types import ImageEmbedding

_NAMES = {v: k for k, v in DTYPES.items()}
_DATA = vision_pb2.EmbeddingChunk.DESCRIPTOR.fields_by_name["data"].number
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_DATA_KEY = _varint(_DATA << 3 | _LENGTH_DELIMITED)


def to_wire(index: int, emb: ImageEmbedding, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The serialized chunks (about `chunk_bytes` each, at least one row) of image `index`'s embedding."""
    t = emb.embedding.detach().to("cpu").contiguous()
    if t.dim() != 2 or t.dtype not in _NAMES:
        raise TypeError(f"embedding must be 2-D float32/float16/bfloat16, got {tuple(t.shape)} {t.dtype}")
    rows, hidden = t.shape
    raw = memoryview(t.view(torch.uint8).reshape(-1).numpy())  # flat, no copy
    row_bytes = hidden * t.element_size()
    per = max(1, chunk_bytes // max(1, row_bytes))
    # Fields in number order, as SerializeToString writes them: 1-5, the payload (6), the grid (7).
    tail = vision_pb2.EmbeddingChunk(grid_thw=list(emb.grid_thw or ())).SerializeToString()
    for start in range(0, max(rows, 1), per):  # an empty embedding still sends its header
        head = vision_pb2.EmbeddingChunk(image_index=index, rows=rows, hidden_size=hidden, dtype=_NAMES[t.dtype],
                                         row_offset=start).SerializeToString()
        payload = raw[start * row_bytes : (start + per) * row_bytes]
        data = (_DATA_KEY, _varint(payload.nbytes), payload) if payload else ()  # proto3 leaves an empty field out
        yield b"".join((head, *data, tail))


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise RuntimeError("malformed embedding chunk: bad varint")


def _data_fields(data: bytes) -> list[tuple[int, int, int]]:
    """(field start, payload start, payload end) of each `data` field, in order (protobuf keeps
    the last); walks the fields' keys and lengths, not the payload."""
    spans, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        kind = key & 7
        if kind == _VARINT:
            _, pos = _read_varint(data, pos)
        elif kind == _FIXED64:
            pos += 8
        elif kind == _FIXED32:
            pos += 4
        elif kind == _LENGTH_DELIMITED:
            size, pos = _read_varint(data, pos)
            if key >> 3 == _DATA:
                spans.append((start, pos, pos + size))
            pos += size
        else:
            raise RuntimeError(f"malformed embedding chunk: wire type {kind}")
    if pos != len(data):
        raise RuntimeError("malformed embedding chunk: truncated")
    return spans


def parse_chunk(data: bytes) -> tuple[vision_pb2.EmbeddingChunk, memoryview]:
    """A serialized chunk → its header fields (`data` left empty) and a view of its payload in `data`."""
    spans = _data_fields(data)
    cuts = [0] + [i for start, _, end in spans for i in (start, end)] + [len(data)]
    header = b"".join(data[cuts[i] : cuts[i + 1]] for i in range(0, len(cuts), 2))  # all but the payloads
    try:
        chunk = vision_pb2.EmbeddingChunk.FromString(header)
    except DecodeError as e:
        raise RuntimeError(f"malformed embedding chunk: {e}") from None
    return chunk, memoryview(data)[spans[-1][1] : spans[-1][2]] if spans else memoryview(b"")


class _Partial:
    """One image being reassembled, straight into the tensor it ends up as."""

    def __init__(self, chunk: vision_pb2.EmbeddingChunk):
        if chunk.dtype not in DTYPES:
            raise RuntimeError(f"unknown embedding dtype {chunk.dtype!r}")
        if chunk.rows < 0 or chunk.hidden_size < 1:
            raise RuntimeError(f"bad embedding shape {chunk.rows}x{chunk.hidden_size}")
        self.header = (chunk.rows, chunk.hidden_size, chunk.dtype, tuple(chunk.grid_thw))
        self.tensor = torch.empty(chunk.rows, chunk.hidden_size, dtype=DTYPES[chunk.dtype])
        self.row_bytes = chunk.hidden_size * self.tensor.element_size()
        self.bytes = self.tensor.view(torch.uint8).numpy().reshape(-1)  # a view: writes land in the tensor
        self.seen = bytearray(chunk.rows)  # 1 per received row, to catch gaps and overlaps

    def add(self, chunk: vision_pb2.EmbeddingChunk, payload: memoryview) -> None:
        if (chunk.rows, chunk.hidden_size, chunk.dtype, tuple(chunk.grid_thw)) != self.header:
            raise RuntimeError(f"image {chunk.image_index}: chunk header changed mid-stream")
        n, rest = divmod(payload.nbytes, self.row_bytes)
        start = chunk.row_offset
        if rest or start < 0 or start + n > self.header[0]:
            raise RuntimeError(f"image {chunk.image_index}: chunk at row {start} does not hold whole rows in range")
        if any(self.seen[start : start + n]):
            raise RuntimeError(f"image {chunk.image_index}: rows {start}..{start + n} received twice")
        self.seen[start : start + n] = b"\x01" * n
        # numpy copies without the GIL: the engine thread steps on meanwhile
        self.bytes[start * self.row_bytes : (start + n) * self.row_bytes] = np.frombuffer(payload, np.uint8)

    def finish(self) -> ImageEmbedding:
        rows, _, _, grid = self.header
        if not all(self.seen):
            raise RuntimeError(f"embedding incomplete: {sum(self.seen)} of {rows} rows received")
        return ImageEmbedding(self.tensor, tuple(grid) if grid else None)


class EmbeddingAssembler:
    """Collects the serialized chunks of `count` images, in any order, into ImageEmbeddings.
    A malformed stream (a server bug, not bad input) raises RuntimeError."""

    def __init__(self, count: int):
        self.count = count
        self._parts: dict[int, _Partial] = {}

    def add(self, data: bytes) -> None:
        chunk, payload = parse_chunk(data)
        if chunk.image_index >= self.count:
            raise RuntimeError(f"chunk for image {chunk.image_index}, but only {self.count} were sent")
        part = self._parts.get(chunk.image_index)
        if part is None:
            part = self._parts[chunk.image_index] = _Partial(chunk)
        part.add(chunk, payload)

    def finish(self) -> list[ImageEmbedding]:
        missing = [i for i in range(self.count) if i not in self._parts]
        if missing:
            raise RuntimeError(f"no embedding received for images {missing}")
        return [self._parts[i].finish() for i in range(self.count)]
