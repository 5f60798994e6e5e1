"""Tensor parallelism on CPU (gloo): tp=2 greedy output token-for-token equal to tp=1 and to
transformers, logits within 1e-4, embedded and over gRPC; a worker killed with SIGKILL
takes the LLM tier to NOT_SERVING and a non-zero exit; SIGTERM stops every rank. The step
header travels on the host (the control group) and a worker reads no device value for it."""
from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import GenerationConfig, TurbomindEngineConfig, pipeline
from llm_service import distributed
from llm_service.distributed import step as steps
from llm_service.layers.linear import QKVParallelLinear
from protos import llm_pb2, llm_pb2_grpc
from protos.serving import GRPC_OPTIONS
from tests.conftest import make_image
from tests.hf_reference import hf_generate, llava_v1_prompt

MAX_NEW = 8
MIN_MARGIN = 2e-3
EXIT_WAIT_S = 60  # a guard against hanging, not a speed requirement

PROMPTS = [  # (text, number of images): one batch, so text and image rows share steps
    ("describe this image", 1),
    ("describe these images", 2),
    ("The quick brown fox jumps over the lazy dog.", 0),
]


def _inputs():
    images = [make_image(10 + i) for i in range(2)]
    return [(text, images[:n]) if n else text for text, n in PROMPTS], images


def _gen() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=MAX_NEW, output_logits="generation")


def _run(target: str, **backend) -> list:
    pipe = pipeline(target, backend_config=TurbomindEngineConfig(**backend) if backend else None)
    try:
        return pipe(_inputs()[0], gen_config=_gen())
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def references(tiny_llava):
    images = _inputs()[1]
    refs = [hf_generate(tiny_llava, llava_v1_prompt([(text, n)]), images[:n], MAX_NEW) for text, n in PROMPTS]
    assert all(r.min_margin > MIN_MARGIN for r in refs), "a reference has a near-tie; pick other inputs"
    return refs


@pytest.fixture(scope="module")
def tp1(tiny_llava):
    return _run(str(tiny_llava), tp=1, device="cpu")


def _check(responses, references, baseline=None) -> None:
    for i, (response, ref) in enumerate(zip(responses, references)):
        expected = ref.token_ids
        if response.finish_reason == "stop" and len(expected) == len(response.token_ids) + 1:
            expected = expected[:-1]  # the stop token itself is not returned
        assert response.token_ids == expected, PROMPTS[i]
        assert response.input_token_len == ref.input_len
        logits = np.asarray(response.logits, dtype=np.float32)
        np.testing.assert_allclose(logits, ref.logits[: len(logits)].numpy(), atol=1e-4, rtol=0)
        if baseline is not None:
            assert response.token_ids == baseline[i].token_ids
            np.testing.assert_allclose(logits, np.asarray(baseline[i].logits), atol=1e-4, rtol=0)


def test_qkv_shards_replicate_kv_heads_when_fewer_than_ranks(monkeypatch):
    """4 ranks over 8 query / 2 KV heads: rank r holds query heads 2r, 2r+1 and KV head r // 2."""
    hidden, head_dim, heads, kv_heads = 16, 4, 8, 2
    w = {s: torch.randn(n * head_dim, hidden) for s, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    x = torch.randn(3, hidden)
    for rank in range(4):
        monkeypatch.setattr(distributed, "_TP", distributed.TPState(rank, 4))
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads)
        for shard, weight in w.items():
            layer.weight_loader(layer.weight, weight, shard)
        q, k, v = layer(x).split([2 * head_dim, head_dim, head_dim], dim=-1)
        kv = slice(rank // 2 * head_dim, (rank // 2 + 1) * head_dim)
        torch.testing.assert_close(q, x @ w["q"][2 * rank * head_dim : (2 * rank + 2) * head_dim].T)
        torch.testing.assert_close(k, x @ w["k"][kv].T)
        torch.testing.assert_close(v, x @ w["v"][kv].T)


def test_step_header_travels_on_the_host_and_the_rest_is_only_queued(monkeypatch):
    """Rank 0 sends each header as a host tensor on the control group and the step's tensors
    from its device on the default group; a worker receives them in that order and only
    queues the device broadcasts: its "device" here is meta, whose values cannot be read."""
    control = object()  # stands for the gloo group
    monkeypatch.setattr(distributed, "_TP", distributed.TPState(0, 2, control=control))
    wire: list[tuple[object, torch.Tensor]] = []

    def send(t, src, group=None):
        assert src == 0
        wire.append((group, t.clone()))

    def recv(t, src, group=None):
        sent_group, sent = wire.pop(0)
        assert group is sent_group
        if group is control:  # the header: a host tensor, read on the host
            assert t.device.type == "cpu"
            t.copy_(sent)
        else:  # a device tensor: queued, never read back
            assert group is None and t.device.type == "meta"
            assert (t.shape, t.dtype) == (sent.shape, sent.dtype)

    hidden = 4
    decode = steps.PackedStep.build([5, 6], [3, 7], [3, 23], [[0], [1]], [0, 1, 2], [4, 8], [0, 1], [], None,
                                    False, torch.device("cpu"))
    rows = torch.randn(2, hidden)
    prefill = steps.PackedStep.build([1, 2, 3], [0, 1, 2], [0, 1, 2], [[0]], [0, 3], [3], [2], [0, 1], rows,
                                     True, torch.device("cpu"))
    monkeypatch.setattr(steps, "dist", type("FakeDist", (), {"broadcast": staticmethod(send)}))
    steps.send_control(steps.PING)
    steps.send_step(decode)
    steps.send_step(prefill)
    steps.send_control(steps.SHUTDOWN)
    assert [group is control for group, _ in wire] == [True, True, False, True, False, False, True]
    assert wire[1][1].tolist() == decode.header and wire[5][1].dtype == rows.dtype

    monkeypatch.setattr(steps, "dist", type("FakeDist", (), {"broadcast": staticmethod(recv)}))
    meta = torch.device("meta")
    for sent in (decode, prefill):
        got = steps.recv_step(meta, rows.dtype, hidden)
        assert got.header == sent.header and got.ints.is_meta and got.need_logits == sent.need_logits
        inputs = got.unpack()  # views and casts only
        assert inputs.input_ids.shape == sent.unpack().input_ids.shape
        assert inputs.meta.num_decodes == sent.unpack().meta.num_decodes
        assert (inputs.image_rows is None) == (sent.image_rows is None)
    assert steps.recv_step(meta, rows.dtype, hidden) is None
    assert not wire


def test_tp_that_does_not_split_is_a_value_error(tiny_llava):
    with pytest.raises(ValueError, match="attention heads"):
        pipeline(str(tiny_llava), backend_config=TurbomindEngineConfig(tp=3, device="cpu"))


def test_embedded_tp2_matches_tp1_and_transformers(tiny_llava, references, tp1, monkeypatch):
    """Idle for longer than the collective timeout in between: rank 0's pings keep the
    workers' wait for the next step alive. (Start-up, which the timeout also bounds, gets
    longer: importing torch in a worker alone can take 4 s on a busy machine.)"""
    from llm_service.distributed import launcher

    _check(tp1, references)
    monkeypatch.setenv("PRISM_TP_TIMEOUT_S", "4")
    wait = launcher._wait_checked_in
    monkeypatch.setattr(launcher, "_wait_checked_in",
                        lambda store, procs, timeout: wait(store, procs, timedelta(seconds=EXIT_WAIT_S)))
    pipe = pipeline(str(tiny_llava), backend_config=TurbomindEngineConfig(tp=2, device="cpu"))
    try:
        _check(pipe(_inputs()[0], gen_config=_gen()), references, baseline=tp1)
        time.sleep(5)
        _check(pipe(_inputs()[0][:1], gen_config=_gen()), references[:1], baseline=tp1[:1])
    finally:
        pipe.close()


def test_embedded_tp4_replicates_kv_heads(tiny_llava, references, tp1, monkeypatch):
    """4 ranks over 2 KV heads (each held by two ranks); the tiny vocabulary (489) pads the last shard.
    Decodes run a step ahead here (as on CUDA): the workers get ids sampled on rank 0's device."""
    from llm_service.engine.llm_engine import LLMEngine

    init = LLMEngine.__init__

    def init_running_ahead(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.run_ahead = True

    monkeypatch.setattr(LLMEngine, "__init__", init_running_ahead)
    _check(_run(str(tiny_llava), tp=4, device="cpu"), references, baseline=tp1)


def _workers(pid: int) -> list[int]:
    """Pids of the tensor-parallel workers started by process `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"llm_service.distributed.worker" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def tiers(tiny_llava, tmp_path_factory):
    from gateway.tiers import start_tiers

    tiers = start_tiers(str(tiny_llava), llm_args=["--tp", "2", "--device", "cpu"], vision_args=["--device", "cpu"],
                        log_dir=tmp_path_factory.mktemp("tp-tiers"))
    yield tiers
    tiers.stop()


def test_grpc_tp2_matches_tp1_and_transformers(tiers, references, tp1):
    _check(_run(f"grpc://{tiers.gateway}"), references, baseline=tp1)


def test_sigterm_stops_every_rank(tiers):
    llm = tiers.tiers["llm"].process
    workers = _workers(llm.pid)
    assert len(workers) == 1
    codes = tiers.stop(timeout=EXIT_WAIT_S)
    assert codes["llm"] == 0, tiers.tiers["llm"].log()[-3000:]
    assert not any(_alive(pid) for pid in workers)


def test_killed_worker_fails_requests_and_exits_nonzero(tiny_llava, tmp_path):
    from gateway.tiers import start_tier

    tier = start_tier("llm", ["--model", str(tiny_llava), "--tp", "2", "--device", "cpu", "--session-len", "4096"],
                      tmp_path)
    try:
        [worker] = _workers(tier.process.pid)
        with grpc.insecure_channel(tier.target, options=GRPC_OPTIONS) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            req = llm_pb2.GenerateRequest(
                segments=[llm_pb2.Segment(text=llm_pb2.TextSegment(token_ids=[1, 100, 200]))],
                sampling=llm_pb2.SamplingParams(top_p=1.0, ignore_eos=True, max_new_tokens=4000))
            stream = llm_pb2_grpc.LLMServiceStub(ch).Generate(req)
            assert next(stream).token_ids  # in flight
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(grpc.RpcError):
                for _ in stream:
                    pass
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        code = tier.process.wait(timeout=EXIT_WAIT_S)
        assert code != 0
        assert "worker rank 1" in tier.log()
    finally:
        if tier.process.poll() is None:
            tier.process.kill()
            tier.process.wait()
