"""The fixed schedule of an engine sampling ``generation.ahead`` batches ahead of the trainer.

Batch ``b`` (0-based; the trainer trains it at steps ``b*k+1 .. (b+1)*k`` with
``k = trainer.minibatches``) is sampled by policy version

    sampling_version(b) = floor(max(0, (b - K) * k) / L) * L        (L = algorithm.sync_every)

the weights of the last push at or before the step at which the trainer starts batch
``b - K``. (K = 0 gives the inline loop's versions.) So every row's version, hence every
metric, depends on the config and seed only, whatever the timing; and the lag of a step is at
most ``lag_bound = (K + 1) * k - 1 + L - gcd(k, L)``.
"""

from __future__ import annotations

import math


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


class Scheduled:
    """What a source on this schedule shares: ``needs`` and the checkpoint state. A subclass
    sets ``cfg``, ``next`` (the next batch to train), ``first`` (the first batch it samples),
    ``pending`` (finished batches taken off the sampler or restored, oldest first; each with
    its ``sampler_state``, the prompt sampler's position after it), ``sampler_state`` (after
    the last batch taken or drained) and ``sender`` (None before ``start``), and defines
    ``take_due()``: the batch after the pending ones, waiting for it."""

    fixed_sampler = None

    def take_due(self):
        raise NotImplementedError

    def needs(self, version: int) -> bool:
        g, k = self.cfg.generation, self.cfg.trainer.minibatches
        total = self.cfg.trainer.steps // k
        return push_needed(version, self.first, total, g.ahead, k, self.cfg.algorithm.sync_every)

    def state_dict(self) -> dict:
        """Waits for the batches already due (sampled with weights older than the trainer's)
        and returns them with the position after them."""
        total = self.cfg.trainer.steps // self.cfg.trainer.minibatches
        due = min(self.next + self.cfg.generation.ahead, total)
        while self.next + len(self.pending) < due:
            d = self.take_due()
            self.pending.append(d)
            self.sampler_state = d.sampler_state
        return {"next": self.next, "sampler": self.sampler_state, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        if self.sender is not None:
            raise ValueError("load_state_dict must come before start")
        self.next, self.sampler_state = state["next"], state["sampler"]
        self.pending = list(state["pending"])
