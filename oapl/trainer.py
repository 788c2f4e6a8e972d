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
from transformers import AutoModelForCausalLM

from oapl_kernels import grpo_loss, linear_logprobs, oapl_loss

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
    values [B] fp32 or None: a precomputed V* per row (offline rollout files), else OAPL
    computes it from the rewards.
    ref_logprobs [B, L-1] fp32 or None: log pi_lag of target t (0 off the mask), from
    ``LocalTrainer.reference_logprobs`` when the batch was generated (while the weights that
    sampled it are still the frozen reference's); None: the trainer asks for it at the step.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    inference_logprobs: torch.Tensor
    rewards: torch.Tensor
    versions: torch.Tensor
    values: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

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
            values=None if self.values is None else self.values[start:stop],
            ref_logprobs=None if self.ref_logprobs is None
            else self.ref_logprobs[start:stop, : length - 1],
        )

    def to(self, device: torch.device) -> "TrainBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrainBatch(**{k: v if v is None else v.to(device) for k, v in moved.items()})


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

    def save_pretrained(self, directory: str) -> None:
        """Write the model as a Hugging Face directory (safetensors)."""

    def freeze_reference(self, version: int) -> None:
        """The generator now holds the current weights, as policy ``version``."""

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """log pi_lag [B, L-1] fp32 of the batch's targets, from ``algorithm.ref_logprobs``."""


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
        # ref_logprobs=recompute: a frozen copy of the weights the generator holds, and their
        # policy version (see freeze_reference).
        self.reference: Policy | None = None
        self.reference_version: int | None = None

    def freeze_reference(self, version: int) -> None:
        """Call whenever the generator gets the current weights, as policy ``version``. With
        ``algorithm.ref_logprobs=recompute`` they are copied (from ``named_weights``, i.e. the
        tensors pushed) into the frozen reference: built on first use from the model's config,
        in the policy's dtype on its device, no grad, eval mode, no optimizer state; one more
        copy of the weights in memory. Otherwise nothing."""
        if self.cfg.algorithm.ref_logprobs != "recompute":
            return
        if self.reference is None:
            dtype = next(self.policy.parameters()).dtype
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(self.policy.model.config, dtype=dtype)
            self.reference = Policy(model.requires_grad_(False).eval())
        params = dict(self.reference.model.named_parameters())
        with torch.no_grad():
            for name, tensor in self.named_weights():
                params[name].copy_(tensor)
        self.reference_version = version

    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """log pi_lag [B, L-1] fp32 of the batch's targets (0 off the mask), on the batch's
        device, from ``algorithm.ref_logprobs``: ``sampler`` takes the generator's own
        log-probs (at the sampling temperature); ``recompute`` runs the frozen reference
        forward only (no grad, the trainer's autocast, in micro-batches) through
        ``linear_logprobs`` at the training temperature: no [N, V] logits. Every row must
        have been sampled by the reference's version (call it right after generating)."""
        source = self.cfg.algorithm.ref_logprobs
        if source == "sampler":
            return batch.inference_logprobs
        if source != "recompute":
            raise ValueError(f"unsupported algorithm.ref_logprobs {source!r}")
        if self.reference is None or bool((batch.versions != self.reference_version).any()):
            raise ValueError(
                f"rows sampled by policy versions {sorted(set(batch.versions.tolist()))}, but "
                f"the frozen reference holds {self.reference_version}: compute "
                "reference_logprobs right after generating, and call freeze_reference at each push"
            )
        out = torch.zeros_like(batch.inference_logprobs)
        micro = self.cfg.trainer.micro_batch_size or len(batch)
        for start in range(0, len(batch), micro):
            mb = batch.rows(start, min(start + micro, len(batch))).to(self.device)
            with torch.no_grad():
                with self._autocast():
                    hidden = self.reference.hidden_states(mb.input_ids, mb.attention_mask)[:, :-1]
                targets = mb.input_ids[:, 1:].masked_fill(~mb.loss_mask, -100)
                logp = linear_logprobs(
                    hidden, self.reference.lm_head_weight.to(hidden.dtype), targets,
                    temperature=self.cfg.generation.temperature, ignore_index=-100,
                    impl=self.cfg.trainer.kernel_impl,
                )
            out[start : start + len(mb), : logp.shape[1]] = logp.to(out.device)
        return out

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
        ref = mb.ref_logprobs if mb.ref_logprobs is not None else self.reference_logprobs(mb)
        a, g = self.cfg.algorithm, self.cfg.generation
        common = dict(group_size=g.n, temperature=g.temperature, impl=self.cfg.trainer.kernel_impl)
        if a.name == "oapl":
            return oapl_loss(hidden, weight, targets, ref, mb.rewards, mb.loss_mask,
                             beta1=a.beta1, beta2=a.beta2, values=mb.values, **common)
        old = "detached" if a.grpo_old == "detached" else None
        return grpo_loss(hidden, weight, targets, ref, mb.rewards, mb.loss_mask, clip_eps=a.clip_eps,
                         tis_cap=a.tis_cap, old_logprobs=old, **common)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """Accumulate gradients over micro-batches, clip, step. OAPL's loss is a mean over
        sequences and GRPO's over completion tokens, so each micro-batch's loss is weighted by
        its share of the batch's sequences (OAPL) or tokens (GRPO): the sum equals the loss
        of the whole batch. ``sampler_absdiff_mean`` / ``_max``: |log pi_theta - the
        generator's log-prob| per completion token, at the weights before the step (when the
        generator holds them too, the sampler-trainer mismatch, measured for free)."""
        batch = batch.to(self.device)
        B = len(batch)
        micro = self.cfg.trainer.micro_batch_size or B
        n_tok = int(batch.loss_mask.sum())
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "seq_logratio_mean": 0.0, "entropy_mean": 0.0, "adv_abs_mean": 0.0}
        absdiff = []
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
            absdiff.append((out.logprobs - mb.inference_logprobs).abs()[mb.loss_mask])
        absdiff = torch.cat(absdiff)
        clip = self.cfg.trainer.grad_clip
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        tokens = float(batch.attention_mask.sum())
        return {**sums, "grad_norm": float(grad_norm), "train_tokens": tokens,
                "sampler_absdiff_mean": float(absdiff.mean()) if len(absdiff) else 0.0,
                "sampler_absdiff_max": float(absdiff.max()) if len(absdiff) else 0.0}

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.policy.named_weights()

    def save_pretrained(self, directory: str) -> None:
        self.policy.model.save_pretrained(directory)

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
