"""The model's tokenizer from its files, without transformers.

Reads tokenizer.json (the `tokenizers` library does the work), tokenizer_config.json for
the special tokens and chat template, config.json for the image token and
generation_config.json for extra eos ids. `encode` keeps the post-processor's BOS,
exactly as transformers' fast tokenizer does with add_special_tokens=True.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

_DEFAULT_IMAGE_TOKEN = "<image>"


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(model_path: str | Path) -> str | None:
    """The checkpoint's jinja chat template: chat_template.jinja (transformers v5),
    tokenizer_config.json's chat_template (a string, or named templates: 'default'),
    or chat_template.json (processors)."""
    path = Path(model_path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json", "processor_config.json"):
        template = read_json(path / name).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    return None


class Tokenizer:
    """Encode/decode plus the ids the gateway needs: bos, eos (all of them), image token."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json (a fast tokenizer is required)")
        self.model_path = str(path)
        self._tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = read_json(path / "tokenizer_config.json")
        model_config = read_json(path / "config.json")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))

        self.special_tokens: dict[str, str] = {}
        for key, value in config.items():
            text = _token_text(value)
            if key.endswith("_token") and text is not None:
                self.special_tokens[key] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)

        image_id = model_config.get("image_token_index", model_config.get("image_token_id"))
        if image_id is None:
            image_id = self.token_to_id(self.special_tokens.get("image_token", _DEFAULT_IMAGE_TOKEN))
        self.image_token_id: int | None = image_id
        self.image_token: str | None = self._tok.id_to_token(image_id) if image_id is not None else None

        eos = read_json(path / "generation_config.json").get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.eos_token_id is not None:
            eos.insert(0, self.eos_token_id)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch_fast (tokenizers >= 0.20): the same ids without the character offsets
        # `encode` spends ~40% of its time on, and the GIL released while it works.
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """A rendered chat prompt: special tokens on, unless the template already wrote
        the BOS (as transformers' apply_chat_template does, to avoid a double BOS)."""
        starts_with_bos = bool(self.bos_token) and prompt.startswith(self.bos_token)
        return self.encode(prompt, add_special_tokens=not starts_with_bos)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def single_token_id(self, word: str) -> int | None:
        """The id of `word` when it is exactly one token, else None."""
        ids = self.encode(word, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (only when the checkpoint asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
