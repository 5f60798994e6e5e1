"""From a GenerateRequest's segments to a Sequence: validation, image embeddings
(embedding cache first, then one vision call for all the misses), image expansion."""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from llm_service.embedding_cache import EmbeddingCache, image_keys
from llm_service.engine.sampling_params import SamplingParams
from llm_service.engine.sequence import ImageSpan, Sequence
from llm_service.models.loader import ModelSpec
from protos import common_pb2, llm_pb2
from vision_service.types import ImageEmbedding, VisionEncoder


async def embed_images(
    images: Seq[common_pb2.ImageInput],
    keys: list[str],
    has_data: Seq[bool],
    cache: EmbeddingCache,
    vision: VisionEncoder,
    hidden_size: int,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Each image's rows [n, hidden] in `dtype`, in order. Kept on the CPU: the cache must
    not eat the GPU memory the KV cache was sized from; rows move over at prefill.
    `has_data`: whether each image came with bytes (the caller has read them once: reading
    image.data copies them, ~0.2 ms of the event loop's GIL for a fresh 336 px image)."""
    found: dict[str, ImageEmbedding] = {}
    missing: dict[str, common_pb2.ImageInput] = {}
    for image, key, sent_bytes in zip(images, keys, has_data):
        if key in found or key in missing:
            continue
        hit = cache.get(key)
        if hit is not None:
            found[key] = hit
        elif not sent_bytes:
            raise ValueError(f"image {image.sha256} was sent without bytes and is not in the embedding cache")
        else:
            missing[key] = image
    if missing:
        results = await vision.encode(list(missing.values()))
        if len(results) != len(missing):
            raise RuntimeError(f"vision returned {len(results)} embeddings for {len(missing)} images")
        for key, result in zip(missing, results):
            emb = result.embedding
            if emb.dim() != 2 or emb.shape[0] == 0 or emb.shape[1] != hidden_size:
                raise ValueError(f"image embedding of shape {tuple(emb.shape)} does not fit hidden size {hidden_size}")
            result = ImageEmbedding(emb.to(device="cpu", dtype=dtype), result.grid_thw)
            cache.put(key, result)
            found[key] = result
    return [found[key].embedding for key in keys]


async def build_sequence(
    request: llm_pb2.GenerateRequest,
    spec: ModelSpec,
    vision: VisionEncoder | None,
    cache: EmbeddingCache,
    dtype: torch.dtype,
    device: torch.device,
    session_len: int,
    max_tokens: int,
) -> Sequence:
    """Raises ValueError for anything wrong with the request, before it reaches the engine."""
    vocab = spec.args.vocab_size
    params = SamplingParams.from_proto(request.sampling, vocab)
    images = [seg.image.image for seg in request.segments if seg.WhichOneof("kind") == "image"]
    rows: list[torch.Tensor] = []
    if images:
        if spec.image_token_id is None:
            raise ValueError(f"{spec.architecture} is a text-only model; the request has {len(images)} image(s)")
        if vision is None:
            raise ValueError("this LLM service has no vision tier; requests with images are not accepted")
        datas = [image.data for image in images]  # read once: every read of a bytes field copies it
        has_data = [bool(data) for data in datas]
        keys = await image_keys(images, datas)
        del datas  # not held while the vision tier encodes
        rows = await embed_images(images, keys, has_data, cache, vision, spec.args.hidden_size, dtype)
    token_ids: list[int] = []
    spans: list[ImageSpan] = []
    image_index = 0
    for seg in request.segments:
        kind = seg.WhichOneof("kind")
        if kind == "text":
            ids = list(seg.text.token_ids)
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                bad = [i for i in ids if not 0 <= i < vocab]
                raise ValueError(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            token_ids += ids
        elif kind == "image":
            emb = rows[image_index]
            spans.append(ImageSpan(len(token_ids), emb, keys[image_index]))
            token_ids += [spec.image_token_id] * emb.shape[0]
            image_index += 1
        else:
            raise ValueError("a segment is neither text nor image")
    if not token_ids:
        raise ValueError("empty prompt: the request has no tokens")
    if len(token_ids) + 1 > session_len:
        raise ValueError(
            f"prompt of {len(token_ids)} tokens (images expanded) leaves no room to generate "
            f"within session_len {session_len}"
        )
    if len(token_ids) + 1 > max_tokens:
        raise ValueError(f"prompt of {len(token_ids)} tokens does not fit the KV cache ({max_tokens} tokens)")
    seq = Sequence(token_ids, params, spans, request_id=request.request_id)
    if params.seed is not None and not params.greedy:
        seq.generator = torch.Generator(device=device).manual_seed(params.seed)
    return seq
