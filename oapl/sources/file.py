"""Batches read from a rollout file (``oapl generate``; offline training, the paper's own
setup): no engine runs. The whole file is validated before the first step; groups are drawn
in reshuffled epochs. Every row is taken to come from the starting model (``model.path``):
its version is 0 in this run, so a step's lag counts the optimizer steps taken since the start.
With ``algorithm.lag_logprobs=recompute``, log pi_lag comes from a frozen copy of that model."""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig

from ..batch import collate, pad_token_id
from ..config import Config
from ..model_dir import hf_weights
from ..prompts import PromptSampler
from ..training.trainer import Trainer
from .base import SampledBatch
from .rollout_file import read_rollouts


class RolloutFileSource:
    """``data.prompts_per_step`` groups of ``cfg.data.rollouts`` per batch, with the file's
    stored V* (``oapl_loss(values=...)``) when it has them and the loss is OAPL."""

    def __init__(self, cfg: Config, model_path: str, tokenizer):
        a = cfg.algorithm
        self.cfg, self.model_path = cfg, model_path
        self.data = read_rollouts(
            cfg.data.rollouts, group_size=cfg.generation.n,
            temperature=cfg.generation.temperature, beta1=a.beta1 if a.name == "oapl" else None,
            vocab_size=AutoConfig.from_pretrained(model_path).vocab_size,
        )
        self.use_values = self.data.values is not None and a.name == "oapl"
        self.pad_id = pad_token_id(tokenizer)
        self.sampler = PromptSampler(self.data.num_groups, cfg.data.prompts_per_step, cfg.seed)

    def start(self, trainer: Trainer, step: int) -> None:
        if self.cfg.algorithm.lag_logprobs == "recompute":  # the starting model, even on resume
            trainer.freeze_lag_policy(0, hf_weights(self.model_path, self.cfg.model.dtype))

    def next_batch(self) -> SampledBatch:
        G = self.data.group_size
        rows = [g * G + j for g in self.sampler.next_batch() for j in range(G)]
        rollouts = [dataclasses.replace(self.data.rollouts[i], version=0) for i in rows]
        train = collate(rollouts, [self.data.rewards[i] for i in rows], self.pad_id)
        if self.use_values:
            train.values = torch.tensor([self.data.values[i] for i in rows], dtype=torch.float32)
        return SampledBatch(rollouts, train, [False] * len(rows))

    def push(self, trainer: Trainer, step: int) -> None:
        """No engine: pi_lag stays the model that sampled the file."""

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        pass
