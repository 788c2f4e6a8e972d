"""Test helper: an ``oapl train`` CLI run in a child process, SIGKILLed once it has written
some steps (the resume tests)."""

import os
import signal
import subprocess
import sys
import time

from oapl.metrics import read_metrics
from oapl.training.checkpoint import list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_after_steps(config: str, out, overrides: list[str], steps: int = 5,
                     timeout: float = 300) -> tuple[int, int]:
    """Run ``oapl train config output_dir=out *overrides`` until metrics.jsonl has ``steps``
    records, then SIGKILL it; return (the last checkpoint's step, the records written)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "oapl.cli", "train", config, f"output_dir={out}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    try:
        while not (os.path.exists(metrics) and len(read_metrics(metrics)) >= steps):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    last_ckpt = int(os.path.basename(list_checkpoints(os.path.join(out, "checkpoints"))[-1])[5:])
    return last_ckpt, len(read_metrics(metrics))


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, now."""
    import psutil

    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


def assert_gone(pids: list[int], within: float = 15.0) -> None:
    """Every one of ``pids`` has exited (zombies count as gone) within ``within`` seconds."""
    import psutil

    deadline = time.time() + within
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, f"processes left behind: {alive}"


def wait_for_steps(proc, out, n: int, timeout: float = 300) -> list[int]:
    """Wait until the run ``proc`` (stderr piped, text) has written ``n`` steps to
    ``out/metrics.jsonl``; return its process tree (pids)."""
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while not (os.path.exists(metrics) and len(read_metrics(metrics)) >= n):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)
    return process_tree(proc.pid)
