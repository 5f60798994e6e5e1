"""W3 at the LLM tier: a second turn that re-sends the first turn's prompt and answer finds
every full block of both in the prefix cache (blocks holding generated tokens are hashed
as decoding fills them) and still generates exactly what transformers does."""
from __future__ import annotations

from tests.hf_reference import _load
from tests.test_llm_engine import MARGIN, FakeVision, Prompt, _engine, build_prompt, collect, hf_greedy, request, run, \
    text_seg

BLOCK = 8


def test_second_turn_reuses_the_first_turns_prompt_and_answer(tiny_llava):
    vision = FakeVision()
    turn1 = build_prompt(tiny_llava, [1, "\ndescribe this image"])
    ref1 = hf_greedy(tiny_llava, turn1, max_new_tokens=24)
    assert ref1.margin > MARGIN and len(ref1.tokens) == 24
    vision.table[turn1.images[0]] = ref1.features[0]
    engine = _engine(tiny_llava, vision, block_size=BLOCK, enable_prefix_caching=True)
    try:
        first = run(collect(engine, request(turn1.segments, max_new_tokens=24)))
        assert first.tokens == ref1.tokens
        question = _load(str(tiny_llava))[0].tokenizer(" What is the woman doing?", add_special_tokens=False).input_ids
        follow = first.tokens + question
        turn2 = Prompt([*turn1.segments, text_seg(follow)], turn1.ids + follow, turn1.images)
        ref2 = hf_greedy(tiny_llava, turn2)
        assert ref2.margin > MARGIN
        second = run(collect(engine, request(turn2.segments)))
        assert second.tokens == ref2.tokens
        # turn 1 computed K/V for every position but its last sampled token's: all full blocks of those hit
        history = len(turn1.ids) + len(first.tokens)
        assert second.usage.cached_tokens == (history - 1) // BLOCK * BLOCK > len(turn1.ids)
        assert vision.calls == [[turn1.segments[1].image.image.sha256]]  # the embedding cache hit too
    finally:
        engine.close()
