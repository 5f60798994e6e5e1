"""Kernel checks in Triton's CPU interpreter. The interpreter is chosen when triton is imported,
so a test file runs itself as a script in a child process with TRITON_INTERPRET=1."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")


def run_script(path: str) -> None:
    """Run the test file at `path` as a script in the interpreter; it prints "all ok" when every check passed."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all ok" in run.stdout
