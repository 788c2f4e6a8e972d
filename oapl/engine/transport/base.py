"""The weight transport: how a policy version travels from the trainer to an engine.

The trainer's side is a ``WeightSender``: ``send(version, weights)`` hands over (HF name,
tensor) pairs as policy ``version`` and returns once the trainer may change its own tensors.
The engine's side, for an engine in a worker process, is a ``WeightReceiver``: it reads the
transport's messages (``oapl.engine.messages``) off the worker's inbox and loads the version
into the engine. One file per transport (``oapl.engine.transport``). Every transport sends in
``wire_dtype``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

Weights = Iterable[tuple[str, torch.Tensor]]  # (Hugging Face name, tensor)


def wire_dtype(engine_dtype: str) -> torch.dtype | None:
    """The dtype weights travel in for an engine of ``engine_dtype`` (``generation.dtype``):
    the engine's own, or None (each tensor's own) for ``auto``. The engine casts what it
    loads into its parameters' dtype either way; sending in it halves a bf16 engine's copy."""
    return None if engine_dtype == "auto" else getattr(torch, engine_dtype)


class WeightSender(Protocol):
    """The trainer's side of a transport."""

    def send(self, version: int, weights: Weights) -> None:
        """Hand ``weights`` over as policy ``version`` (versions increase). Returns once the
        caller may change its tensors; the engine may load them later."""

    def check(self) -> None:
        """Raise ``oapl.errors.EngineError`` if a send failed after it returned."""

    def close(self) -> None:
        """Release what the transport holds (threads, groups); never waits long."""


class StagedSender:
    """A sender whose versions wait, staged, until the caller's schedule delivers them (the
    transports to vLLM servers: ``oapl.sources.servers`` calls ``deliver(version)`` when the
    servers are due to take it). ``send`` stages in the trainer's thread; ``has``, ``take`` and
    ``drop_staged`` may run in another."""

    def __init__(self):
        self.staged: dict[int, Any] = {}
        self.lock = threading.Lock()

    def stage(self, version: int, item: Any) -> None:
        with self.lock:
            self.staged[version] = item

    def has(self, version: int) -> bool:
        with self.lock:
            return version in self.staged

    def take(self, version: int) -> Any:
        """The staged ``version``, no longer staged."""
        with self.lock:
            return self.staged.pop(version)

    def drop_staged(self) -> list[int]:
        """Forget every staged version; the versions it held."""
        with self.lock:
            versions, self.staged = list(self.staged), {}
        return versions

    def check(self) -> None:
        """Failures surface from ``deliver``, in the caller's thread."""


class WeightReceiver(Protocol):
    """The engine's side of a transport, in the engine's worker process. ``take(kind)`` returns
    the next message on the worker's inbox, which must be a ``kind``."""

    def open(self, engine, take: Callable) -> None:
        """Once, before the first version: whatever the transport sets up (e.g. a group)."""

    def receive(self, engine, version: int, take: Callable) -> None:
        """Load the next version the trainer sends, which must be ``version``, into ``engine``
        (a ``VLLMGenerator``)."""
