"""A tensor-parallel worker: one of ranks 1..N-1 of the LLM engine.

Started by launcher.WorkerGroup as `python -m llm_service.distributed.worker ARGS_JSON`.
It joins rank 0's process group, builds the same ModelRunner as rank 0 over its own shard
(the KV-cache block count is agreed inside), then runs every step rank 0 sends until the
shutdown header. Its host runs ahead of its GPU, as rank 0's does: the step headers arrive on
the host (step.py), and nothing else on the way reads a device value, so it queues the next
step while the GPU still runs this one. On shutdown it waits for its GPU (what it queued
needs rank 0's side, which rank 0 queued before sending the shutdown header), leaves the
group together with rank 0 and exits.

It never outlives rank 0: a thread watches the parent pid (PR_SET_PDEATHSIG would fire
when the *thread* that started us exits, and rank 0 starts workers from a worker thread),
and the wait for the next header (gloo) fails by itself once rank 0's end of it is gone;
the worker then exits at once (os._exit: no interpreter teardown that could wait on a
collective left hanging on its GPU). It ignores SIGINT: Ctrl-C in a terminal reaches the
whole process group, and rank 0 alone decides when the workers stop.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from llm_service.distributed import start_group, stop_group
from llm_service.distributed.launcher import WorkerArgs
from llm_service.distributed.step import recv_step
from llm_service.engine.model_runner import ModelRunner
from llm_service.models.loader import read_spec
from protos.serving import freeze_startup_heap

PARENT_POLL_S = 0.5


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def run_worker(args: WorkerArgs) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # rank 0 keeps its own thread count; the workers share what is left evenly
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.size))
    spec = read_spec(args.model_path)  # before checking in: imports transformers, slow
    timeout = timedelta(seconds=args.timeout_s)
    store = dist.TCPStore("127.0.0.1", args.store_port, args.size, is_master=False, timeout=timeout)
    store.set(f"prism/worker/{args.rank}", "1")
    start_group(store, args.rank, args.size, device, timeout)
    dtype = getattr(torch, args.dtype)
    runner = ModelRunner(spec, args.engine_config(), dtype, device, args.session_len, args.max_batch_size)
    freeze_startup_heap()  # a full collection here would stall every rank's step
    while (step := recv_step(device, dtype, spec.args.hidden_size)) is not None:
        runner.forward(step)
    runner.drop_graphs()  # graphs holding collectives would block the communicators' teardown
    stop_group()  # waits for this GPU's queued work; rank 0 leaves at the same time (launcher.stop)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str]) -> None:
    args = WorkerArgs.from_json(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    try:
        run_worker(args)
    except BaseException:  # noqa: BLE001 - any failure ends this rank; rank 0's watchdog reports it
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
