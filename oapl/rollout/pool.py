"""Environment steps on a pool of daemon threads, each with its own deadline.

A step that overruns its timeout is given up on (reported as ``StepTimeout``) and stops
counting against the pool's size; its thread is a daemon, so an environment that never
returns cannot keep the process from exiting. (A thread cannot be killed: an environment
whose steps may hang forever should bound its own work, as the python tool does with its
sandbox's limits.)
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable


class StepTimeout(Exception):
    """An environment step ran past ``env.step_timeout_s``."""


class StepPool:
    """Runs submitted jobs, at most ``workers`` at once; ``collect`` hands back finished ones
    as ``(key, ok, value)``: the job's return value, or the exception it raised (a
    ``StepTimeout`` once it has run ``timeout_s``)."""

    def __init__(self, workers: int, timeout_s: float):
        self.workers, self.timeout_s = workers, timeout_s
        self.waiting: deque[tuple[Hashable, Callable]] = deque()
        self.running: dict[Hashable, float] = {}  # key -> deadline
        self.results: queue.Queue = queue.Queue()

    def submit(self, key: Hashable, job: Callable[[], object]) -> None:
        self.waiting.append((key, job))
        self._fill()

    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def _fill(self) -> None:
        while self.waiting and len(self.running) < self.workers:
            key, job = self.waiting.popleft()
            self.running[key] = time.monotonic() + self.timeout_s
            threading.Thread(target=self._run, args=(key, job), daemon=True).start()

    def _run(self, key: Hashable, job: Callable[[], object]) -> None:
        try:
            out = (True, job())
        except BaseException as exc:  # noqa: BLE001 - an environment's bug is its rollout's
            out = (False, exc)
        self.results.put((key, *out))

    def collect(self, gather_s: float) -> list[tuple[Hashable, bool, object]]:
        """Block until a job finishes (or times out), then keep collecting for up to
        ``gather_s`` more seconds or until none is left; [] when nothing is submitted."""
        out: list[tuple[Hashable, bool, object]] = []
        first_at = None
        while self.busy():
            now = time.monotonic()
            for key, deadline in list(self.running.items()):
                if deadline <= now:
                    del self.running[key]
                    out.append((key, False, StepTimeout(f"no answer in {self.timeout_s} s")))
            self._fill()
            if out and first_at is None:
                first_at = now
            if first_at is not None and (now - first_at >= gather_s or not self.busy()):
                break
            until = min(self.running.values(), default=now)
            if first_at is not None:
                until = min(until, first_at + gather_s)
            try:
                key, ok, value = self.results.get(timeout=max(until - now, 1e-3))
            except queue.Empty:
                continue
            if key in self.running:  # else: a job given up on that answered late
                del self.running[key]
                out.append((key, ok, value))
                self._fill()
        return out
