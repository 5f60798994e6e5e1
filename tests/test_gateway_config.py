"""GenerationConfig: LMDeploy's defaults, our do_sample rule, validation, and what the
LLM tier receives; Response's LMDeploy-like repr."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gateway import GenerationConfig, Response
from gateway.tokenizer import Tokenizer


def test_lmdeploy_defaults_and_greedy():
    g = GenerationConfig()
    assert (g.n, g.max_new_tokens, g.top_p, g.top_k, g.min_p, g.temperature, g.repetition_penalty) == \
        (1, 512, 1.0, 50, 0.0, 0.8, 1.0)
    assert g.do_sample is False and g.skip_special_tokens and g.output_logits is None


@pytest.mark.parametrize("kwargs", [dict(top_k=40), dict(top_p=0.8), dict(temperature=0.6), dict(do_sample=True),
                                    dict(top_k=40, top_p=0.8, temperature=0.6)])
def test_sampling_params_turn_sampling_on(kwargs):
    assert GenerationConfig(**kwargs).do_sample is True


def test_explicit_do_sample_false_wins_and_replace_keeps_the_decision():
    assert GenerationConfig(top_k=40, do_sample=False).do_sample is False
    g = dataclasses.replace(GenerationConfig(), max_new_tokens=3)
    assert g.do_sample is False and g.top_k == 50
    assert dataclasses.replace(GenerationConfig(top_k=5), max_new_tokens=3).do_sample is True


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=2.5), "temperature"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(n=2), "n=2"), (dict(output_logits="all"), "'all'"),
    (dict(min_p=2.0), "min_p"), (dict(min_new_tokens=-1), "min_new_tokens"), (dict(stop_words="</s>"), "stop_words"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"), (dict(logprobs=5), "logprobs"),
])
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


@pytest.fixture(scope="module")
def tok(tiny_llava):
    return Tokenizer(tiny_llava)


def test_greedy_sampling_params(tok):
    p = GenerationConfig(repetition_penalty=1.3, max_new_tokens=None).to_sampling_params(tok, ["</s>"])
    assert (p.do_sample, p.top_k, p.temperature, p.repetition_penalty, p.max_new_tokens) == (False, 1, 1.0, 1.0, 0)
    assert list(p.stop_token_ids) == [2] and not p.HasField("random_seed")


def test_sampling_params_when_sampling(tok):
    g = GenerationConfig(top_k=40, top_p=0.5, temperature=0.6, random_seed=7, min_new_tokens=2,
                         stop_words=["</s>", " tiger", "not one token at all"], stop_token_ids=[5],
                         bad_words=["<image>"], bad_token_ids=[9], output_logits="generation")
    p = g.to_sampling_params(tok, ["</s>"])
    assert p.do_sample and p.top_k == 40 and p.random_seed == 7 and p.min_new_tokens == 2
    assert p.top_p == pytest.approx(0.5) and p.temperature == pytest.approx(0.6)
    tiger = tok.single_token_id(" tiger")
    assert tiger is not None and list(p.stop_token_ids) == [2, tiger, 5]
    assert sorted(p.bad_token_ids) == [3, 9] and p.output_logits == "generation"


def test_temperature_zero_is_greedy(tok):
    assert GenerationConfig(temperature=0.0).to_sampling_params(tok).do_sample is False


def test_ignore_eos_drops_template_stops(tok):
    p = GenerationConfig(ignore_eos=True, stop_token_ids=[5]).to_sampling_params(tok, ["</s>"])
    assert p.ignore_eos and list(p.stop_token_ids) == [5]


def test_bad_words_and_ids_checked_against_the_tokenizer(tok):
    with pytest.raises(ValueError, match="single token"):
        GenerationConfig(bad_words=["not a single token"]).to_sampling_params(tok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        GenerationConfig(stop_token_ids=[10**6]).to_sampling_params(tok)


def test_response_repr():
    r = Response(text="a tiger", generate_token_len=2, input_token_len=30, finish_reason="stop", token_ids=[5, 6],
                 logits=np.zeros((2, 4), dtype=np.float32))
    text = repr(r)
    assert text.startswith("text='a tiger'\n")
    for line in ("input_token_len=30", "generate_token_len=2", 'finish_reason="stop"', "token_ids=[5, 6]",
                 "logits.shape=(2, 4)"):
        assert line in text.splitlines()
    assert str(r) == text
