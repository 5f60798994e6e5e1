"""The torch-free tokenizer equals transformers' on the tiny checkpoint; streamed
detokenization adds up to a full decode; string stop words cut the stream."""
from __future__ import annotations

import json
import random

import pytest

from gateway.detokenize import IncrementalDetokenizer, StopStrings
from gateway.tokenizer import Tokenizer

TEXTS = ["describe this image", "USER: <image>\nWhat is the woman doing? ASSISTANT:", "héllo 你好 🐯 tiger </s> x",
         "  spaces\tand\nnewlines  ", ""]


@pytest.fixture(scope="module")
def tok(tiny_llava):
    return Tokenizer(tiny_llava)


@pytest.fixture(scope="module")
def hf_tok(tiny_llava):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llava))


def test_special_ids(tok, hf_tok):
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.eos_token_ids == [hf_tok.eos_token_id] == [2]
    assert tok.image_token_id == 3 and tok.image_token == "<image>"
    assert tok.vocab_size == len(hf_tok)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_like_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_prompt_starting_with_bos_gets_no_second_bos(tok):
    assert tok.encode_prompt("<s>hi") == tok.encode("hi")
    assert tok.encode_prompt("hi") == tok.encode("hi")


def test_generation_config_eos_ids_are_added(tmp_path, tiny_llava):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_llava, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer(folder).eos_token_ids == [2, 7]


def _stream(tok, ids, chunk_sizes, skip=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces, i = [], 0
    for size in chunk_sizes:
        pieces.append(detok.step(ids[i:i + size]))
        i += size
    pieces.append(detok.finish())
    return pieces


@pytest.mark.parametrize("skip", [True, False])
def test_streaming_equals_full_decode(tok, skip):
    rng = random.Random(0)
    text = "héllo 你好 🐯 tiger </s> the quick brown fox 😀 ok"
    ids = tok.encode(text, add_special_tokens=False)
    for _ in range(20):
        sizes = [rng.randint(1, 3) for _ in range(len(ids))]
        pieces = _stream(tok, ids, sizes, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)


def test_split_multibyte_char_waits_for_its_last_byte(tok):
    ids = tok.encode("🐯", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji over several tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.step([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.step(ids[-1:]) == "🐯"


def test_random_ids_stream_to_full_decode(tok):
    rng = random.Random(1)
    for _ in range(10):
        ids = [rng.randrange(4, tok.vocab_size) for _ in range(30)]
        assert "".join(_stream(tok, ids, [1] * len(ids))) == tok.decode(ids)


def _feed(stops: StopStrings, pieces):
    out = [stops.feed(p) for p in pieces]
    return "".join(out) + stops.flush(), out


def test_stop_string_split_across_pieces():
    stops = StopStrings(["STOP"])
    text, out = _feed(stops, ["abc S", "TO", "P tail"])
    assert text == "abc " and stops.stopped
    assert out[0] == "abc "  # 'S' was held back


def test_stop_string_included_on_request():
    stops = StopStrings(["STOP"], include_stop_str=True)
    assert _feed(stops, ["xx ST", "OPyy"])[0] == "xx STOP"


def test_held_back_text_is_released_when_no_stop_follows():
    stops = StopStrings(["STOP"])
    text, out = _feed(stops, ["a ST", "x", "b S"])
    assert text == "a STxb S" and not stops.stopped
    assert out == ["a ", "STx", "b "]


def test_earliest_stop_wins():
    stops = StopStrings(["world", "lo"])
    assert _feed(stops, ["hello world"])[0] == "hel"
