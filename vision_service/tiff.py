"""Plain RGB TIFFs, read without PIL's TIFF parser.

The gateway sends RGB PIL images as uncompressed TIFF: a header, one IFD and the pixels
in one strip. PIL parses that IFD in Python, under the GIL, for 0.3 ms an image, which
is most of the image path. Those files are recognised here (a whitelist of tags with
the only values that mean "8-bit RGB, uncompressed, chunky, one strip", plus metadata
PIL does not apply to the pixels) and their pixels handed to PIL directly; anything
else returns None and PIL decodes it as before.
"""
from __future__ import annotations

import struct

import numpy as np
from PIL import Image

_ENTRY = np.dtype([("tag", "<u2"), ("type", "<u2"), ("count", "<u4"), ("value", "<u4")])
_SHORT, _LONG = 3, 4
# tag -> the value it must have (None: any); every tag of the IFD must be listed here
_ALLOWED: dict[int, int | None] = {
    256: None,  # ImageWidth
    257: None,  # ImageLength
    258: None,  # BitsPerSample: checked apart (three values)
    259: 1,  # Compression: none
    262: 2,  # PhotometricInterpretation: RGB
    273: None,  # StripOffsets
    277: 3,  # SamplesPerPixel
    278: None,  # RowsPerStrip
    279: None,  # StripByteCounts
    284: 1,  # PlanarConfiguration: chunky
}
_REQUIRED = {256, 257, 258, 262, 273, 277, 279}
# tags PIL keeps as metadata without touching the pixels: description, resolution, software, ICC profile
_METADATA = {270, 282, 283, 296, 305, 34675}


def plain_rgb_tiff(data: bytes, max_pixels: int) -> Image.Image | None:
    """The RGB image in `data` if it is a little-endian, single-page, single-strip,
    uncompressed 8-bit RGB TIFF of at most `max_pixels`; else None."""
    if len(data) < 8 or data[:4] != b"II*\x00":
        return None
    (ifd,) = struct.unpack_from("<I", data, 4)
    if ifd + 2 > len(data):
        return None
    (count,) = struct.unpack_from("<H", data, ifd)
    end = ifd + 2 + count * _ENTRY.itemsize
    if end + 4 > len(data) or struct.unpack_from("<I", data, end)[0] != 0:  # truncated, or more pages
        return None
    entries = np.frombuffer(data, _ENTRY, count, ifd + 2)
    tags: dict[int, int] = {}
    for tag, kind, n, value in entries.tolist():
        if tag in _METADATA:
            continue
        if tag not in _ALLOWED or tag in tags or kind not in (_SHORT, _LONG):
            return None
        if tag == 258:  # three SHORTs stored elsewhere
            if kind != _SHORT or n != 3 or value + 6 > len(data) or struct.unpack_from("<3H", data, value) != (8, 8, 8):
                return None
        elif n != 1:
            return None
        tags[tag] = value & 0xFFFF if kind == _SHORT else value
    if not _REQUIRED <= tags.keys() or any(v is not None and tags.get(t, v) != v for t, v in _ALLOWED.items()):
        return None
    width, height, offset = tags[256], tags[257], tags[273]
    size = width * height * 3
    if not 0 < width * height <= max_pixels or tags[279] != size or offset + size > len(data):
        return None
    if tags.get(278, height) < height:  # the one strip would not hold every row
        return None
    return Image.frombuffer("RGB", (width, height), memoryview(data)[offset : offset + size], "raw", "RGB", 0, 1)
