"""The vision tier on a GPU outside the LLM's tensor-parallel group (issue 4): three processes,
tp=2 on cuda:0-1 and vision on cuda:2 (with 2 GPUs: tp=1 on cuda:0, vision on cuda:1). Every
process holds memory only on its own GPUs (nvidia-smi's per-process accounting), and a request
through the gateway is answered. Skipped with fewer than 2 GPUs or without nvidia-smi."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
if GPUS < 2 or shutil.which("nvidia-smi") is None:
    pytest.skip("needs 2 CUDA GPUs and nvidia-smi", allow_module_level=True)


def _smi(query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def _gpus_of(pids: set[int]) -> set[int]:
    """Indices of the GPUs on which any of `pids` holds memory."""
    index = {uuid: int(i) for i, uuid in _smi("gpu=index,uuid")}
    return {index[uuid] for pid, uuid in _smi("compute-apps=pid,gpu_uuid") if int(pid) in pids}


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.add(int(entry.name))
    return found


def test_vision_on_its_own_gpu_beside_the_tp_group(tiny_llava, tmp_path):
    from gateway import GenerationConfig, pipeline
    from gateway.tiers import start_tiers
    from tests.conftest import make_image

    tp = 2 if GPUS >= 3 else 1
    with start_tiers(str(tiny_llava), vision_args=["--device", f"cuda:{tp}"],
                     llm_args=["--device", "cuda:0", "--tp", str(tp)], log_dir=tmp_path) as tiers:
        pipe = pipeline(f"grpc://{tiers.gateway}")
        try:
            answer = pipe(("describe this image", make_image(1)), gen_config=GenerationConfig(max_new_tokens=4))
        finally:
            pipe.close()
        assert answer.generate_token_len >= 1
        llm = tiers.tiers["llm"].process.pid
        assert _gpus_of({llm} | _children(llm)) == set(range(tp))
        assert _gpus_of({tiers.tiers["vision"].process.pid}) == {tp}
