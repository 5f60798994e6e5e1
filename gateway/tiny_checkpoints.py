"""Tiny random-weight checkpoints in the standard Hugging Face layout.

Tests and the demo need real checkpoints (config, safetensors, tokenizer, processor
config) but there is no model hub here, so we build them: deterministic, a few hundred
KiB, with a large init range so greedy decoding has clear top-1/top-2 margins.
The weights are random: the text they produce is gibberish by design.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("PRISM_CACHE", Path.home() / ".cache" / "prism"))

# Text the byte-level BPE is trained on: the template strings and some English, so
# prompts tokenize into a reasonable number of tokens.
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: describe this image describe these images What is the woman doing?",
    "The quick brown fox jumps over the lazy dog. A tiger rests in the green grass.",
    "You are a helpful language and vision assistant. Please answer in one sentence.",
    "0123456789 ,.;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~` \n\t",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>"]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def build_tiny_llava(
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int = 512,
    chat_template: str | None = None,
) -> Path:
    """Build (once) a tiny LLaVA-1.5 checkpoint in the llava-hf layout and return its path.

    CLIP vision tower (hidden 32, 2 layers) + 2-layer projector + Llama (hidden 64,
    2 layers, 4 heads / 2 KV heads). The folder name contains 'llava-1.5', so the
    template matches 'llava-v1' like LMDeploy does for llava-1.5-7b-hf.
    """
    path = Path(path) if path else DEFAULT_CACHE / f"tiny-llava-1.5-hf-s{seed}"
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return path

    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    raw_tok = _train_tokenizer(vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    image_token_id = raw_tok.token_to_id("<image>")

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
        initializer_range=0.2,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        initializer_range=0.2,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # init range 0.2 everywhere, so margins are large
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif "norm" not in name:
                p.normal_(0.0, 0.02)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.makedirs(path.parent, exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight LLaVA-1.5 checkpoint.")
    parser.add_argument("path", nargs="?", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_llava(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
