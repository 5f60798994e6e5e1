"""Python dataclasses ↔ the Gateway protos, shared by the gateway server and client.

GenerationConfig travels with do_sample resolved by the sender, so the greedy-unless-
sampling-params rule gives the same answer on both ends; a client in another language
that sets top_k but not do_sample gets sampling, as in Python. Unset max_new_tokens
means 512; Python's None (up to the session length) travels as INT32_MAX, which the
LLM tier caps at the session length; 0 is invalid like in Python.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from gateway.config import GenerationConfig, Response
from gateway.templates import IMAGE_PART_TYPES, ChatTemplateConfig
from gateway.messages import encode_image
from gateway.vl.image import read_image_bytes
from protos import common_pb2, gateway_pb2

_SCALARS = ("max_new_tokens", "min_new_tokens", "do_sample", "top_p", "top_k", "min_p", "temperature",
            "repetition_penalty", "ignore_eos", "random_seed", "skip_special_tokens",
            "spaces_between_special_tokens", "n", "include_stop_str_in_output")
_LISTS = ("stop_words", "bad_words", "stop_token_ids", "bad_token_ids")
_TEMPLATE_STRINGS = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa", "separator")
_URL_SCHEMES = ("http://", "https://", "data:")
_UNLIMITED = 2**31 - 1


def gen_config_to_proto(config: GenerationConfig) -> gateway_pb2.GenerationConfig:
    if config.logprobs is not None:
        raise ValueError("logprobs is not supported")
    msg = gateway_pb2.GenerationConfig(output_logits=config.output_logits or "")
    for name in _SCALARS:
        value = getattr(config, name)
        if name == "max_new_tokens" and value is None:
            value = _UNLIMITED
        if value is not None:
            setattr(msg, name, value)
    for name in _LISTS:
        getattr(msg, name).extend(getattr(config, name) or [])
    return msg


def gen_config_from_proto(msg: gateway_pb2.GenerationConfig) -> GenerationConfig:
    """Raises ValueError (from GenerationConfig's validation) for bad values."""
    kwargs = {name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)}
    if kwargs.get("max_new_tokens") == _UNLIMITED:
        kwargs["max_new_tokens"] = None
    for name in ("top_p", "min_p", "temperature", "repetition_penalty"):  # float32 0.800000011920929 -> 0.8
        if name in kwargs:
            kwargs[name] = float(str(np.float32(kwargs[name])))
    kwargs.update({name: list(getattr(msg, name)) for name in _LISTS if len(getattr(msg, name))})
    return GenerationConfig(output_logits=msg.output_logits or None, **kwargs)


def template_to_proto(config: ChatTemplateConfig) -> gateway_pb2.ChatTemplate:
    if config.capability not in (None, "chat"):
        raise ValueError(f"ChatTemplateConfig.capability={config.capability!r} cannot be sent to a gateway")
    msg = gateway_pb2.ChatTemplate(model_name=config.model_name, stop_words=config.stop_words or [])
    for name in _TEMPLATE_STRINGS:
        if getattr(config, name) is not None:
            setattr(msg, name, getattr(config, name))
    return msg


def template_from_proto(msg: gateway_pb2.ChatTemplate) -> ChatTemplateConfig:
    strings = {name: getattr(msg, name) for name in _TEMPLATE_STRINGS if msg.HasField(name)}
    return ChatTemplateConfig(model_name=msg.model_name, stop_words=list(msg.stop_words) or None, **strings)


def _image_ref(source, options: dict) -> gateway_pb2.ImageRef:
    """URLs go as URLs (the gateway fetches them); PIL images and local files go as bytes."""
    ref = gateway_pb2.ImageRef(options={str(k): str(v) for k, v in options.items()})
    if isinstance(source, Image.Image):
        ref.data = encode_image(source).data  # lossless, and encoded once per image object
    elif isinstance(source, bytes):
        ref.data = source
    elif isinstance(source, str) and source.startswith(_URL_SCHEMES):
        ref.url = source
    else:
        ref.data = read_image_bytes(os.fspath(source))
    return ref


def messages_to_proto(messages: list[dict]) -> list[gateway_pb2.Message]:
    """Normalized messages → protos (client side: local images are read here)."""
    out = []
    for message in messages:
        msg = gateway_pb2.Message(role=message["role"])
        content = message["content"]
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part["type"] == "text":
                msg.content.add(text=part["text"])
            elif part["type"] in IMAGE_PART_TYPES:
                body = dict(part["image_url"])
                msg.content.add(image=_image_ref(body.pop("url"), body))
        out.append(msg)
    return out


def _is_local(url: str) -> bool:
    """A file:// URL or a bare path (other schemes fail later with their own message)."""
    return url.startswith("file:") or "://" not in url and not url.startswith(_URL_SCHEMES)


def messages_from_proto(messages, allow_local_files: bool = False) -> list[dict]:
    """Protos → OpenAI messages (server side; normalize_messages validates them). A URL
    that is neither http(s) nor data is a path on the gateway host: refused unless the
    server was started with allow_local_files, so remote callers cannot read its files."""
    out = []
    for msg in messages:
        content = []
        for part in msg.content:
            if part.WhichOneof("part") == "text":
                content.append({"type": "text", "text": part.text})
            elif part.WhichOneof("part") == "image":
                source = part.image.url if part.image.WhichOneof("source") == "url" else part.image.data
                if not source:
                    raise ValueError("an image part has neither a url nor data")
                if isinstance(source, str) and _is_local(source) and not allow_local_files:
                    raise ValueError(f"image url {source[:64]!r}: this gateway reads only http(s) and data URLs "
                                     "(send local files as bytes, or start it with --allow-local-files)")
                content.append({"type": "image_url", "image_url": {"url": source, **dict(part.image.options)}})
            else:
                raise ValueError("a content part has neither text nor an image")
        out.append({"role": msg.role, "content": content})
    return out


def tensor_from_numpy(array: np.ndarray) -> common_pb2.Tensor:
    array = np.ascontiguousarray(array, dtype="<f4")
    return common_pb2.Tensor(dtype="float32", shape=list(array.shape), data=array.tobytes())


def response_to_proto(response: Response) -> gateway_pb2.ChatResponse:
    msg = gateway_pb2.ChatResponse(text=response.text, generate_token_len=response.generate_token_len,
                                   input_token_len=response.input_token_len,
                                   finish_reason=response.finish_reason or "", token_ids=response.token_ids,
                                   index=response.index)
    if response.logits is not None:
        msg.logits.CopyFrom(tensor_from_numpy(response.logits))
    return msg


def response_from_proto(msg: gateway_pb2.ChatResponse, index: int = 0) -> Response:
    logits = None
    if msg.HasField("logits") and msg.logits.data:
        logits = np.frombuffer(msg.logits.data, dtype="<f4").reshape(list(msg.logits.shape)).copy()
    return Response(text=msg.text, generate_token_len=msg.generate_token_len, input_token_len=msg.input_token_len,
                    finish_reason=msg.finish_reason or None, token_ids=list(msg.token_ids), logits=logits, index=index)
