"""Device and dtype names as configs and the wire spell them, shared by the vision and
LLM engines (the LLM tier may import the vision tier; never the other way round)."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """`name`, or cuda when available, else cpu; a bare "cuda" gets the current index
    (engine threads must select the device by index). ValueError for a bad name."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"invalid device {name!r}: {e}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
