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
    in this run's optimizer steps), which reward calls ``failed``; ``timings``: seconds the
    trainer's process spent on it (``generate_s``, ``score_s`` inline, ``wait_s`` when the
    engine runs ahead), spread over the batch's minibatch steps and counted in their step
    time; ``metrics``: other per-step values added to each of its steps' records as they are
    (e.g. the engine's own timings when it runs in another process)."""

    rollouts: list[Rollout]
    train: TrainBatch
    failed: list[bool]
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class BatchSource(Protocol):
    """Where the loop's batches come from (``oapl.sources.make_source``)."""

    def start(self, trainer: Trainer, step: int) -> None:
        """Called once before the first batch, after any resume: the trainer is at ``step``."""

    def next_batch(self) -> SampledBatch:
        """The next batch, ``data.prompts_per_step`` groups."""

    def push(self, trainer: Trainer, step: int) -> None:
        """Called every ``algorithm.sync_every`` steps: the sampler takes the trainer's
        weights as policy version ``step`` (a no-op for a source without an engine)."""

    def state_dict(self) -> dict:
        """Its position and whatever it needs to continue exactly (picklable), stored in
        checkpoints (``source.pt``)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def close(self) -> None:
        """Release what the source owns (an engine it built, a child process)."""
