"""The embedded pipeline prepares (renders, tokenizes, loads the images of) a lone
conversation on the calling thread, which would only wait otherwise, and a batch's on the
loop's executor, side by side; results and errors are the same either way."""
from __future__ import annotations

import threading

import pytest

from gateway import GenerationConfig
from gateway.vl.constants import IMAGE_TOKEN
from tests.conftest import make_image


def test_a_lone_conversation_is_prepared_on_the_calling_thread(embedded, monkeypatch):
    threads = []
    prepare = embedded._service.prepare
    monkeypatch.setattr(embedded._service, "prepare",
                        lambda *a, **kw: threads.append(threading.current_thread()) or prepare(*a, **kw))
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    prompt = ("describe this image", make_image(5))
    one = embedded(prompt, gen_config=gen)
    streamed = list(embedded.stream_infer(prompt, gen_config=gen))
    session = embedded.chat(prompt, gen_config=gen)
    assert threads == [threading.current_thread()] * 3
    batch = embedded([prompt, prompt], gen_config=gen)
    assert len(threads) == 5 and threading.current_thread() not in threads[3:]
    assert len(one.token_ids) == 4
    assert [t for d in streamed for t in d.token_ids] == one.token_ids == session.response.token_ids
    assert [r.token_ids for r in batch] == [one.token_ids] * 2


def test_a_bad_conversation_is_a_value_error_alone_or_in_a_batch(embedded):
    bad = (f"{IMAGE_TOKEN} vs {IMAGE_TOKEN}", make_image(6))
    good = ("describe this image", make_image(7))
    gen = GenerationConfig(max_new_tokens=2)
    calls = [lambda: embedded(bad, gen_config=gen), lambda: list(embedded.stream_infer(bad, gen_config=gen)),
             lambda: embedded.chat(bad, gen_config=gen), lambda: embedded([good, bad], gen_config=gen),
             lambda: list(embedded.stream_infer([good, bad], gen_config=gen))]
    for call in calls:
        with pytest.raises(ValueError, match="IMAGE_TOKEN"):
            call()
    assert embedded(good, gen_config=gen).generate_token_len == 2


def test_building_a_pipeline_freezes_its_startup_heap(tiny_llava):
    """The model, tokenizer and engines move to the collector's permanent generation, so a full
    collection during serving does not walk them (a 270-330 ms pause on the 7B bench)."""
    import gc

    from gateway import pipeline

    gc.unfreeze()
    with pipeline(str(tiny_llava)) as pipe:
        frozen = gc.get_freeze_count()
        engine = pipe._service.llm
        assert frozen > 10_000
        assert gc.is_tracked(engine) and engine not in gc.get_objects(generation=2)


def test_closing_a_pipeline_frees_its_model(tiny_llava):
    """The frozen startup heap holds the weights in reference cycles; close() must give them back
    (a closed 7B pipeline kept ~9 GB of GPU memory, and the next engine sized its KV cache smaller)."""
    import gc
    import weakref

    from gateway import pipeline

    pipe = pipeline(str(tiny_llava))
    runner = pipe._service.llm.engine.runner
    weight = weakref.ref(runner.model.model.layers[0].self_attn.qkv_proj.weight)
    cache = weakref.ref(runner.attention[0].k_cache)
    del runner
    pipe.close()
    gc.collect()
    assert weight() is None and cache() is None
    assert gc.get_freeze_count() == 0
