"""Batches read from a rollout file (``oapl generate``; offline training, the paper's own
setup): no engine runs. The whole file is validated before the first step; groups are drawn
in reshuffled epochs. Every row is taken to come from the starting model (``model.path``,
the source's ``fixed_sampler``): its version is 0 in this run, so a step's lag counts the
optimizer steps taken since the start. With ``algorithm.lag_logprobs=recompute``, log pi_lag
comes from a frozen copy of that model (the loop sets it up)."""

from __future__ import annotations

import dataclasses

from transformers import AutoConfig

from ..batch import ScoredBatch
from ..config import Config
from ..prompts import PromptSampler
from .base import Weights
from .rollout_file import read_rollouts


class RolloutFileSource:
    """``data.prompts_per_step`` groups of ``cfg.data.rollouts`` per batch, with the file's
    stored V* (``oapl_loss(values=...)``) when it has them and the loss is OAPL. It needs no
    push: pi_lag stays the model that sampled the file."""

    def __init__(self, cfg: Config, model_path: str, tokenizer):
        a = cfg.algorithm
        self.cfg, self.fixed_sampler = cfg, model_path
        self.data = read_rollouts(
            cfg.data.rollouts, group_size=cfg.generation.n,
            temperature=cfg.generation.temperature, beta1=a.beta1 if a.name == "oapl" else None,
            vocab_size=AutoConfig.from_pretrained(model_path).vocab_size,
        )
        self.use_values = self.data.values is not None and a.name == "oapl"
        self.sampler = PromptSampler(self.data.num_groups, cfg.data.prompts_per_step, cfg.seed)

    def start(self, step: int) -> None:
        pass

    def next_batch(self) -> ScoredBatch:
        G = self.data.group_size
        rows = [g * G + j for g in self.sampler.next_batch() for j in range(G)]
        rollouts = [dataclasses.replace(self.data.rollouts[i], version=0) for i in rows]
        values = [self.data.values[i] for i in rows] if self.use_values else None
        return ScoredBatch(rollouts, [self.data.rewards[i] for i in rows], [False] * len(rows),
                           values=values)

    def needs(self, version: int) -> bool:
        return False

    def push(self, weights: Weights, version: int) -> None:
        raise RuntimeError("a rollout file takes no weights")

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        pass
