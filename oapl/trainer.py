"""One optimizer step from a batch of rollouts, through ``oapl_kernels``.

``collate`` turns rollouts into a ``TrainBatch`` of padded tensors; ``Trainer`` is the
interface the loop uses (a sharded trainer can implement it too); ``LocalTrainer`` runs the
policy on one device with AdamW, gradient accumulation over micro-batches and grad clipping.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import safetensors.torch
import torch

from oapl_kernels import grpo_loss, oapl_loss

from .config import Config
from .generator import Rollout
from .policy import Policy


@dataclass
class TrainBatch:
    """B rollouts as right-padded tensors; consecutive groups of G rows share a prompt.

    input_ids [B, L] int64: prompt then completion, then padding.
    attention_mask [B, L] int64: 1 on real tokens.
    loss_mask [B, L-1] bool: True where target t (= input_ids[:, t + 1]) is a completion token.
    inference_logprobs [B, L-1] fp32: the generator's log-prob of target t (0 off the mask).
    rewards [B] fp32; versions [B] int64: the policy version that sampled each row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    inference_logprobs: torch.Tensor
    rewards: torch.Tensor
    versions: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """Rows [start, stop), with the columns that are padding in all of them cut off."""
        length = int(self.attention_mask[start:stop].sum(dim=1).max())
        return TrainBatch(
            input_ids=self.input_ids[start:stop, :length],
            attention_mask=self.attention_mask[start:stop, :length],
            loss_mask=self.loss_mask[start:stop, : length - 1],
            inference_logprobs=self.inference_logprobs[start:stop, : length - 1],
            rewards=self.rewards[start:stop],
            versions=self.versions[start:stop],
        )

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(rollouts: Sequence[Rollout], rewards: Sequence[float], pad_id: int) -> TrainBatch:
    """Pack rollouts (in group order) and their rewards into a ``TrainBatch``."""
    if len(rollouts) != len(rewards):
        raise ValueError(f"{len(rollouts)} rollouts but {len(rewards)} rewards")
    if not rollouts:
        raise ValueError("collate needs at least one rollout")
    B = len(rollouts)
    L = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1), dtype=torch.bool)
    ref = torch.zeros((B, L - 1), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        if len(r.logprobs) != c:
            raise ValueError(
                f"rollout {i}: {len(r.logprobs)} log-probs for {c} completion tokens"
            )
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids, dtype=torch.long)
        attn[i, : p + c] = 1
        mask[i, p - 1 : p - 1 + c] = True
        ref[i, p - 1 : p - 1 + c] = torch.tensor(r.logprobs, dtype=torch.float32)
    return TrainBatch(
        input_ids=ids,
        attention_mask=attn,
        loss_mask=mask,
        inference_logprobs=ref,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        versions=torch.tensor([r.version for r in rollouts], dtype=torch.long),
    )


class Trainer(Protocol):
    """What the loop needs from a trainer."""

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch``; returns scalar metrics."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights with Hugging Face names, for the generator."""

    def save(self, directory: str) -> None:
        """Write model and optimizer state into the (existing) ``directory``."""

    def load(self, directory: str) -> None:
        """Restore the state ``save`` wrote."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LocalTrainer:
    """The policy on one device, AdamW, gradient accumulation over micro-batches of whole
    groups, grad-norm clipping. The loss is ``algorithm.name`` from ``oapl_kernels``."""

    def __init__(self, policy: Policy, cfg: Config):
        self.cfg = cfg
        self.policy = policy
        self.device = next(policy.parameters()).device
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(
            policy.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
        self.autocast_dtype = getattr(torch, t.autocast_dtype) if t.autocast_dtype else None
        if t.gradient_checkpointing:
            policy.model.gradient_checkpointing_enable()
        policy.train()

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """log pi_lag [B, L-1] of the batch's targets, from ``algorithm.ref_logprobs``:
        ``sampler`` takes the generator's own log-probs (at the sampling temperature)."""
        source = self.cfg.algorithm.ref_logprobs
        if source == "sampler":
            return batch.inference_logprobs
        raise ValueError(f"unsupported algorithm.ref_logprobs {source!r}")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, mb: TrainBatch):
        """The configured loss on micro-batch ``mb`` (an ``oapl_kernels`` LossOutput)."""
        with self._autocast():
            hidden = self.policy.hidden_states(mb.input_ids, mb.attention_mask)[:, :-1]
        weight = self.policy.lm_head_weight.to(hidden.dtype)
        targets = mb.input_ids[:, 1:]
        ref = self.reference_logprobs(mb)
        a, g = self.cfg.algorithm, self.cfg.generation
        common = dict(group_size=g.n, temperature=g.temperature, impl=self.cfg.trainer.kernel_impl)
        if a.name == "oapl":
            return oapl_loss(hidden, weight, targets, ref, mb.rewards, mb.loss_mask,
                             beta1=a.beta1, beta2=a.beta2, **common)
        old = "detached" if a.grpo_old == "detached" else None
        return grpo_loss(hidden, weight, targets, ref, mb.rewards, mb.loss_mask, clip_eps=a.clip_eps,
                         tis_cap=a.tis_cap, old_logprobs=old, **common)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """Accumulate gradients over micro-batches, clip, step. OAPL's loss is a mean over
        sequences and GRPO's over completion tokens, so each micro-batch's loss is weighted by
        its share of the batch's sequences (OAPL) or tokens (GRPO): the sum equals the loss
        of the whole batch."""
        batch = batch.to(self.device)
        B = len(batch)
        micro = self.cfg.trainer.micro_batch_size or B
        n_tok = int(batch.loss_mask.sum())
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "seq_logratio_mean": 0.0, "entropy_mean": 0.0, "adv_abs_mean": 0.0}
        for start in range(0, B, micro):
            mb = batch.rows(start, min(start + micro, B))
            out = self._loss(mb)
            seq_w = len(mb) / B
            tok_w = int(mb.loss_mask.sum()) / max(n_tok, 1)
            w = seq_w if self.cfg.algorithm.name == "oapl" else tok_w
            (out.loss * w).backward()
            sums["loss"] += float(out.loss.detach()) * w
            sums["seq_logratio_mean"] += float(out.seq_logratio_mean) * seq_w
            sums["entropy_mean"] += float(out.entropy_mean) * tok_w
            sums["adv_abs_mean"] += float(out.advantages.abs().mean()) * seq_w
        clip = self.cfg.trainer.grad_clip
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        tokens = float(batch.attention_mask.sum())
        return {**sums, "grad_norm": float(grad_norm), "train_tokens": tokens}

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.policy.named_weights()

    def save(self, directory: str) -> None:
        """Write ``model.safetensors`` (tied weights stored once) and ``optimizer.pt``."""
        path = os.path.join(directory, "model.safetensors")
        safetensors.torch.save_model(self.policy.model, path)
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))

    def load(self, directory: str) -> None:
        """Restore what ``save`` wrote."""
        safetensors.torch.load_model(
            self.policy.model, os.path.join(directory, "model.safetensors"), device=str(self.device)
        )
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device)
        self.optimizer.load_state_dict(state)
