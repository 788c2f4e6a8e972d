"""The interface between the loop and where its batches come from: a ``BatchSource`` hands out
``ScoredBatch``es (rollouts with rewards, picklable) and takes the policy's weights as
(Hugging Face name, tensor) pairs. It knows nothing of the trainer: the loop collates each
batch, makes every push and keeps the trainer's frozen lag policy in step with them."""

from __future__ import annotations

from typing import Protocol

from ..batch import ScoredBatch
from ..engine.transport import Weights

__all__ = ["BatchSource", "ScoredBatch", "Weights"]


class BatchSource(Protocol):
    """Where the loop's batches come from (``oapl.sources.make_source``)."""

    # The HF directory of the model that sampled every row (as version 0), for a source whose
    # sampler never takes the trainer's weights (a rollout file); None when it does.
    fixed_sampler: str | None

    def start(self, step: int) -> None:
        """Called once before the first batch and the first push, after any resume: the
        trainer is at ``step``."""

    def next_batch(self) -> ScoredBatch:
        """The next batch, ``data.prompts_per_step`` groups."""

    def needs(self, version: int) -> bool:
        """Whether the sampler will sample with policy version ``version`` (the trainer's
        weights after step ``version``), i.e. whether ``push`` of it is worth making. The loop
        asks at the start and every ``algorithm.sync_every`` steps."""

    def push(self, weights: Weights, version: int) -> None:
        """The sampler takes ``weights`` as policy version ``version`` (only versions it
        ``needs``, in increasing order). ``weights`` may be a generator over the trainer's
        tensors: read through once, before returning; the tensors may change afterwards."""

    def state_dict(self) -> dict:
        """Its position and whatever it needs to continue exactly (picklable), stored in
        checkpoints (``source.pt``)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (before ``start``)."""

    def close(self) -> None:
        """Release what the source owns (an engine it built, a child process)."""
