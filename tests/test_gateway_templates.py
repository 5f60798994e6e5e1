"""Chat templates: LMDeploy's literal strings (reference/lmdeploy.md §3), overrides,
matching by path, the jinja fallback against transformers, IMAGE_TOKEN placement."""
from __future__ import annotations

import pytest

from gateway.templates import ChatTemplateConfig, best_match, get_template, resolve_template
from gateway.tiny_checkpoints import build_tiny_llava
from gateway.vl.constants import IMAGE_TOKEN

# Verbatim from lmdeploy.md §3.
SV = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the user's questions.")
SL = SV.replace("user", "human")
ONE_TURN = "{S} USER: <IMAGE_TOKEN>\ndescribe this image ASSISTANT:"
TWO_TURNS = "{S} USER: <IMAGE_TOKEN>\ndescribe this image ASSISTANT: A1</s>USER: Q2 ASSISTANT:"

HF_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
HF_STRING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def one_turn(text="describe this image", n_images=1):
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": f"img{i}.png"}} for i in range(n_images)]
    return [{"role": "user", "content": parts}]


def two_turns():
    return one_turn() + [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]


@pytest.mark.parametrize("name,system", [("vicuna", SV), ("llava-v1", SL)])
def test_lmdeploy_strings(name, system):
    template = get_template(name)
    assert template.messages2prompt(one_turn()) == ONE_TURN.format(S=system)
    assert template.messages2prompt(two_turns()) == TWO_TURNS.format(S=system)
    assert template.stop_words == ["</s>"]


def test_system_message_replaces_meta_instruction():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert get_template("vicuna").messages2prompt(messages) == "Be brief. USER: hi ASSISTANT:"


def test_trailing_assistant_message_is_continued():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert get_template("vicuna").messages2prompt(messages) == f"{SV} USER: hi ASSISTANT: Hel"


def test_config_overrides_strings_and_stop_words():
    config = ChatTemplateConfig(model_name="llava-v1", meta_instruction="SYS", user="U: ", eoh="\n",
                                assistant="A: ", eoa="<end>", separator="\n", stop_words=["<end>"])
    template = get_template(config)
    assert template.messages2prompt(two_turns()) == "SYS U: <IMAGE_TOKEN>\ndescribe this image\nA: A1<end>\nU: Q2\nA:"
    assert template.stop_words == ["<end>"]


def test_completion_capability_is_bare_text():
    template = get_template(ChatTemplateConfig(model_name="vicuna", capability="completion"))
    assert template.messages2prompt(one_turn("a cat")) == "<IMAGE_TOKEN>\na cat"


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError, match="llava-v1") as err:
        get_template("no-such-template")
    assert "vicuna" in str(err.value) and "hf" in str(err.value)


@pytest.mark.parametrize("path,expected", [
    ("/models/llava-v1.5-7b", "llava-v1"),
    ("/models/llava-1.5-7b-hf", "llava-v1"),
    ("/hub/models--llava-hf--llava-1.6-vicuna-7b", "llava-v1"),
    ("/models/vicuna-7b-v1.5", "vicuna"),
])
def test_best_match_by_path(path, expected):
    assert best_match(path) == expected


def test_default_image_placement_counts_images():
    prompt = get_template("llava-v1").messages2prompt(one_turn("describe these images", n_images=2))
    assert prompt.endswith(f"USER: {IMAGE_TOKEN}\n{IMAGE_TOKEN}\ndescribe these images ASSISTANT:")


def test_user_placed_image_tokens():
    prompt = get_template("vicuna").messages2prompt(one_turn(f"compare {IMAGE_TOKEN} and {IMAGE_TOKEN}", 2))
    assert prompt.endswith(f"USER: compare {IMAGE_TOKEN} and {IMAGE_TOKEN} ASSISTANT:")


@pytest.mark.parametrize("text,n_images", [(f"{IMAGE_TOKEN} describe", 2), (f"{IMAGE_TOKEN}{IMAGE_TOKEN} x", 1),
                                           (f"{IMAGE_TOKEN} x", 0)])
def test_image_token_count_mismatch(text, n_images):
    with pytest.raises(ValueError, match="image"):
        get_template("llava-v1").messages2prompt(one_turn(text, n_images))


def test_unknown_role_rejected():
    with pytest.raises(ValueError, match="role"):
        get_template("vicuna").messages2prompt([{"role": "tool", "content": "x"}])


@pytest.fixture(scope="module")
def jinja_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("jinja") / "tiny-custom", chat_template=HF_LLAVA_TEMPLATE)


def test_custom_folder_without_template_needs_config(tmp_path, tiny_llava):
    import shutil

    folder = tmp_path / "my-model"
    shutil.copytree(tiny_llava, folder)
    with pytest.raises(ValueError, match="ChatTemplateConfig"):
        best_match(str(folder))
    assert resolve_template(str(folder), ChatTemplateConfig(model_name="llava-v1")).name == "llava-v1"


def test_jinja_fallback_matches_transformers(jinja_llava):
    from transformers import AutoProcessor

    assert best_match(str(jinja_llava)) == "hf"
    template = resolve_template(str(jinja_llava))
    processor = AutoProcessor.from_pretrained(str(jinja_llava), backend="pil")
    hf_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": [{"type": "text", "text": "Q2"}, {"type": "image"}]},
    ]
    expected = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    ours = template.messages2prompt([*two_turns()[:2], {"role": "user", "content": [
        {"type": "text", "text": "Q2"}, {"type": "image_url", "image_url": {"url": "b.png"}}]}])
    assert ours == expected.replace("<image>", IMAGE_TOKEN)
    assert ours.count(IMAGE_TOKEN) == 2


def test_jinja_string_template_gets_placed_text(tmp_path, tiny_llava):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_llava, folder)
    (folder / "chat_template.jinja").write_text(HF_STRING_TEMPLATE)
    template = resolve_template(str(folder))
    assert template.messages2prompt(one_turn("hi")) == f"<s><|user|>{IMAGE_TOKEN}\nhi</s><|assistant|>"
    assert template.stop_words == ["</s>"]
    with pytest.raises(ValueError, match="only accepts stop_words|takes only stop_words"):
        get_template(ChatTemplateConfig(model_name="hf", user="x"), str(folder))


def test_jinja_helpers_match_transformers(tmp_path, tiny_llava):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "helpers"
    shutil.copytree(tiny_llava, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{{ m['content'] | tojson }}\n{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "<a> & \"é\""}]
    expected = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert resolve_template(str(folder)).messages2prompt(messages) == expected
