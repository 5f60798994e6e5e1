"""load_image from every source, and a clear ValueError for every way it can fail."""
from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from gateway.vl import load_image
from tests.conftest import make_image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.fixture(scope="module")
def picture():
    return make_image(7, size=(20, 12))


def test_pil_input_becomes_rgb(picture):
    assert load_image(picture) is picture
    grey = picture.convert("L")
    out = load_image(grey)
    assert out.mode == "RGB" and _same(out, grey)


def test_local_path_and_file_url(tmp_path, picture):
    path = tmp_path / "a b.png"  # a space, which file:// URLs percent-encode
    picture.save(path)
    assert _same(load_image(str(path)), picture)
    assert _same(load_image(path), picture)
    assert _same(load_image(path.as_uri()), picture)


def test_data_url(picture):
    url = "data:image/png;base64," + base64.b64encode(_png(picture)).decode()
    out = load_image(url)
    assert out.mode == "RGB" and _same(out, picture)


def test_http_url_on_loopback(image_server):
    base_url, folder = image_server
    out = load_image(f"{base_url}/img1.png")
    assert out.mode == "RGB" and _same(out, Image.open(folder / "img1.png"))


def test_jpeg_file(tmp_path, picture):
    path = tmp_path / "x.jpg"
    picture.save(path, format="JPEG")
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == picture.size


@pytest.mark.parametrize("source,match", [
    ("ftp://example.com/a.png", "unsupported image URL scheme 'ftp'"),
    ("data:image/png,abcd", "base64"),
    ("data:image/png;base64,@@@not-base64@@@", "corrupt base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "cannot decode"),
    ("/no/such/file.png", "not found"),
])
def test_bad_sources(source, match):
    with pytest.raises(ValueError, match=match):
        load_image(source)


def test_truncated_file(tmp_path, picture):
    path = tmp_path / "cut.png"
    path.write_bytes(_png(picture)[:60])
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(str(path))


def test_wrong_type():
    with pytest.raises(ValueError, match="int"):
        load_image(42)


def test_http_errors(image_server):
    base_url, _ = image_server
    with pytest.raises(ValueError, match="HTTP error 404"):
        load_image(f"{base_url}/missing.png")


def test_unreachable_url():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="cannot reach"):
        load_image(f"http://127.0.0.1:{port}/a.png")


def test_too_large(monkeypatch, image_server, tmp_path, picture):
    base_url, _ = image_server
    monkeypatch.setenv("PRISM_IMAGE_MAX_BYTES", "100")
    with pytest.raises(ValueError, match="too large"):
        load_image(f"{base_url}/img0.png")
    path = tmp_path / "big.png"
    picture.save(path)
    with pytest.raises(ValueError, match="too large"):
        load_image(str(path))
    with pytest.raises(ValueError, match="too large"):
        load_image("data:image/png;base64," + base64.b64encode(_png(picture)).decode())


class _Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.release.wait(5)  # never answers in time

    def log_message(self, *args):
        pass


def test_timeout(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.release = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PRISM_IMAGE_FETCH_TIMEOUT", "0.3")
    try:
        with pytest.raises(ValueError, match="timed out"):
            load_image(f"http://127.0.0.1:{server.server_address[1]}/a.png")
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
