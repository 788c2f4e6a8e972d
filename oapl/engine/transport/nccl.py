"""Weight pushes over vLLM's NCCL weight transfer (``generation.weight_transfer: nccl``), from
the trainer's GPU straight into the model of the engine sampling ahead (``oapl.sources.ahead``).

vLLM's API (``vllm.distributed.weight_transfer``): ``NCCLTrainerWeightTransferEngine.trainer_init``
opens an NCCL group (the trainer rank 0, the engine's workers after it), and each
``send_weights()`` broadcasts a ``WeightSource`` while driving the engine through a
``VLLMWeightSyncClient``: ``start_weight_update``, ``update_weights`` (concurrently with the
broadcast), ``finish_weight_update``. Here the client is ``QueueClient``: each call becomes a
message on the queue of pushes, which the engine process reads in order and carries out on its
``vllm.LLM`` (``receive_version``, ``VLLMGenerator``) when its schedule reaches that version.

Messages, trainer -> engine (on the queue of pushes, after ``("start", ...)``):

    ("nccl_init", init_info)   once: join the NCCL group (vLLM's worker init payload)
    ("push", version, None)    begin receiving ``version``; the engine acks it on ``acks``
    ("update", update_info)    the names, dtypes and shapes of the broadcast that follows
    ("finish",)                the version is complete

``start_weight_update`` waits for the ack, so the broadcast's NCCL kernels start only once the
engine is there to receive them, instead of spinning on the trainer's GPU while it samples.
"""

from __future__ import annotations

import queue
import socket
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
)

from ..errors import EngineError

# How often a wait for the engine checks whether the transfer is being stopped.
POLL_S = 0.5


class StagedWeights(WeightSource):
    """The version being sent: ``tensors``, (HF name, tensor) pairs on the trainer's GPU in
    the engine's dtype, full shapes, contiguous. One source for the whole run (vLLM's trainer
    engine holds it from ``trainer_init``); the sender swaps the tensors per version."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.tensors]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(list(self.tensors))


class QueueClient:
    """vLLM's ``VLLMWeightSyncClient`` over the queue of pushes to the engine process (the
    messages in the module's docstring). ``version``: the version being sent, set by the
    sender before each ``send_weights``; ``stopping``: set to give up waiting for the engine."""

    def __init__(self, pushes, acks, stopping: threading.Event):
        self.pushes, self.acks, self.stopping = pushes, acks, stopping
        self.version = -1

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.pushes.put(("nccl_init", init_info))

    def start_weight_update(self) -> None:
        """Announce ``version`` and wait until the engine, at that point of its schedule, has
        begun the update."""
        self.pushes.put(("push", self.version, None))
        while True:
            try:
                acked = self.acks.get(timeout=POLL_S)
                break
            except queue.Empty:
                if self.stopping.is_set():
                    raise EngineError("the weight transfer was stopped") from None
        if acked != self.version:
            raise EngineError(f"the engine began receiving version {acked}, "
                              f"expected {self.version}")

    def update_weights(self, update_info: dict) -> None:
        self.pushes.put(("update", update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.pushes.put(("finish",))


def receive_version(generator, version: int, take: Callable[[str], tuple], acks) -> None:
    """The engine's side of one version (after its ``("push", version, None)``): begin the
    update, ack, receive the broadcast into the model, finish. ``take(kind)``: the next
    message on the queue of pushes, which must be of that kind."""
    generator.start_weight_update()
    acks.put(version)
    _, update_info = take("update")
    generator.update_weights(update_info)
    take("finish")
    generator.finish_weight_update(version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NCCLSender:
    """The trainer's side: ``send`` stages a copy of the weights on the trainer's GPU and
    returns; one daemon thread sends the staged versions in order over NCCL, each when the
    engine reaches it in its schedule (see ``oapl.sources.ahead``).

    ``pushes``, ``acks``: the queues to and from the engine process; ``device``: the trainer's
    CUDA device index; ``world_size``: 1 + the engine's workers.

    Memory: a staged copy (every weight, full shape, in the engine's dtype) lives from ``send``
    until its broadcast is over, which is when the engine starts sampling the first batch that
    needs it. The caller sends only versions some batch samples with; at a push after step
    ``s`` the engine has started every batch the trainer has taken (up to ``ceil(s/k) - 1``),
    and the batches still to start that sample with a version <= ``s`` are the next
    ``ahead + 1`` at most (each one version), so at most ``ahead + 1`` staged copies are alive
    at once (plus vLLM's packing buffers during a broadcast).

    Errors (in the rendezvous or a send) are kept and raised as ``EngineError`` by ``check``."""

    def __init__(self, pushes, acks, device: int, world_size: int):
        self.jobs: queue.Queue = queue.Queue()  # (version, staged, ready); None: stop
        self.stopping = threading.Event()
        self.client = QueueClient(pushes, acks, self.stopping)
        self.error: str | None = None
        self.device = device
        self.thread = threading.Thread(target=self._run, args=(world_size,),
                                       name="oapl-nccl-sender", daemon=True)
        self.thread.start()

    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
             dtype: torch.dtype | None) -> None:
        """Queue version ``version``: device-to-device copies of the tensors (in ``dtype`` when
        given), enqueued on the trainer's stream; the trainer goes on as soon as they are."""
        staged = [(name, t.detach().to(dtype=dtype or t.dtype, copy=True))
                  for name, t in named_tensors]
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
