"""Batches from an engine in its own worker process (``oapl.sources.worker``), which keeps
sampling and scoring the next batches while the trainer trains: ``generation.ahead: K >= 1``
batches ahead, or with K = 0 under ``torchrun`` (where vLLM cannot share the trainer's
process).

The schedule is fixed, not timed (``oapl.sources.schedule``): batch ``b`` is sampled by
``sampling_version(b)``. The engine takes the pushes in order and before sampling batch ``b``
loads that batch's version, waiting for it if the trainer has not got there yet, and leaving
newer pushes queued until a later batch is due to see them. The source ``needs`` exactly the
versions some batch samples with (``push_needed``), so the engine finds each push it needs next
in its inbox. How a push travels is ``generation.weight_transfer`` (``oapl.engine.transport``):
with ``shared_memory`` the trainer's side is a copy of the weights into shared memory and a
message, and the engine loads it between its own requests; with ``nccl`` it is a copy on the
trainer's GPU, broadcast by a sender thread into the engine's model when the engine reaches
that version. At most ``max(K, 1)`` finished batches wait in the queue (the engine blocks when
it is full). A checkpoint (taken at a step that is a multiple of ``lcm(L, k)``) waits for the
batches already due (the next ``K``: they were sampled by weights older than the checkpoint's)
and stores them, so a resumed run trains the same batches and the engine resumes with the
checkpoint's weights.

Faults: the engine process dying, failing (an exception while sampling), or sending nothing for
``generation.timeout_s`` stops the run with ``EngineError``, naming what happened; the last
checkpoint stays good. The engine dies with the trainer's process (even on SIGKILL), and
``close`` stops it within seconds.
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import time

import torch
import torch.multiprocessing as mp

from ..config import Config
from ..engine.messages import Failed, Sampled, Start, Stop
from ..engine.transport import WeightSender, make_sender
from ..errors import EngineError
from .base import ScoredBatch, Weights
from .schedule import Scheduled
from .worker import run_worker

# How often the trainer checks that the engine process is alive while it waits.
POLL_S = 0.5


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class AheadSource(Scheduled):
    """The engine in its own process, ``generation.ahead`` batches ahead of the trainer.

    Per step it reports ``wait_s`` (the trainer waiting for the batch: its idle time, counted
    in the step's time), ``queue`` (finished batches waiting when the trainer asked), and the
    engine's ``engine_busy_frac``, ``engine_queue`` (finished batches waiting when it finished
    this one), and ``generate_s`` / ``score_s`` / ``sync_stall_s`` (off the trainer's critical
    path; a batch's seconds shared out over its minibatch steps)."""

    def __init__(self, cfg: Config, model_path: str):
        g = cfg.generation
        self.cfg = cfg
        self.next = 0  # the next batch to train
        self.sampler_state = {"epoch": 0, "cursor": 0}  # after the last batch taken or drained
        self.pending: list[Sampled] = []  # batches taken off the queue (or restored)
        self.first = 0  # the first batch the engine samples (set by start)
        ctx = mp.get_context("spawn")
        self.inbox, self.acks = ctx.Queue(), ctx.Queue()
        self.results = ctx.Queue(maxsize=max(g.ahead, 1))
        self.sender: WeightSender | None = None  # from start
        threads = g.num_threads or cfg.trainer.num_threads or torch.get_num_threads()
        # The engine builds while the trainer loads its model.
        self.proc = ctx.Process(
            target=run_worker, name="oapl-engine", daemon=True,
            args=(cfg, model_path, threads, self.inbox, self.acks, self.results))
        self.proc.start()

    def start(self, step: int) -> None:
        """Tell the engine where to begin (after the batches restored from a checkpoint) and
        open the weight transport."""
        self.first = self.next + len(self.pending)
        self.inbox.put(Start(self.first, self.sampler_state))
        self.sender = make_sender(self.cfg, self.inbox, self.acks)

    def _receive(self, timeout: float) -> Sampled:
        """The next message from the engine, checking every ``POLL_S`` that it lives."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_sender()  # a failed NCCL push leaves the engine waiting for it
            try:
                msg = self.results.get(timeout=POLL_S)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise EngineError(
                        f"the engine process (pid {self.proc.pid}) "
                        f"{_describe_exit(self.proc.exitcode)} while sampling batch {self.next}"
                    ) from None
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the engine process sent no batch for {timeout:.0f} s "
                        "(generation.timeout_s): it looks hung"
                    ) from None
                continue
            if isinstance(msg, Failed):
                raise EngineError(f"the engine process failed:\n{msg.traceback.rstrip()}")
            return msg

    def next_batch(self) -> ScoredBatch:
        self._check_sender()
        t = time.perf_counter()
        waiting = len(self.pending) + self.results.qsize()
        s = self.pending.pop(0) if self.pending else self._receive(self.cfg.generation.timeout_s)
        wait_s = time.perf_counter() - t
        if s.batch != self.next:
            raise EngineError(f"the engine sent batch {s.batch}, expected {self.next}")
        self.next += 1
        if not self.pending:
            self.sampler_state = s.sampler_state
        k = self.cfg.trainer.minibatches
        engine = {key: v / k for key, v in s.scored.timings.items()}
        metrics = {**engine, "sync_stall_s": s.sync_stall_s / k, "queue": waiting,
                   "engine_queue": s.queue, "engine_busy_frac": s.busy_frac}
        return dataclasses.replace(s.scored, timings={"wait_s": wait_s},
                                   metrics={**s.scored.metrics, **metrics})

    def push(self, weights: Weights, version: int) -> None:
        """Hand the weights to the transport as version ``version``."""
        self._check_sender()
        self.sender.send(version, weights)

    def _check_sender(self) -> None:
        if self.sender is not None:
            self.sender.check()

    def take_due(self) -> Sampled:
        return self._receive(self.cfg.generation.timeout_s)

    def close(self) -> None:
        """Stop the engine process (ask, then terminate, then kill) and the transport; never
        wait long."""
        if self.sender is not None:
            self.sender.close()
        if self.proc.is_alive():
            self.inbox.put(Stop())
            try:  # unblock an engine waiting to put a batch into a full queue
                while True:
                    self.results.get_nowait()
            except (queue.Empty, OSError, EOFError):
                pass
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        for q in (self.inbox, self.results, self.acks):
            q.cancel_join_thread()
            q.close()
