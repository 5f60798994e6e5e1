"""The symmetric-memory all-reduces at tp=2 against NCCL, eagerly and from CUDA graphs: bench/allreduce.py's
checks (bit-exact with NCCL, bit-identical on every rank), one path per test so that a hang or a failure
names its path. Skipped without 2 GPUs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA GPUs", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def _checks(path: str, out: Path) -> None:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "allreduce.py"), "--check-only", "--paths", path,
                           "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "ALL CHECKS PASSED" in proc.stdout, text[-4000:]


def test_one_shot_symmetric_memory_matches_nccl_bit_for_bit(tmp_path):
    """The served path (PRISM_ALLREDUCE=auto): torch's one-shot op."""
    _checks("symm", tmp_path)


def test_barrier_free_triton_kernel_matches_nccl_bit_for_bit(tmp_path):
    """The opt-in PRISM_ALLREDUCE=ll path (ll_allreduce.py)."""
    _checks("ll", tmp_path)
