"""`prism demo`: the seed's hello-world, embedded and then through three separate processes.

The demo model is a tiny checkpoint with RANDOM weights built on the spot: the pipeline
runs for real, but the text it prints is gibberish by design.
"""
from __future__ import annotations

import functools
import http.server
import tempfile
import threading
from pathlib import Path

DEMO_IMAGE = "tiger.png"


def _serve_folder(folder: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _demo_image(folder: Path) -> None:
    """An orange-and-black striped picture standing in for the seed's tiger.jpeg."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 64), (230, 140, 40))
    draw = ImageDraw.Draw(image)
    for x in range(0, 96, 12):
        draw.polygon([(x, 0), (x + 5, 0), (x + 9, 64), (x + 4, 64)], fill=(20, 20, 20))
    image.save(folder / DEMO_IMAGE)


def _show(title: str, response) -> None:
    text = response.text if len(response.text) <= 160 else response.text[:160] + "..."
    print(f"\n{title}\n  text={text!r}\n  input_token_len={response.input_token_len} "
          f"generate_token_len={response.generate_token_len} finish_reason={response.finish_reason!r}")


def run_demo(model: str | None = None) -> None:
    from gateway import pipeline
    from gateway.tiers import start_tiers
    from gateway.tiny_checkpoints import build_tiny_llava
    from gateway.vl import load_image

    if model is None:
        model = str(build_tiny_llava())
        print(f"demo model: {model}\n  (a tiny LLaVA-1.5 with RANDOM weights: its answers are gibberish by design)")
    folder = Path(tempfile.mkdtemp(prefix="prism-demo-"))
    _demo_image(folder)
    server = _serve_folder(folder)
    url = f"http://127.0.0.1:{server.server_address[1]}/{DEMO_IMAGE}"
    try:
        # The seed's hello-world, with lmdeploy replaced by gateway.
        pipe = pipeline(model)
        image = load_image(url)
        response = pipe(("describe this image", image))
        _show("[embedded] pipeline(model)(('describe this image', image)):", response)
        pipe.close()

        print("\nstarting vision, llm and gateway as separate processes on 127.0.0.1 ...", flush=True)
        with start_tiers(model, log_dir=folder) as tiers:
            remote = pipeline(f"grpc://{tiers.gateway}")
            split = remote(("describe this image", image))
            _show(f"[split] pipeline('grpc://{tiers.gateway}')(('describe this image', image)):", split)
            remote.close()
        same = split.token_ids == response.token_ids
        print(f"\nembedded and split generated the same {len(split.token_ids)} tokens: {same}")
        print("\nservers stopped.")
    finally:
        server.shutdown()
        server.server_close()
