"""What the loop takes from a batch source: ``SampledBatch`` and the ``BatchSource`` interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..batch import Rollout, TrainBatch
from ..training.trainer import Trainer


@dataclass
class SampledBatch:
    """One batch of groups, scored: its ``rollouts`` (in group order), their tensors
    (``train``; ``train.versions`` are the policy versions that sampled each row, counted
    in this run's optimizer steps), which reward calls ``failed``, and ``timings`` (seconds
    spent on the trainer's side: ``generate_s``, ``score_s``, ...), which the loop spreads
    over the batch's minibatch steps."""

    rollouts: list[Rollout]
    train: TrainBatch
    failed: list[bool]
    timings: dict[str, float] = field(default_factory=dict)


class BatchSource(Protocol):
    """Where the loop's batches come from (``oapl.sources.make_source``)."""

    def start(self, trainer: Trainer, step: int) -> None:
        """Called once before the first batch, after any resume: the trainer is at ``step``."""

    def next_batch(self) -> SampledBatch:
        """The next batch, ``data.prompts_per_step`` groups."""

    def push(self, trainer: Trainer, step: int) -> None:
        """Called every ``algorithm.sync_every`` steps: the sampler takes the trainer's
        weights as policy version ``step`` (a no-op for a source without an engine)."""

    def metrics(self) -> dict[str, float]:
        """Source-specific metrics for the current step's record."""

    def state_dict(self) -> dict:
        """JSON-serializable position, stored in checkpoints."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def close(self) -> None:
        """Release what the source owns (an engine it built, a child process)."""
