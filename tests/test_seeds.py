"""Every example of the seed docs (LMDeploy's VLM pipeline docs) runs with `lmdeploy`
replaced by `gateway`, adapted only in model path and image URLs: the model is the tiny
checkpoint and the images come from a loopback HTTP server."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import make_image

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"
_CJK = re.compile(r"[\u3000-\u9fff\uff00-\uffef]")


def _examples_from_markdown(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _examples_from_plain(text: str) -> list[str]:
    """Code runs from a line starting 'from lmdeploy' up to the next line of Chinese prose."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("from lmdeploy"):
            if current and not current[-1].startswith("from lmdeploy"):
                blocks.append("\n".join(current))
                current = None
            current = (current or []) + [line]
        elif current is not None:
            if _CJK.search(line):
                blocks.append("\n".join(current))
                current = None
            else:
                current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def seed_examples() -> list[tuple[str, str]]:
    files = sorted(SEEDS.glob("*.txt"))
    assert files, f"no seed docs found in {SEEDS}"
    examples = []
    for path in files:
        text = path.read_text()
        blocks = _examples_from_markdown(text) if "```python" in text else _examples_from_plain(text)
        examples += [(f"{path.stem}[{i}]", block) for i, block in enumerate(blocks)]
    return examples


EXAMPLES = seed_examples()


def adapt(code: str, model: str, base_url: str) -> str:
    code = code.replace("lmdeploy", "gateway")
    code = re.sub(r"pipeline\(\s*'[^']*'", f"pipeline({model!r}", code)
    return re.sub(r"https://raw\.githubusercontent\.com/[^'\"]*/([^/'\"]+)", lambda m: f"{base_url}/{m.group(1)}", code)


def test_examples_were_found():
    assert len(EXAMPLES) >= 15
    assert all("pipeline(" in code for _, code in EXAMPLES)


@pytest.fixture(scope="module")
def seed_images(image_server):
    base_url, folder = image_server
    for i, name in enumerate(["tiger.jpeg", "human-pose.jpg", "det.jpg"]):
        make_image(200 + i, size=(64, 48)).save(folder / name, format="JPEG")
    return base_url


@pytest.mark.parametrize("name,code", EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_seed_example_runs(name, code, tiny_llava, seed_images, capsys):
    namespace: dict = {}
    try:
        exec(compile(adapt(code, str(tiny_llava), seed_images), name, "exec"), namespace)
    finally:
        pipe = namespace.get("pipe")
        if pipe is not None:
            pipe.close()
    printed = capsys.readouterr().out
    assert printed.strip(), f"{name} printed nothing"
    response = namespace.get("response")
    sess = namespace.get("sess")
    if response is not None:
        responses = response if isinstance(response, list) else [response]
        assert all(r.generate_token_len > 0 and isinstance(r.text, str) for r in responses)
        assert all(r.finish_reason in ("stop", "length") for r in responses)
    else:
        assert sess is not None and sess.response.generate_token_len > 0
