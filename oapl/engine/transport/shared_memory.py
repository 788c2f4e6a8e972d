"""Weights through shared memory (``generation.weight_transfer: shared_memory``): the trainer
copies them to the CPU in the wire dtype and queues one ``Push``; torch.multiprocessing shares
the copies' storage with the engine's process (no serialization, no disk), which loads them
between its own requests."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from ..adapter import AdapterWeights
from ..messages import Push
from .base import Weights


def cpu_copies(weights: Weights, dtype: torch.dtype | None) -> list[tuple[str, torch.Tensor]]:
    """Fresh CPU copies (in ``dtype`` when given) of the tensors, for another process: the
    trainer keeps updating its own."""
    return [(name, t.detach().to("cpu", dtype or t.dtype, copy=True)) for name, t in weights]


class SharedMemorySender:
    """``send`` queues a ``Push`` of CPU copies on ``inbox`` (the worker's)."""

    def __init__(self, inbox, dtype: torch.dtype | None):
        self.inbox, self.dtype = inbox, dtype
        sys.excepthook = _quiet_resource_sharer

    def send(self, version: int, weights: Weights | AdapterWeights) -> None:
        copy = (weights.cpu_copy(self.dtype) if isinstance(weights, AdapterWeights)
                else cpu_copies(weights, self.dtype))
        self.inbox.put(Push(version, copy))

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


class SharedMemoryReceiver:
    """Loads each ``Push`` into the engine (``VLLMGenerator.load_weights``)."""

    def open(self, engine, take: Callable) -> None:
        pass

    def receive(self, engine, version: int, take: Callable) -> None:
        push = take(Push)
        if push.version != version:
            raise RuntimeError(f"push {push.version} came, expected push {version}")
        engine.load_weights(push.weights, version)


def _quiet_resource_sharer(exc_type, exc, tb) -> None:
    """``sys.excepthook`` in the sending process, without the traceback that multiprocessing's
    resource sharer thread prints (through ``sys.excepthook``) when the engine process dies
    while receiving a push: the peer resets the connection that hands over the tensors' file
    descriptors. The dead engine is reported by whoever waits on it, in one line."""
    frames = []
    t = tb
    while t is not None:
        frames.append(t.tb_frame.f_code.co_filename)
        t = t.tb_next
    sharer = os.path.join("multiprocessing", "resource_sharer.py")
    if issubclass(exc_type, (ConnectionError, EOFError)) and any(
            f.endswith(sharer) for f in frames):
        return
    _default_excepthook(exc_type, exc, tb)


_default_excepthook = sys.excepthook
