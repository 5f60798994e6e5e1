"""Image sources → bytes or RGB PIL images, under a time and size limit.

A source is an http(s) URL, a `data:<mime>;base64,...` URL, a local path or `file://`
URL, raw encoded bytes, or a PIL image. Every failure is a ValueError that says what
went wrong, so servers can answer INVALID_ARGUMENT instead of hanging or crashing.
Loopback URLs are allowed on purpose: tests and demos serve images from 127.0.0.1.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Union

from PIL import Image

ImageSource = Union[str, os.PathLike, bytes, Image.Image]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_MAX_REDIRECTS = 3


def fetch_timeout() -> float:
    return float(os.environ.get("PRISM_IMAGE_FETCH_TIMEOUT", "10"))


def max_image_bytes() -> int:
    return int(os.environ.get("PRISM_IMAGE_MAX_BYTES", str(20 << 20)))


def describe(source: ImageSource) -> str:
    """A short name of a source for error messages (data URLs are not echoed whole)."""
    if isinstance(source, Image.Image):
        return f"PIL image {source.size[0]}x{source.size[1]} {source.mode}"
    if isinstance(source, bytes):
        return f"{len(source)} bytes of image data"
    text = os.fspath(source)
    return text[:48] + "..." if len(text) > 64 else text


def read_image_bytes(source: str | os.PathLike) -> bytes:
    """The encoded file bytes behind a URL, data URL or path (not decoded)."""
    text = os.fspath(source)
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else ""  # 'C:' is a drive
    if scheme in ("http", "https"):
        return _fetch_url(text)
    if scheme == "data":
        return _decode_data_url(text)
    if scheme == "file":
        return _read_file(urllib.request.url2pathname(urllib.parse.urlparse(text).path))
    if scheme and text[len(scheme) + 1:].startswith("//"):
        raise ValueError(f"unsupported image URL scheme {scheme!r} in {describe(text)}: use http(s), data or file")
    return _read_file(text)


def decode_image(data: bytes, what: str = "image data") -> Image.Image:
    """Decode encoded bytes fully (truncated or corrupt files fail here, not later)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large in pixels ({what}): {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image from {what}: {err}") from None
    return image


def encode_png(image: Image.Image) -> bytes:
    """Lossless, fast (compress level 1) encoding of an in-memory image for the wire;
    the mode is kept when PNG can hold it, so the vision tier converts as HF would."""
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_lossless(image: Image.Image) -> bytes:
    """Bytes for the wire that decode to exactly these pixels. Uncompressed TIFF when it
    holds the image whole (RGB, RGBA or L without a transparency key, up to 64 MiB): it
    encodes and decodes in well under a millisecond, where PNG's filters and deflate cost
    milliseconds per megapixel on both ends. PNG for everything else."""
    raw_bytes = image.width * image.height * len(image.getbands())
    if image.mode in ("RGB", "RGBA", "L") and "transparency" not in image.info and raw_bytes <= 64 << 20:
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
        return buffer.getvalue()
    return encode_png(image)


def probe_image(data: bytes, what: str = "image data") -> None:
    """Read only the header: rejects bytes that are no image, naming their source, for the
    cost of parsing a few hundred bytes. The pixels are decoded (and checked) where they are
    used, by the vision tier."""
    try:
        Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large in pixels ({what}): {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image from {what}: {err}") from None


def load_image(image: ImageSource) -> Image.Image:
    """Load an image from any supported source and return it as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, bytes):
        data, what = _check_size(image, "image bytes"), describe(image)
    elif isinstance(image, (str, os.PathLike)):
        data, what = read_image_bytes(image), describe(image)
    else:
        raise ValueError(f"cannot load an image from a {type(image).__name__}: pass a URL, data URL, path or PIL image")
    return decode_image(data, what).convert("RGB")


def _check_size(data: bytes, what: str) -> bytes:
    if len(data) > max_image_bytes():
        raise ValueError(f"image too large: {what} is {len(data)} bytes, the limit is {max_image_bytes()} "
                         "(PRISM_IMAGE_MAX_BYTES)")
    return data


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow at most a few redirects, and only to http(s)."""

    max_redirections = _MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise ValueError(f"image URL {req.full_url} redirects to a non-http URL {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_Redirects)


def _fetch_url(url: str) -> bytes:
    limit, timeout = max_image_bytes(), fetch_timeout()
    request = urllib.request.Request(url, headers={"User-Agent": "prism-gateway"})
    try:
        with _OPENER.open(request, timeout=timeout) as reply:
            length = reply.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise ValueError(f"image too large: {url} is {length} bytes, the limit is {limit} (PRISM_IMAGE_MAX_BYTES)")
            data = reply.read(limit + 1)
    except urllib.error.HTTPError as err:
        raise ValueError(f"HTTP error {err.code} ({err.reason}) fetching image {url}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (socket.timeout, TimeoutError)):
            raise ValueError(f"timed out after {timeout:g}s fetching image {url}") from None
        raise ValueError(f"cannot reach image URL {url}: {err.reason}") from None
    except (socket.timeout, TimeoutError):
        raise ValueError(f"timed out after {timeout:g}s fetching image {url}") from None
    except (OSError, http.client.HTTPException) as err:
        raise ValueError(f"failed fetching image {url}: {err}") from None
    if len(data) > limit:
        raise ValueError(f"image too large: {url} is over {limit} bytes (PRISM_IMAGE_MAX_BYTES)")
    return data


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ValueError("unsupported data URL: only data:<mime>;base64,<payload> is accepted")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_image_bytes():
        raise ValueError(f"image too large: the data URL holds about {len(payload) * 3 // 4} bytes, "
                         f"the limit is {max_image_bytes()} (PRISM_IMAGE_MAX_BYTES)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"corrupt base64 in data URL: {err}") from None


def _read_file(path: str) -> bytes:
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {describe(path)}")
    size = os.path.getsize(path)
    if size > max_image_bytes():
        raise ValueError(f"image too large: {path} is {size} bytes, the limit is {max_image_bytes()} "
                         "(PRISM_IMAGE_MAX_BYTES)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"cannot read image file {path}: {err}") from None
