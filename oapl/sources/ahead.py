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

The trainer pushes only the versions some batch will sample with (``push_needed``), so the
engine finds each push it needs next in the queue. With ``generation.weight_transfer:
shared_memory`` the trainer's side of a push is a copy of the weights into shared memory and a
message, and the engine loads it between its own requests; with ``nccl`` it is a copy on the
trainer's GPU, broadcast by a sender thread into the engine's model when the engine reaches
that version (``oapl.engine.weight_transfer``). At most ``K`` finished batches wait in the queue
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
from collections.abc import Callable

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


def push_needed(version: int, first: int, total: int, ahead: int, minibatches: int,
                sync_every: int) -> bool:
    """Whether some batch ``first <= b < total`` is sampled by version ``version``, i.e.
    whether the engine ever needs the push the trainer makes after step ``version``.
    ``sampling_version`` never decreases with ``b``, so only the first batch whose version is
    at least ``version`` (the first whose start step ``(b - ahead) * k`` reaches it) can be."""
    b = first if version == 0 else max(first, ahead + -(-version // minibatches))
    return b < total and sampling_version(b, ahead, minibatches, sync_every) == version


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


class _Stop(Exception):
    """The trainer sent ``("stop",)``."""


def _taker(pushes) -> Callable[[str], tuple]:
    """``take(kind)``: the next message from the trainer, which must be of that kind;
    ``_Stop`` on ``("stop",)``."""
    def take(kind: str) -> tuple:
        msg = pushes.get()
        if msg[0] == "stop":
            raise _Stop
        if msg[0] != kind:
            raise RuntimeError(f"expected a {kind!r} message, got {msg[0]!r}")
        return msg
    return take


def _produce(cfg: Config, model_path: str, threads: int, pushes, acks, results) -> None:
    """The engine process: build the engine, then sample and score batches in order, applying
    each batch's push first (see the module's docstring), until every batch of the run is done
    or a ``("stop",)`` arrives. ``acks``: to the trainer, with ``weight_transfer=nccl`` only."""
    setup_engine_process(threads, cfg.generation.devices)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the trainer stops us
    try:
        from transformers import AutoTokenizer

        from .engine import EngineSource

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        source = EngineSource(cfg, model_path, tokenizer)
        g, a, k = cfg.generation, cfg.algorithm, cfg.trainer.minibatches
        take = _taker(pushes)
        _, first, sampler_state = take("start")
        source.load_state_dict({"sampler": sampler_state, "batches": first})
        if g.weight_transfer == "nccl":
            from ..engine.weight_transfer import receive_version  # imports vLLM

            source.generator.init_weight_transfer(take("nccl_init")[1])
        held = None  # the version the engine's weights are (None: not yet the trainer's)
        last = time.perf_counter()
        for b in range(first, cfg.trainer.steps // k):
            # The trainer pushes exactly the versions some batch needs, in order.
            need = sampling_version(b, g.ahead, k, a.sync_every)
            if held != need:
                _, version, weights = take("push")
                if version != need:
                    raise RuntimeError(f"push {version} came, expected push {need}")
                if weights is None:
                    receive_version(source.generator, version, take, acks)
                else:
                    source.generator.load_weights(weights, version)
                held = version
            sampled = source.next_batch()
            now = time.perf_counter()
            work = sampled.timings["generate_s"] + sampled.timings["score_s"]
            rewards = sampled.train.rewards.tolist()
            results.put(_Sampled(b, sampled.rollouts, rewards, sampled.failed,
                                 source.sampler.state_dict(), sampled.timings["generate_s"],
                                 sampled.timings["score_s"], min(1.0, work / (now - last))))
            last = time.perf_counter()
    except _Stop:
        return
    except Exception:  # noqa: BLE001 - reported to the trainer, which stops the run
        results.put(("error", traceback.format_exc()))


def _device_index(cfg: Config) -> int:
    """The trainer's CUDA device index (``trainer.device``, e.g. ``cuda:0``)."""
    index = torch.device(cfg.trainer.device).index
    return torch.cuda.current_device() if index is None else index


def _engine_world_size(cfg: Config) -> int:
    """The engine's workers: its tensor- times pipeline-parallel size."""
    kw = cfg.generation.engine_kwargs
    return kw.get("tensor_parallel_size", 1) * kw.get("pipeline_parallel_size", 1)


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
        self.first = 0  # the first batch the engine samples (set by start)
        quiet_resource_sharer()
        ctx = mp.get_context("spawn")
        self.pushes, self.results = ctx.Queue(), ctx.Queue(maxsize=g.ahead)
        self.acks = ctx.Queue() if g.weight_transfer == "nccl" else None
        self.sender = None  # the NCCL sender thread (weight_transfer=nccl), from start
        threads = g.num_threads or cfg.trainer.num_threads or torch.get_num_threads()
        # The engine builds while the trainer loads its model.
        self.proc = ctx.Process(
            target=_produce, name="oapl-engine", daemon=True,
            args=(cfg, model_path, threads, self.pushes, self.acks, self.results))
        self.proc.start()
        self.started = False

    def start(self, trainer: Trainer, step: int) -> None:
        """Tell the engine where to begin (after the batches restored from a checkpoint),
        open the NCCL transfer with ``weight_transfer=nccl``, and push the trainer's weights as
        version ``step``."""
        self.first = self.next + len(self.pending)
        self.pushes.put(("start", self.first, self.sampler_state))
        if self.acks is not None:
            from ..engine.weight_transfer import NCCLSender  # imports vLLM

            self.sender = NCCLSender(self.pushes, self.acks, _device_index(self.cfg),
                                     _engine_world_size(self.cfg) + 1)
        self.started = True
        self.push(trainer, step)

    def _receive(self, timeout: float) -> _Sampled:
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
            if isinstance(msg, tuple):
                raise EngineError(f"the engine process failed:\n{msg[1].rstrip()}")
            return msg

    def next_batch(self) -> SampledBatch:
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
        metrics = {"generate_s": s.generate_s / k, "score_s": s.score_s / k, "queue": waiting,
                   "engine_busy_frac": s.busy_frac}
        return SampledBatch(s.rollouts, collate(s.rollouts, s.rewards, self.pad_id), s.failed,
                            timings={"wait_s": wait_s}, metrics=metrics)

    def push(self, trainer: Trainer, step: int) -> None:
        """Hand the weights over as version ``step`` if some batch will sample with them
        (``push_needed``), else nothing: staged on the trainer's GPU for the NCCL sender, or
        copied into shared memory and queued."""
        self._check_sender()
        g, k = self.cfg.generation, self.cfg.trainer.minibatches
        total = self.cfg.trainer.steps // k
        if not push_needed(step, self.first, total, g.ahead, k, self.cfg.algorithm.sync_every):
            return
        if self.sender is not None:
            self.sender.send(step, trainer.named_weights(), self.push_dtype)
        else:
            weights = cpu_copies(trainer.named_weights(), self.push_dtype)
            self.pushes.put(("push", step, weights))

    def _check_sender(self) -> None:
        if self.sender is not None:
            self.sender.check()

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
        """Stop the engine process (ask, then terminate, then kill) and the NCCL sender; never
        wait long."""
        if self.sender is not None:
            self.sender.close()
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
        for q in [q for q in (self.pushes, self.results, self.acks) if q is not None]:
            q.cancel_join_thread()
            q.close()

