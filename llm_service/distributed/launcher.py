"""Rank 0's side of tensor parallelism: start the workers, join them, watch them, stop them.

Workers are fresh interpreters (`python -m llm_service.distributed.worker`), not forks:
a fork would copy rank 0's threads and CUDA state, and the multiprocessing spawn method
re-imports the caller's __main__ (a user script that builds a pipeline would build it
again). Rank 0 hosts the rendezvous store on a port it binds itself, so no other process
can take it in between, and waits for the workers to check in while watching them, so a
worker that dies on start-up fails the engine at once instead of after the timeout.

A watchdog thread polls the workers; the first one that exits unasked marks the group
failed and calls the failure callbacks (the server's health hook). Rank 0's next step
fails by itself when a worker is gone: its step header travels on a gloo group (step.py),
whose broadcast fails as soon as a peer's connection closes. The group timeout
(PRISM_TP_TIMEOUT_S, default 300 s, start-up included) bounds the rest, and an idle rank 0
pings the workers well within it.

Shutdown: rank 0 sends the shutdown header, each worker waits for its GPU to finish what it
queued (every step's peer side is queued on rank 0 already) and leaves the group, and only
once every worker has exited by itself does rank 0 leave too, so no rank tears down a
communicator that a peer's collective still uses. A worker that does not exit in time is
killed, and then (as after a failure) rank 0 does not tear down an NCCL group, which could
hang on a collective left half done.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from llm_service import config as configs
from llm_service.config import EngineConfig
from llm_service.distributed import start_group, stop_group
from llm_service.distributed.step import PING, SHUTDOWN, send_control

logger = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # how long the workers get to leave after the shutdown header
POLL_S = 0.1


def group_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("PRISM_TP_TIMEOUT_S", "300")))


@dataclass
class WorkerArgs:
    """Everything a worker needs to build the same runner as rank 0, over its shard."""

    rank: int
    size: int
    store_port: int
    parent_pid: int
    model_path: str
    config_class: str  # EngineConfig or one of its LMDeploy-named subclasses
    config: dict  # the config's fields
    dtype: str
    device: str
    session_len: int
    max_batch_size: int
    timeout_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerArgs":
        return cls(**json.loads(text))

    def engine_config(self) -> EngineConfig:
        return getattr(configs, self.config_class)(**self.config)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU after rank 0's; every rank of a CPU group on the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", device.index + rank)


def worker_env() -> dict[str, str]:
    """The workers import this package from wherever rank 0 did; NVLink multicast stays off."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, NCCL_NVLS_ENABLE="0")


class WorkerGroup:
    """Ranks 1..size-1 as child processes, in one process group with this process (rank 0)."""

    def __init__(self, procs: list[subprocess.Popen], device: torch.device, timeout: timedelta):
        self.procs = procs
        self.device = device
        self.ping_s = timeout.total_seconds() / 4  # how long rank 0 may stay idle without a PING
        self.failure: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        atexit.register(self.kill)  # an embedding script that never closes its pipeline
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()

    @classmethod
    def start(
        cls,
        model_path: str,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
        session_len: int,
        max_batch_size: int,
    ) -> "WorkerGroup":
        """Start tp - 1 workers and join the process group with them (as rank 0)."""
        size, timeout = config.tp, group_timeout()
        if device.type == "cuda" and device.index + size > torch.cuda.device_count():
            raise ValueError(f"tp={size} from {device} needs GPUs up to cuda:{device.index + size - 1}, "
                             f"but {torch.cuda.device_count()} are visible")
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # rank 0 is part of the communicator too
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
        values = {f.name: getattr(config, f.name) for f in fields(config)}
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(1, size):
                args = WorkerArgs(rank, size, store.port, os.getpid(), str(model_path), type(config).__name__,
                                  values, str(dtype).removeprefix("torch."), str(rank_device(device, rank)),
                                  session_len, max_batch_size, timeout.total_seconds())
                cmd = [sys.executable, "-m", "llm_service.distributed.worker", args.to_json()]
                procs.append(subprocess.Popen(cmd, env=worker_env(), stdin=subprocess.DEVNULL))
                logger.info("tensor-parallel rank %d: pid %d on %s", rank, procs[-1].pid, args.device)
            _wait_checked_in(store, procs, timeout)
            start_group(store, 0, size, device, timeout)
        except BaseException:
            _kill(procs)
            raise
        return cls(procs, device, timeout)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (from the watchdog thread) once a worker dies; at once if one has."""
        with self._lock:
            failed = self.failure
            if failed is None:
                self._callbacks.append(callback)
        if failed is not None:
            callback(failed)

    def check(self) -> None:
        """Raise if a worker has died: no step can run any more."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def ping(self) -> None:
        """Keep idle workers inside the collective timeout. Never raises: a worker that
        died is the watchdog's to report."""
        if self.failure is None and not self._stopping.is_set():
            try:
                send_control(PING)
            except RuntimeError as e:
                logger.warning("tensor-parallel ping: %s", e)

    def stop(self, graceful: bool = True) -> None:
        """Send the shutdown header (graceful), wait for the workers, leave the group. Only
        from the thread that runs the steps, or once it has stopped (collectives must not
        interleave). Not graceful: the workers may be inside another collective; kill them."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        clean = graceful and self.failure is None
        if clean:
            try:
                send_control(SHUTDOWN)
            except RuntimeError as e:  # a worker died just now
                logger.warning("tensor-parallel shutdown: %s", e)
                clean = False
        # Every rank leaves together, its CUDA graphs already freed (LLMEngine.close, the worker):
        # NCCL's teardown hung on 2 H200s while a graph that captured a collective was alive.
        left = clean and _leave_group(STOP_WAIT_S)
        _kill(self.procs, wait_s=STOP_WAIT_S if clean else 0.0)
        if not left and self.device.type != "cuda":  # gloo leaves alone; a broken NCCL group may hang
            stop_group()
        atexit.unregister(self.kill)

    def kill(self) -> None:
        """Kill the workers without the shutdown handshake (interpreter exit)."""
        self._stopping.set()
        _kill(self.procs)

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    self._fail(f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {code}")
                    return

    def _fail(self, reason: str) -> None:
        logger.error("%s; the LLM engine cannot run any more steps", reason)
        with self._lock:
            self.failure = reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(reason)


def _wait_checked_in(store: dist.TCPStore, procs: list[subprocess.Popen], timeout: timedelta) -> None:
    """Until every worker has connected to the store; fail at once if one exits."""
    keys = [f"prism/worker/{rank}" for rank in range(1, len(procs) + 1)]
    deadline = time.monotonic() + timeout.total_seconds()
    while not store.check(keys):
        for rank, proc in enumerate(procs, start=1):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel worker rank {rank} exited with code {proc.returncode} on start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel workers did not start within {timeout.total_seconds():.0f}s")
        time.sleep(POLL_S)


def _leave_group(wait_s: float) -> bool:
    """stop_group() beside the workers' own, bounded by `wait_s`; whether it finished. If not, the
    group is abandoned (logged): its thread stays blocked, and this process cannot start another."""
    thread = threading.Thread(target=stop_group, name="tp-leave", daemon=True)
    thread.start()
    thread.join(wait_s)
    if thread.is_alive():
        logger.error("tensor-parallel group teardown did not finish within %.0f s; abandoned", wait_s)
    return not thread.is_alive()


def _kill(procs: list[subprocess.Popen], wait_s: float = 0.0) -> None:
    """Give the workers `wait_s` to exit, then SIGKILL and reap them."""
    deadline = time.monotonic() + wait_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
