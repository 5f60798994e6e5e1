"""Start the three tiers as separate processes on loopback (the split deployment).

Used by `prism demo` and the end-to-end tests. Each tier is `prism serve <tier>` with
port 0; it prints "prism <tier> serving on HOST:PORT" once it reports SERVING, and we
read that line from its log.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_READY = re.compile(r"prism (\w+) serving on (\S+):(\d+)")


@dataclass
class Tier:
    name: str
    process: subprocess.Popen
    log_path: Path
    target: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Tiers:
    """Running vision, llm and gateway processes; `gateway` is the client-facing target."""

    tiers: dict[str, Tier] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.tiers["gateway"].target

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        """SIGTERM every tier (gateway first), wait, SIGKILL stragglers; return exit codes."""
        codes: dict[str, int] = {}
        for name in ("gateway", "llm", "vision"):
            tier = self.tiers.get(name)
            if tier and tier.process.poll() is None:
                tier.process.send_signal(signal.SIGTERM)
        for name, tier in self.tiers.items():
            try:
                codes[name] = tier.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                tier.process.kill()
                codes[name] = tier.process.wait()
        return codes

    def __enter__(self) -> "Tiers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_tier(name: str, args: list[str], log_dir: Path, timeout: float = 180.0) -> Tier:
    """Run `prism serve <name> <args> --port 0` and wait until it reports SERVING."""
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "wb")
    cmd = [sys.executable, "-m", "gateway.cli", "serve", name, *args, "--host", "127.0.0.1", "--port", "0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    log_file.close()
    tier = Tier(name, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _READY.search(tier.log())
        if match:
            tier.target = f"{match.group(2)}:{match.group(3)}"
            return tier
        if process.poll() is not None:
            raise RuntimeError(f"prism serve {name} exited with {process.returncode}:\n{tier.log()[-4000:]}")
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"prism serve {name} not serving after {timeout:.0f}s:\n{tier.log()[-4000:]}")


def start_tiers(
    model: str,
    *,
    vision_args: list[str] = (),
    llm_args: list[str] = (),
    gateway_args: list[str] = (),
    log_dir: str | os.PathLike | None = None,
) -> Tiers:
    """Start vision → llm → gateway, each its own process, wired over loopback gRPC."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="prism-tiers-"))
    tiers = Tiers()
    try:
        vision = start_tier("vision", ["--model", model, *vision_args], log_dir)
        tiers.tiers["vision"] = vision
        llm = start_tier("llm", ["--model", model, "--vision", vision.target, *llm_args], log_dir)
        tiers.tiers["llm"] = llm
        gateway = start_tier("gateway", ["--model", model, "--llm", llm.target, *gateway_args], log_dir)
        tiers.tiers["gateway"] = gateway
    except BaseException:
        tiers.stop()
        raise
    return tiers
