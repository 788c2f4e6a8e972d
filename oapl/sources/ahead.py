"""Batches sampled ahead: the engine runs in its own process and keeps sampling and scoring
the next batches while the trainer trains (``generation.ahead: K >= 1``).

The schedule is fixed, not timed. Batch ``b`` (0-based; the trainer trains it at steps
``b*k+1 .. (b+1)*k`` with ``k = trainer.minibatches``) is sampled by policy version

    sampling_version(b) = floor(max(0, (b - K) * k) / L) * L        (L = algorithm.sync_every)

the weights of the last push at or before the step at which the trainer starts batch
``b - K``. (K = 0 gives the inline loop's versions.) The engine takes the pushes in order, in
its own process, and before sampling batch ``b`` it applies the push of that version, waiting
for it if the trainer has not got there yet, and leaving newer pushes queued until a later
batch is due to see them. So every row's version, hence every metric, depends on the config and
seed only, whatever the timing; and the lag of a step is at most
``lag_bound = (K + 1) * k - 1 + L - gcd(k, L)``.

The trainer's side of a push is a copy of the weights into shared memory and a message;
the engine loads it between its own requests. At most ``K`` finished batches wait in the queue
(the engine blocks when it is full). A checkpoint (taken at a step that is a multiple of
``lcm(L, k)``) waits for the batches already due (the next ``K``: they were sampled by weights
older than the checkpoint's) and stores them, so a resumed run trains the same batches and the
engine resumes with the checkpoint's weights.

Faults: the engine process dying, failing (an exception while sampling), or sending nothing for
``generation.timeout_s`` stops the run with ``EngineError``, naming what happened; the last
checkpoint stays good. The engine dies with the trainer's process (even on SIGKILL), and
``close`` stops it within seconds.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import signal
import time
import traceback

import torch
import torch.multiprocessing as mp

from ..batch import Rollout, collate, pad_token_id
from ..config import Config
from ..engine.process import cpu_copies, quiet_resource_sharer, setup_engine_process
from ..errors import EngineError
from ..training.trainer import Trainer
from .base import SampledBatch

# How often the trainer checks that the engine process is alive while it waits.
POLL_S = 0.5


def sampling_version(batch: int, ahead: int, minibatches: int, sync_every: int) -> int:
    """The policy version that samples batch ``batch`` (see the module's docstring)."""
    start = max(0, (batch - ahead) * minibatches)
    return start // sync_every * sync_every


def lag_bound(ahead: int, minibatches: int, sync_every: int) -> int:
    """The largest lag a step can have, ``(ahead + 1) * k - 1 + L - gcd(k, L)``: the last
    minibatch of a batch whose version trails its start step by the most a multiple of L can."""
    return (ahead + 1) * minibatches - 1 + sync_every - math.gcd(minibatches, sync_every)


@dataclasses.dataclass
class _Sampled:
    """What the engine sends per batch (collated on the trainer's side)."""

    batch: int
    rollouts: list[Rollout]
    rewards: list[float]
    failed: list[bool]
    sampler_state: dict  # the prompt sampler's position after this batch
    generate_s: float
    score_s: float
    busy_frac: float  # share of the engine's wall time since its previous batch spent working


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _produce(cfg: Config, model_path: str, threads: int, pushes, results) -> None:
    """The engine process: build the engine, then sample and score batches in order, applying
    each batch's push first (see the module's docstring), until every batch of the run is done
    or a ``("stop",)`` arrives."""
    setup_engine_process(threads, cfg.generation.devices)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the trainer stops us
    try:
        from transformers import AutoTokenizer

        from .engine import EngineSource

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        source = EngineSource(cfg, model_path, tokenizer)
        g, a, k = cfg.generation, cfg.algorithm, cfg.trainer.minibatches
        total = cfg.trainer.steps // k
        msg = pushes.get()
        if msg[0] == "stop":
            return
        _, first, sampler_state, version, weights = msg
        source.load_state_dict({"sampler": sampler_state, "batches": first})
        source.generator.load_weights(weights, version)
        last = time.perf_counter()
        for b in range(first, total):
            # Pushes come in order, one every L steps, and `need` is a multiple of L: read up
            # to the push of version `need`, skipping older ones (nothing samples with them)
            # and leaving newer ones queued for later batches.
            need = sampling_version(b, g.ahead, k, a.sync_every)
            while source.generator.version < need:
                msg = pushes.get()
                if msg[0] == "stop":
                    return
                _, version, weights = msg
                if version > need:
                    raise RuntimeError(f"push {version} came before push {need}")
                if version == need:
                    source.generator.load_weights(weights, version)
            sampled = source.next_batch()
            now = time.perf_counter()
            work = sampled.timings["generate_s"] + sampled.timings["score_s"]
            rewards = sampled.train.rewards.tolist()
            results.put(_Sampled(b, sampled.rollouts, rewards, sampled.failed,
                                 source.sampler.state_dict(), sampled.timings["generate_s"],
                                 sampled.timings["score_s"], min(1.0, work / (now - last))))
            last = time.perf_counter()
    except Exception:  # noqa: BLE001 - reported to the trainer, which stops the run
        results.put(("error", traceback.format_exc()))


class AheadSource:
    """The engine in its own process, ``generation.ahead`` batches ahead of the trainer.

    Per step it reports ``wait_s`` (the trainer waiting for the batch: its idle time, counted
    in the step's time), ``queue`` (finished batches waiting when the trainer asked),
    ``engine_busy_frac``, and the engine's ``generate_s`` / ``score_s`` (off the trainer's
    critical path)."""

    def __init__(self, cfg: Config, model_path: str, tokenizer):
        g = cfg.generation
        self.cfg = cfg
        self.pad_id = pad_token_id(tokenizer)
        self.push_dtype = None if g.dtype == "auto" else getattr(torch, g.dtype)
        self.next = 0  # the next batch to train
        self.sampler_state = {"epoch": 0, "cursor": 0}  # after the last batch taken or drained
        self.pending: list[_Sampled] = []  # batches taken off the queue (or restored)
        quiet_resource_sharer()
        ctx = mp.get_context("spawn")
        self.pushes, self.results = ctx.Queue(), ctx.Queue(maxsize=g.ahead)
        threads = g.num_threads or cfg.trainer.num_threads or torch.get_num_threads()
        # The engine builds while the trainer loads its model.
        self.proc = ctx.Process(target=_produce, name="oapl-engine", daemon=True,
                                args=(cfg, model_path, threads, self.pushes, self.results))
        self.proc.start()
        self.started = False

    def start(self, trainer: Trainer, step: int) -> None:
        """Tell the engine where to begin (after the batches restored from a checkpoint) and
        give it the trainer's weights as version ``step``."""
        first = self.next + len(self.pending)
        weights = cpu_copies(trainer.named_weights(), self.push_dtype)
        self.pushes.put(("start", first, self.sampler_state, step, weights))
        self.started = True

    def _receive(self, timeout: float) -> _Sampled:
        """The next message from the engine, checking every ``POLL_S`` that it lives."""
        deadline = time.monotonic() + timeout
        while True:
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
            if isinstance(msg, tuple):
                raise EngineError(f"the engine process failed:\n{msg[1].rstrip()}")
            return msg

    def next_batch(self) -> SampledBatch:
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
        metrics = {"generate_s": s.generate_s / k, "score_s": s.score_s / k, "queue": waiting,
                   "engine_busy_frac": s.busy_frac}
        return SampledBatch(s.rollouts, collate(s.rollouts, s.rewards, self.pad_id), s.failed,
                            timings={"wait_s": wait_s}, metrics=metrics)

    def push(self, trainer: Trainer, step: int) -> None:
        self.pushes.put(("push", step, cpu_copies(trainer.named_weights(), self.push_dtype)))

    def state_dict(self) -> dict:
        """Waits for the batches already due (sampled with weights older than the trainer's)
        and returns them with the position after them."""
        total = self.cfg.trainer.steps // self.cfg.trainer.minibatches
        due = min(self.next + self.cfg.generation.ahead, total)
        while self.next + len(self.pending) < due:
            s = self._receive(self.cfg.generation.timeout_s)
            self.pending.append(s)
            self.sampler_state = s.sampler_state
        return {"next": self.next, "sampler": self.sampler_state, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        if self.started:
            raise ValueError("load_state_dict must come before start")
        self.next, self.sampler_state = state["next"], state["sampler"]
        self.pending = list(state["pending"])

    def close(self) -> None:
        """Stop the engine process: ask, then terminate, then kill; never wait long."""
        if self.proc.is_alive():
            self.pushes.put(("stop",))
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
        for q in (self.pushes, self.results):
            q.cancel_join_thread()
            q.close()

