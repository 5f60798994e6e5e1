"""Image decoding and CLIP-style preprocessing with PIL + numpy.

The embeddings must equal transformers', so this reproduces the exact arithmetic of
its PIL image-processor backend (alpha composited onto white, PIL resize on uint8,
float64 rescale cast to float32, float32 normalize) rather than an "equivalent"
pipeline: any other order of operations differs in the last bits.

Rescale and normalize act on uint8 pixels one channel value at a time, so they are
computed once, in transformers' order, for all 256 values of each channel
(`pixel_table`) and then applied as a table lookup: bit for bit the same floats, for
a fraction of the work, and on any device (a gather does no arithmetic).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vision_service.tiff import plain_rgb_tiff

MAX_IMAGE_PIXELS = 1 << 26  # 64 Mpx: far above any model input, far below a decompression bomb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessorConfig:
    """The image processor settings we honour; defaults are CLIPImageProcessor's."""

    do_convert_rgb: bool = True
    composite_alpha: bool = True  # transparency onto white, as transformers 5.23 does; 5.17 drops alpha
    do_resize: bool = True
    shortest_edge: int | None = 224  # resize the short side to this, keeping the aspect ratio ...
    resize_to: tuple[int, int] | None = None  # ... or to exactly (height, width)
    resample: int = 3  # PIL resampling id (3 = bicubic)
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorConfig":
        """Parse an image processor dict as saved by transformers (v4 or v5)."""
        if d.get("do_pad"):
            raise ValueError("image processor option do_pad=True is not supported")
        cfg = cls()
        for name in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(name) is not None:
                setattr(cfg, name, bool(d[name]))
        if d.get("resample") is not None:
            cfg.resample = int(d["resample"])
        if d.get("rescale_factor") is not None:
            cfg.rescale_factor = float(d["rescale_factor"])
        for name in ("image_mean", "image_std"):
            value = d.get(name)
            if value is not None:
                setattr(cfg, name, tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)))
        size = d.get("size")
        if isinstance(size, int):  # CLIP's default_to_square=False: an int is the short side
            cfg.shortest_edge, cfg.resize_to = size, None
        elif isinstance(size, dict):
            if set(size) - {"shortest_edge", "height", "width"}:
                raise ValueError(f"image processor size {size} is not supported")
            if "shortest_edge" in size:
                cfg.shortest_edge, cfg.resize_to = int(size["shortest_edge"]), None
            else:
                cfg.shortest_edge, cfg.resize_to = None, (int(size["height"]), int(size["width"]))
        crop = d.get("crop_size")
        if isinstance(crop, int):
            cfg.crop_size = (crop, crop)
        elif isinstance(crop, dict):
            cfg.crop_size = (int(crop["height"]), int(crop["width"]))
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageProcessorConfig":
        """Read `processor_config.json["image_processor"]` (transformers v5) or
        `preprocessor_config.json` (v4 and the hub)."""
        path = Path(path)
        processor = path / "processor_config.json"
        if processor.is_file():
            d = json.loads(processor.read_text())
            if isinstance(d.get("image_processor"), dict):
                return cls.from_dict(d["image_processor"])
        legacy = path / "preprocessor_config.json"
        if legacy.is_file():
            return cls.from_dict(json.loads(legacy.read_text()))
        raise ValueError(f"{path} has no image processor config (processor_config.json or preprocessor_config.json)")


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) fully, refusing images above
    `max_pixels` before their pixels are decompressed."""
    if not data:
        raise ValueError("cannot decode image: no bytes")
    plain = plain_rgb_tiff(data, max_pixels)  # the gateway's encoding of RGB images: no parsing in Python
    if plain is not None:
        return plain
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"cannot decode image: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    try:
        image.load()
    except Exception as e:
        raise ValueError(f"cannot decode image: {e}") from None
    if width < 1 or height < 1:
        raise ValueError(f"cannot decode image: empty image of {width}x{height} pixels")
    return image


def to_rgb(image: Image.Image, composite_alpha: bool = True) -> Image.Image:
    """RGB; with `composite_alpha`, transparency is composited onto white, else dropped."""
    if composite_alpha and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # PIL would only copy an RGB image


def _short_edge_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) with the short side = `short`, the long side truncated."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _center_crop(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop of an HWC array; zero-pads first when it is smaller than the crop."""
    h, w = a.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return a[top : top + height, left : left + width]
    ph, pw = max(height, h), max(width, w)
    pad_top, pad_left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
    padded = np.zeros((ph, pw, *a.shape[2:]), dtype=a.dtype)
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = a
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(ph, top + height), max(0, left) : min(pw, left + width)]


def to_pixels(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """Convert, resize and crop: uint8 pixels [height, width, channels] (maybe a view),
    ready for `pixel_table`'s lookup."""
    if cfg.do_convert_rgb:
        image = to_rgb(image, cfg.composite_alpha)
    elif image.mode != "RGB":
        raise ValueError(f"image mode {image.mode} is not RGB and the processor does not convert")
    if cfg.do_resize:
        if cfg.resize_to is not None:
            height, width = cfg.resize_to
        else:
            height, width = _short_edge_size(image.height, image.width, cfg.shortest_edge)
        if height * width > MAX_IMAGE_PIXELS:  # a 1-pixel-wide strip would resize to gigapixels
            raise ValueError(f"image of {image.width}x{image.height} pixels has too extreme an aspect ratio")
        if image.size != (width, height):  # PIL returns a copy at the same size: skip it
            image = image.resize((width, height), resample=Image.Resampling(cfg.resample))
    a = np.asarray(image)
    if cfg.do_center_crop:
        a = _center_crop(a, *cfg.crop_size)
    return a


def rescale_normalize(a: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """transformers' arithmetic on uint8 [..., channels]: float64 rescale cast to float32,
    then float32 normalize. Elementwise, so it is evaluated only on `pixel_table`'s ramp."""
    if cfg.do_rescale:
        a = (a.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        a = (a - np.asarray(cfg.image_mean, dtype=a.dtype)) / np.asarray(cfg.image_std, dtype=a.dtype)
    return a.astype(np.float32, copy=False)


def pixel_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """[3, 256] float32: what rescale + normalize make of each uint8 value of each RGB channel."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    return np.ascontiguousarray(rescale_normalize(ramp, cfg).T)


def lookup(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 [height, width, channels] -> float32 [channels, height, width] through `table`.
    mode="clip" (uint8 indices are always in range) spares np.take the output buffer it
    makes with mode="raise", a fresh allocation per channel of every image."""
    height, width, channels = pixels.shape
    out = np.empty((channels, height, width), dtype=np.float32)
    for c in range(channels):
        np.take(table[c], pixels[..., c], out=out[c], mode="clip")
    return out


def preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image -> float32 pixel values [channels, height, width]."""
    return lookup(to_pixels(image, cfg), pixel_table(cfg))
