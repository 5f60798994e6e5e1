"""Prism's wire contract (package prism.v1) and the Python stubs generated from it.

The stubs are generated from the .proto files on first import (and again whenever a
.proto is newer than its stubs), with the grpcio-tools installed beside the grpcio and
protobuf runtime in use, so the generated code always matches the runtime.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PROTOS = ("common", "vision", "llm", "gateway")


def _stale() -> bool:
    for name in _PROTOS:
        src = _HERE / f"{name}.proto"
        for out in (f"{name}_pb2.py", f"{name}_pb2_grpc.py"):
            target = _HERE / out
            if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
                return True
    return False


def generate() -> None:
    """Regenerate the stubs; each file lands atomically, so concurrent importers are safe."""
    from grpc_tools import protoc

    root = _HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{root}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [str(_HERE / f"{name}.proto") for name in _PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on protos/*.proto")
        for produced in (Path(tmp) / "protos").iterdir():
            staged = _HERE / f".{produced.name}.{os.getpid()}"
            staged.write_bytes(produced.read_bytes())
            os.replace(staged, _HERE / produced.name)


if _stale():
    generate()
