"""Shared fixtures: the tiny checkpoint (built once per session) and a loopback HTTP image server."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from gateway.tiny_checkpoints import build_tiny_llava


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny random LLaVA-1.5 checkpoint (llava-hf layout), fp32."""
    return build_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-1.5-hf")


def make_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB"):
    """A deterministic random-noise PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    pixels = (rng.rand(size[1], size[0], 3) * 255).astype("uint8")
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="session")
def image_server(tmp_path_factory):
    """Serves a folder of PNGs on 127.0.0.1; yields (base_url, folder)."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(4):
        make_image(100 + i, size=(40 + 8 * i, 36 + 4 * i)).save(folder / f"img{i}.png")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def embedded(tiny_llava):
    """The embedded pipeline over the tiny checkpoint, one per test module."""
    from gateway import pipeline

    with pipeline(str(tiny_llava)) as pipe:
        yield pipe


@pytest.fixture(scope="session")
def split_tiers(tiny_llava, tmp_path_factory):
    """vision, llm and gateway as three processes on loopback, shared by the session's tests."""
    from gateway.tiers import start_tiers

    with start_tiers(str(tiny_llava), vision_args=["--device", "cpu", "--vision-max-batch-size", "4"],
                     llm_args=["--device", "cpu"], log_dir=tmp_path_factory.mktemp("tiers")) as tiers:
        yield tiers


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
