"""The correctness oracle: Hugging Face transformers' own generate on the same checkpoint."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

SL = ("A chat between a curious human and an artificial intelligence assistant. "
      "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def llava_v1_prompt(turns: list[tuple[str, int]], answers: list[str] = ()) -> str:
    """LMDeploy's llava-v1 rendering, written out literally: turns are (text, n_images);
    HF's processor expands each '<image>' to the image's rows."""
    prompt = SL + " "
    for i, (text, n_images) in enumerate(turns):
        prompt += "USER: " + "<image>\n" * n_images + text + " ASSISTANT:"
        if i < len(answers):
            prompt += " " + answers[i] + "</s>"
    return prompt


@dataclass
class Reference:
    token_ids: list[int]
    logits: torch.Tensor  # [n, vocab]
    min_margin: float     # smallest top-1/top-2 gap over the generated steps
    input_len: int


@functools.lru_cache(maxsize=4)
def _load(path: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return processor, model


def hf_generate(path, prompt: str, images=None, max_new_tokens: int = 8) -> Reference:
    processor, model = _load(str(path))
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    logits = torch.stack([step[0] for step in out.logits])
    top2 = logits.topk(2, dim=-1).values
    return Reference(out.sequences[0, n:].tolist(), logits, float((top2[:, 0] - top2[:, 1]).min()), n)
