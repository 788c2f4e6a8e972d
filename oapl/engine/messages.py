"""The messages between the trainer's process and an engine worker (``oapl.sources.worker``),
one dataclass each; everything here is picklable (tensors travel by shared memory).

Trainer -> worker, on the worker's inbox, in this order:

    Start(first, sampler_state)   once: the first batch to sample, the prompt sampler's position
    NcclInit(init_info)           once, with weight_transfer=nccl: join the trainer's NCCL group
    then per policy version the engine needs, in order, as its transport sends it:
      Push(version, weights)      shared memory: the weights themselves
      StartUpdate(version)        nccl: begin receiving ``version`` (acked by ``Began``), then
      Update(update_info)         the names, dtypes and shapes of the broadcast that follows
      Finish()                    the version is complete
    Stop()                        at any point: end now

Worker -> trainer: ``Sampled`` per batch or one ``Failed``, on the results queue;
``Began(version)`` on the acks queue (nccl only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..batch import ScoredBatch
from .adapter import AdapterWeights


@dataclass
class Start:
    first: int  # the first batch the engine samples
    sampler_state: dict  # the prompt sampler's position before batch ``first``


@dataclass
class Stop:
    pass


@dataclass
class Push:
    version: int
    # (HF name, tensor) pairs, or a LoRA adapter (oapl.engine.adapter); CPU, the engine's dtype
    weights: list[tuple[str, torch.Tensor]] | AdapterWeights


@dataclass
class NcclInit:
    init_info: dict  # vLLM's worker init payload (address, port, rank offset, world size)


@dataclass
class StartUpdate:
    version: int


@dataclass
class Update:
    update_info: dict  # vLLM's: names, dtype_names, shapes


@dataclass
class Finish:
    pass


@dataclass
class Began:
    version: int  # the engine has begun receiving this version


@dataclass
class Sampled:
    """One batch, sampled and scored by the engine process. ``sync_stall_s``: the seconds
    before it during which the engine could not sample because it waited for, or loaded, the
    version it was due to sample with; ``busy_frac``: the share of the engine's wall time since
    its previous batch spent sampling and scoring; ``queue``: finished batches waiting for the
    trainer when this one was done."""

    batch: int
    scored: ScoredBatch
    sampler_state: dict  # the prompt sampler's position after this batch
    busy_frac: float
    sync_stall_s: float
    queue: int


@dataclass
class Failed:
    traceback: str


class Stopped(Exception):
    """A ``Stop`` arrived."""


M = TypeVar("M")


def taker(inbox) -> Callable[[type[M]], M]:
    """``take(kind)``: the next message on ``inbox``, which must be a ``kind``; raises
    ``Stopped`` on ``Stop``."""
    def take(kind: type[M]) -> M:
        msg = inbox.get()
        if isinstance(msg, Stop):
            raise Stopped
        if not isinstance(msg, kind):
            raise RuntimeError(f"expected {kind.__name__}, got {type(msg).__name__}")
        return msg
    return take
