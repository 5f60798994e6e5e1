"""`prism serve all` and `prism chat`, as a user runs them, plus the generated stubs."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gateway import GenerationConfig, pipeline
from gateway.tiers import start_tier
from tests.conftest import make_image

CHAT_TOKENS = 6


@pytest.fixture(scope="module")
def serve_all(tiny_llava, tmp_path_factory):
    tier = start_tier("all", ["--model", str(tiny_llava), "--device", "cpu"], tmp_path_factory.mktemp("all"))
    yield tier
    if tier.process.poll() is None:
        tier.process.terminate()
        tier.process.wait(timeout=30)


def test_serve_all_answers_like_embedded_and_stops_on_sigterm(serve_all, tiny_llava):
    image = make_image(30)
    gen = GenerationConfig(max_new_tokens=8)
    with pipeline(str(tiny_llava)) as embedded:
        expected = embedded(("describe this image", image), gen_config=gen)
    with pipeline(f"grpc://{serve_all.target}") as remote:
        got = remote(("describe this image", image), gen_config=gen)
    assert got.token_ids == expected.token_ids and got.generate_token_len > 0
    serve_all.process.terminate()
    assert serve_all.process.wait(timeout=30) == 0


@pytest.mark.parametrize("where", ["embedded", "grpc"])
def test_chat_two_turns_with_an_image(where, tiny_llava, tmp_path, request):
    image_path = tmp_path / "cat.png"
    make_image(31).save(image_path)
    target = str(tiny_llava)
    if where == "grpc":
        tier = start_tier("all", ["--model", str(tiny_llava), "--device", "cpu"], Path(tempfile.mkdtemp()))
        request.addfinalizer(lambda: (tier.process.terminate(), tier.process.wait(timeout=30)))
        target = f"grpc://{tier.target}"
    stdin = f"/image {image_path}\ndescribe this image\nWhat is it doing?\n/exit\n"
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "chat", target, "--max-new-tokens", str(CHAT_TOKENS)],
                         input=stdin, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    with pipeline(str(tiny_llava)) as pipe:
        gen = GenerationConfig(max_new_tokens=CHAT_TOKENS)
        sess = pipe.chat(("describe this image", make_image_from(image_path)), gen_config=gen)
        first = sess.response.text
        second = pipe.chat("What is it doing?", session=sess, gen_config=gen).response.text
    assert first + "\n" in out.stdout and second + "\n" in out.stdout.split(first, 1)[1]


def make_image_from(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_generated_stubs_match_the_protos(tmp_path):
    from grpc_tools import protoc

    import protos

    here = Path(protos.__file__).parent
    names = ["common", "vision", "llm", "gateway"]
    args = ["protoc", f"-I{here.parent}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    assert protoc.main(args + [str(here / f"{n}.proto") for n in names]) == 0
    for n in names:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            assert (tmp_path / "protos" / f"{n}{suffix}").read_text() == (here / f"{n}{suffix}").read_text()
