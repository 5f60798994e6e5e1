"""Chat templates: OpenAI messages → one prompt string with an IMAGE_TOKEN per image.

Two kinds. String templates render LMDeploy's `vicuna` and `llava-v1` byte for byte
(system + meta_instruction + eosys, then user/eoh and assistant/eoa+separator per turn,
then the assistant prefix with LMDeploy's trailing space removed). `hf` renders the
checkpoint's own jinja chat_template, as transformers would. Images go where the user
put IMAGE_TOKEN in the text, else `IMAGE_TOKEN\\n` per image before the text (llava's
placement); the caller swaps IMAGE_TOKEN for the model's image token.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.tokenizer import Tokenizer, load_chat_template
from gateway.vl.constants import IMAGE_TOKEN

IMAGE_PART_TYPES = ("image_url", "image_data", "image")
ROLES = ("system", "user", "assistant")

SV = ("A chat between a curious user and an artificial intelligence assistant. "
      "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SL = ("A chat between a curious human and an artificial intelligence assistant. "
      "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass
class ChatTemplateConfig:
    """LMDeploy's ChatTemplateConfig: `model_name` picks a template, every other field
    that is not None replaces that template's string."""

    model_name: str
    system: str | None = None
    meta_instruction: str | None = None
    eosys: str | None = None
    user: str | None = None
    eoh: str | None = None
    assistant: str | None = None
    eoa: str | None = None
    separator: str | None = None
    capability: str | None = None  # 'completion' renders the bare text, no template
    stop_words: list[str] | None = None

    def overrides(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "model_name" and v is not None}


class ChatTemplate:
    """What every template offers: a name, stop words, and messages2prompt."""

    name: str
    stop_words: list[str]

    def messages2prompt(self, messages: list[dict]) -> str:
        raise NotImplementedError


def _text_and_images(content) -> tuple[str, int]:
    """A message's text (text parts joined by newlines) and its number of images."""
    if isinstance(content, str):
        return content, 0
    texts = [part["text"] for part in content if part["type"] == "text"]
    n_images = sum(part["type"] in IMAGE_PART_TYPES for part in content)
    return "\n".join(texts), n_images


def place_images(content) -> str:
    """The message text with one IMAGE_TOKEN per image: the user's own placement when
    the text has any (then the count must match), else llava's default in front."""
    text, n_images = _text_and_images(content)
    placed = text.count(IMAGE_TOKEN)
    if placed:
        if placed != n_images:
            raise ValueError(f"the prompt has {placed} {IMAGE_TOKEN} but the message has {n_images} image(s); "
                             f"place exactly one {IMAGE_TOKEN} per image, or none for the default placement")
        return text
    return (IMAGE_TOKEN + "\n") * n_images + text


def _check_roles(messages: list[dict]) -> None:
    if not messages:
        raise ValueError("no messages to render")
    for message in messages:
        if message["role"] not in ROLES:
            raise ValueError(f"unsupported role {message['role']!r}; expected one of {ROLES}")


@dataclass
class StringTemplate(ChatTemplate):
    """LMDeploy's BaseChatTemplate strings; vicuna and llava-v1 differ only in the
    meta instruction."""

    name: str
    system: str = ""
    meta_instruction: str | None = ""
    eosys: str = ""
    user: str = ""
    eoh: str = ""
    assistant: str = ""
    eoa: str = ""
    separator: str = ""
    capability: str = "chat"
    stop_words: list[str] | None = None

    def messages2prompt(self, messages: list[dict]) -> str:
        _check_roles(messages)
        texts = [place_images(m["content"]) for m in messages]
        if self.capability == "completion":
            return "".join(texts)
        boxes = {"system": self.system, "user": self.user, "assistant": self.assistant}
        ends = {"system": self.eosys, "user": self.eoh, "assistant": self.eoa + self.separator}
        prompt = ""
        if self.meta_instruction is not None and messages[0]["role"] != "system":
            prompt += f"{self.system}{self.meta_instruction}{self.eosys}"
        for message, text in zip(messages, texts):
            prompt += f"{boxes[message['role']]}{text}{ends[message['role']]}"
        if messages[-1]["role"] == "assistant":  # continue the assistant's reply
            end = ends["assistant"]
            return prompt[: len(prompt) - len(end)] if end else prompt
        prompt += self.assistant
        # LMDeploy's vicuna family drops the trailing space of 'ASSISTANT: '.
        return prompt[:-1] if prompt.endswith(" ") else prompt


def _vicuna(meta_instruction: str) -> dict:
    return dict(meta_instruction=meta_instruction, eosys=" ", user="USER: ", eoh=" ", assistant="ASSISTANT: ",
                eoa="</s>", stop_words=["</s>"])


STRING_TEMPLATES = {"vicuna": _vicuna(SV), "llava-v1": _vicuna(SL)}
KNOWN_TEMPLATES = (*STRING_TEMPLATES, "hf")


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text for
    training masks); for rendering it is a no-op wrapper."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _tojson(value, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: plain JSON (jinja's own escapes <, > and & for HTML)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


class JinjaTemplate(ChatTemplate):
    """The checkpoint's chat_template, rendered like transformers' apply_chat_template
    with add_generation_prompt=True. Templates that look at part types get OpenAI part
    lists (images as {'type': 'image'}, as HF processors pass them) and place the image
    token themselves; plain-string templates get text with IMAGE_TOKEN placed."""

    name = "hf"

    def __init__(self, source: str, tokenizer: Tokenizer, stop_words: list[str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"the checkpoint's chat_template does not parse: {err}") from None
        self._parts = any(s in source for s in ("'type'", '"type"', ".type"))
        self._special = dict(tokenizer.special_tokens)
        self._image_token = tokenizer.image_token
        eos = tokenizer.eos_token
        self.stop_words = list(stop_words) if stop_words is not None else ([eos] if eos else [])

    def _as_parts(self, content) -> list[dict]:
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        text, n_images = _text_and_images(content)
        if IMAGE_TOKEN in text:  # the user placed the images: interleave them there
            place_images(content)  # validates the count
            parts: list[dict] = []
            for i, piece in enumerate(text.split(IMAGE_TOKEN)):
                if i:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            return parts
        return [{"type": "image"} if p["type"] in IMAGE_PART_TYPES else {"type": "text", "text": p["text"]}
                for p in content]

    def messages2prompt(self, messages: list[dict]) -> str:
        _check_roles(messages)
        if self._parts:
            rendered = [{"role": m["role"], "content": self._as_parts(m["content"])} for m in messages]
        else:
            rendered = [{"role": m["role"], "content": place_images(m["content"])} for m in messages]
        try:
            prompt = self._template.render(messages=rendered, add_generation_prompt=messages[-1]["role"] != "assistant",
                                           **self._special)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template rejected the messages: {err}") from None
        if self._parts and self._image_token:
            prompt = prompt.replace(self._image_token, IMAGE_TOKEN)
        return prompt


def best_match(model_path: str) -> str:
    """The template name for a model path, like LMDeploy: the first that matches the
    lower-cased path, then the checkpoint's own jinja template."""
    path = str(model_path).lower()
    if "llava" in path and "v1" in path and "v1.6-34b" not in path and "mistral" not in path:
        return "llava-v1"
    if "llava-1.5" in path or "llava-1.6" in path:
        return "llava-v1"
    if "vicuna" in path and "llava" not in path:
        return "vicuna"
    if load_chat_template(model_path) is not None:
        return "hf"
    raise ValueError(f"no chat template matches {model_path!r} and the checkpoint has no chat_template; "
                     f"pass chat_template_config=ChatTemplateConfig(model_name=...), one of {list(KNOWN_TEMPLATES)}")


def get_template(name_or_config: str | ChatTemplateConfig, model_path: str | None = None,
                 tokenizer: Tokenizer | None = None) -> ChatTemplate:
    """A template by name or config (fields override its strings). 'hf' needs the
    model path to read the checkpoint's chat_template and special tokens (pass the
    model's tokenizer when you have it, to not load it again)."""
    config = name_or_config if isinstance(name_or_config, ChatTemplateConfig) else ChatTemplateConfig(name_or_config)
    overrides = config.overrides()
    if config.capability not in (None, "chat", "completion"):
        raise ValueError(f"capability must be 'chat' or 'completion', got {config.capability!r}")
    if config.model_name in STRING_TEMPLATES:
        return StringTemplate(name=config.model_name, **{**STRING_TEMPLATES[config.model_name], **overrides})
    if config.model_name != "hf":
        raise ValueError(f"unknown chat template {config.model_name!r}; known templates: {list(KNOWN_TEMPLATES)}")
    unsupported = sorted(set(overrides) - {"stop_words"})
    if unsupported:
        raise ValueError(f"the 'hf' template takes only stop_words from ChatTemplateConfig, not {unsupported}")
    source = load_chat_template(model_path) if model_path else None
    if source is None:
        raise ValueError(f"{model_path!r} has no chat_template for the 'hf' template")
    return JinjaTemplate(source, tokenizer or Tokenizer(model_path), config.stop_words)


def resolve_template(model_path: str, config: ChatTemplateConfig | None = None,
                     tokenizer: Tokenizer | None = None) -> ChatTemplate:
    """The template a model serves with: the explicit config, else best_match."""
    return get_template(config if config is not None else best_match(model_path), model_path, tokenizer)
