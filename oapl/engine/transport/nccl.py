"""Weights over vLLM's NCCL weight transfer (``generation.weight_transfer: nccl``), from the
trainer's GPU straight into the model of an engine in its own worker process.

vLLM's API (``vllm.distributed.weight_transfer``): ``NCCLTrainerWeightTransferEngine.trainer_init``
opens an NCCL group (the trainer rank 0, the engine's workers after it), and each
``send_weights()`` broadcasts a ``WeightSource`` while driving the engine through a
``VLLMWeightSyncClient``: ``start_weight_update``, ``update_weights`` (concurrently with the
broadcast), ``finish_weight_update``. Here the client is ``QueueClient``: each call becomes a
message on the worker's inbox (``NcclInit``, ``StartUpdate``, ``Update``, ``Finish``), which the
worker carries out on its ``vllm.LLM`` (``NCCLReceiver``) when its schedule reaches that version.

``start_weight_update`` waits for the engine's ``Began``, so the broadcast's NCCL kernels start
only once the engine is there to receive them, instead of spinning on the trainer's GPU while it
samples. This module imports vLLM: import it only for this transport.
"""

from __future__ import annotations

import queue
import socket
import threading
import traceback
from collections.abc import Callable, Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
)

from ...errors import EngineError
from ..messages import Began, Finish, NcclInit, StartUpdate, Update
from .base import Weights

# How often a wait for the engine checks whether the transfer is being stopped.
POLL_S = 0.5


class StagedWeights(WeightSource):
    """The version being sent: ``tensors``, (HF name, tensor) pairs on the trainer's GPU in
    the wire dtype, full shapes, contiguous. One source for the whole run (vLLM's trainer
    engine holds it from ``trainer_init``); the sender swaps the tensors per version."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.tensors]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(list(self.tensors))


class QueueClient:
    """vLLM's ``VLLMWeightSyncClient`` over the worker's inbox (the module's docstring).
    ``version``: the version being sent, set by the sender before each ``send_weights``;
    ``stopping``: set to give up waiting for the engine."""

    def __init__(self, inbox, acks, stopping: threading.Event):
        self.inbox, self.acks, self.stopping = inbox, acks, stopping
        self.version = -1

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.inbox.put(NcclInit(init_info))

    def start_weight_update(self) -> None:
        """Announce ``version`` and wait until the engine, at that point of its schedule, has
        begun the update."""
        self.inbox.put(StartUpdate(self.version))
        while True:
            try:
                acked = self.acks.get(timeout=POLL_S)
                break
            except queue.Empty:
                if self.stopping.is_set():
                    raise EngineError("the weight transfer was stopped") from None
        if acked.version != self.version:
            raise EngineError(f"the engine began receiving version {acked.version}, "
                              f"expected {self.version}")

    def update_weights(self, update_info: dict) -> None:
        self.inbox.put(Update(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.inbox.put(Finish())


class NCCLReceiver:
    """The engine's side: join the group on ``NcclInit``; per version begin the update, ack
    it on ``acks``, receive the broadcast into the model, finish."""

    def __init__(self, acks):
        self.acks = acks

    def open(self, engine, take: Callable) -> None:
        engine.init_weight_transfer(take(NcclInit).init_info)

    def receive(self, engine, version: int, take: Callable) -> None:
        start = take(StartUpdate)
        if start.version != version:
            raise RuntimeError(f"push {start.version} came, expected push {version}")
        engine.start_weight_update()
        self.acks.put(Began(version))
        engine.update_weights(take(Update).update_info)
        take(Finish)
        engine.finish_weight_update(version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NCCLSender:
    """The trainer's side: ``send`` stages a copy of the weights on the trainer's GPU and
    returns; one daemon thread sends the staged versions in order over NCCL, each when the
    engine reaches it in its schedule (see ``oapl.sources.ahead``).

    ``inbox``, ``acks``: the queues to and from the engine's worker; ``dtype``: the wire dtype;
    ``device``: the trainer's CUDA device index; ``world_size``: 1 + the engine's workers.

    Memory: a staged copy (every weight, full shape, in the wire dtype) lives from ``send``
    until its broadcast is over, which is when the engine starts sampling the first batch that
    needs it. The caller sends only versions some batch samples with; at a push after step
    ``s`` the engine has started every batch the trainer has taken (up to ``ceil(s/k) - 1``),
    and the batches still to start that sample with a version <= ``s`` are the next
    ``ahead + 1`` at most (each one version), so at most ``ahead + 1`` staged copies are alive
    at once (plus vLLM's packing buffers during a broadcast).

    Errors (in the rendezvous or a send) are kept and raised as ``EngineError`` by ``check``."""

    def __init__(self, inbox, acks, dtype: torch.dtype | None, device: int, world_size: int):
        self.jobs: queue.Queue = queue.Queue()  # (version, staged, ready); None: stop
        self.stopping = threading.Event()
        self.client = QueueClient(inbox, acks, self.stopping)
        self.error: str | None = None
        self.dtype, self.device = dtype, device
        self.thread = threading.Thread(target=self._run, args=(world_size,),
                                       name="oapl-nccl-sender", daemon=True)
        self.thread.start()

    def send(self, version: int, weights: Weights) -> None:
        """Queue version ``version``: device-to-device copies of the tensors (in the wire
        dtype), enqueued on the trainer's stream; the trainer goes on as soon as they are."""
        staged = [(name, t.detach().to(dtype=self.dtype or t.dtype, copy=True))
                  for name, t in weights]
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.jobs.put((version, staged, ready))

    def check(self) -> None:
        """Raise ``EngineError`` if the sender thread failed."""
        if self.error is not None:
            raise EngineError(f"the NCCL weight transfer failed:\n{self.error.rstrip()}")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (it shuts the NCCL group down) and wait for it at most ``timeout``
        seconds: a broadcast whose receiver is gone never returns, and the thread is a daemon."""
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout)

    def _run(self, world_size: int) -> None:
        """The thread: join the engine's NCCL group, then send each queued version."""
        try:
            torch.cuda.set_device(self.device)
            source = StagedWeights()
            info = NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=_free_port(),
                                       world_size=world_size, rank=0)
            engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client,
                                                                  source=source)
            # Its own stream: a broadcast waits for the engine, which must not hold up the
            # trainer's kernels on the default stream.
            with torch.cuda.stream(torch.cuda.Stream()):
                while self._send_next(engine, source):
                    pass
            engine.shutdown()
        except Exception:  # noqa: BLE001 - raised on the trainer's side by check()
            self.error = traceback.format_exc()

    def _send_next(self, engine: NCCLTrainerWeightTransferEngine, source: StagedWeights) -> bool:
        """Send the next queued version (its copies are freed on return); False to stop."""
        job = self.jobs.get()
        if job is None or self.stopping.is_set():
            return False
        version, source.tensors, ready = job
        ready.synchronize()  # the staging copies ran on the trainer's stream
        self.client.version = version
        engine.send_weights()
        source.tensors = []
        return True
