"""One optimizer step from a ``TrainBatch``, through ``oapl_kernels``.

``Trainer`` is the interface the loop uses; ``LocalTrainer`` runs the policy on one device with
AdamW, gradient accumulation over micro-batches and grad clipping. Its step is written once:
a sharded trainer (``oapl.training.fsdp_trainer``) overrides only how the batch is shared out
(``_share``), what happens before each micro-batch (``_before_micro_batch``) and how the
metrics and the gradient norm are reduced (``_reduce``, ``_full_norm``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from oapl_kernels import grpo_loss, linear_logprobs, oapl_loss

from ..batch import TrainBatch
from ..config import Config
from ..metrics import GAP_SUMS, gap_metrics, gap_sums
from . import packing
from .policy import Policy


class Trainer(Protocol):
    """What the loop needs from a trainer."""

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch``; returns scalar metrics."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights with Hugging Face names (with LoRA: merged)."""

    def push_weights(self):
        """What a push hands the engine: ``named_weights``, or with ``model.lora`` the adapter
        (an ``oapl.engine.adapter.AdapterWeights``)."""

    def save(self, directory: str) -> None:
        """Write model and optimizer state into the (existing) ``directory``."""

    def load(self, directory: str) -> None:
        """Restore the state ``save`` wrote."""

    def save_pretrained(self, directory: str) -> None:
        """Write the model as a Hugging Face directory (safetensors)."""

    def freeze_lag_policy(self, version: int, weights=None) -> None:
        """The sampler now holds policy ``version``: the current weights, or ``weights``
        ((HF name, tensor) pairs) when given; kept until ``release_lag_policies``."""

    def release_lag_policies(self, oldest_needed: int | None) -> None:
        """Drop the frozen copies of versions older than ``oldest_needed``."""

    def lag_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """log pi_lag [B, L-1] fp32 of the batch's targets, from ``algorithm.lag_logprobs``."""


# The frozen lag copies in a checkpoint directory (LocalTrainer.save_lag_policies).
LAG_POLICIES_FILE = "lag_policies.safetensors"


def _select(batch: TrainBatch, rows: torch.Tensor) -> TrainBatch:
    """The rows ``rows`` (int64 [R]) of ``batch``."""
    return TrainBatch(**{f.name: None if (t := getattr(batch, f.name)) is None else t[rows]
                         for f in dataclasses.fields(batch)})


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
            policy.trainable_parameters(), lr=t.lr, betas=tuple(t.betas),
            weight_decay=t.weight_decay
        )
        self.autocast_dtype = getattr(torch, t.autocast_dtype) if t.autocast_dtype else None
        # The loss kernels' scratch memory (trainer.workspace_mb; None: their default) and their
        # gradient filtering (trainer.grad_filter_eps; 0: exact). The losses gather the
        # completion tokens before the head kernels: prompt and padding positions never reach them.
        self.kernel_args = dict(impl=t.kernel_impl, workspace_bytes=None if t.workspace_mb is None
                                else t.workspace_mb * 2**20, grad_filter_eps=t.grad_filter_eps)
        if t.gradient_checkpointing:
            policy.model.gradient_checkpointing_enable()
        policy.train()
        self.packing = t.packing if t.packing is not None else packing.default_packing(policy)
        self.row_tokens = packing.row_tokens_for(policy, t.packed_row_tokens)
        # lag_logprobs=recompute: frozen copies of the weights the sampler held, by policy
        # version, while some batch still to come may have been sampled by them (see
        # freeze_lag_policy and release_lag_policies).
        self.lag_policies: dict[int, Policy] = {}
        self.fresh_version: int | None = None  # the copy equal to the current weights, if any

    def freeze_lag_policy(
        self, version: int, weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    ) -> None:
        """Call whenever the sampler gets new weights, as policy ``version``: the current ones
        (``named_weights``, i.e. the tensors pushed), or ``weights`` when given (e.g. the model
        that sampled a rollout file). With ``algorithm.lag_logprobs=recompute`` they are copied
        into a frozen lag policy kept for that version (replacing one of the same version):
        built from the model's config, in the policy's dtype on its device, no grad, eval mode,
        no optimizer state; one more copy of the weights in memory per version kept, until
        ``release_lag_policies`` drops it. Otherwise nothing."""
        if self.cfg.algorithm.lag_logprobs != "recompute":
            return
        if self.policy.lora is not None:  # the same base with a frozen copy of the adapter
            self.lag_policies[version] = self.policy.frozen_copy(weights)
            self.fresh_version = version if weights is None else None
            return
        lag = self.lag_policies.pop(version, None)
        if lag is None:
            dtype = next(self.policy.parameters()).dtype
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(self.policy.model.config, dtype=dtype)
            lag = Policy(model.requires_grad_(False).eval())
        params = dict(lag.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights if weights is not None else self.named_weights():
                params[name].copy_(tensor)
        self.lag_policies[version] = lag
        self.fresh_version = version if weights is None else None

    def release_lag_policies(self, oldest_needed: int | None) -> None:
        """Drop the frozen copies of versions older than ``oldest_needed``, the oldest version
        a batch still to be drawn may have been sampled by (None: keep all)."""
        if oldest_needed is None:
            return
        for version in [v for v in self.lag_policies if v < oldest_needed]:
            del self.lag_policies[version]

    def lag_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """log pi_lag [B, L-1] fp32 of the batch's targets (0 off the mask), on the batch's
        device, from ``algorithm.lag_logprobs``: ``sampler`` takes the engine's own
        log-probs (at the sampling temperature); ``recompute`` runs, for each policy version
        among the rows, that version's frozen copy forward only (no grad, the trainer's
        autocast, in micro-batches) through ``linear_logprobs`` at the training temperature:
        no [N, V] logits. Every row's version must still be frozen (call it when the batch is
        drawn, before the copies of its versions are released)."""
        source = self.cfg.algorithm.lag_logprobs
        if source == "sampler":
            return batch.sampler_logprobs
        if source != "recompute":
            raise ValueError(f"unsupported algorithm.lag_logprobs {source!r}")
        versions = sorted(set(batch.versions.tolist()))
        missing = [v for v in versions if v not in self.lag_policies]
        if missing:
            raise ValueError(
                f"rows sampled by policy versions {versions}, but the frozen lag policies hold "
                f"{sorted(self.lag_policies)}: compute lag_logprobs when the batch is drawn, and "
                "call freeze_lag_policy at each push"
            )
        out = torch.zeros_like(batch.sampler_logprobs)
        for version in versions:
            rows = (batch.versions == version).nonzero().flatten()
            part = batch if len(rows) == len(batch) else _select(batch, rows)
            logp = self._frozen_logprobs(self.lag_policies[version], part)
            out[rows.to(out.device), : logp.shape[1]] = logp.to(out.device)
        return out

    def _frozen_logprobs(self, lag: Policy, batch: TrainBatch) -> torch.Tensor:
        """The frozen policy ``lag``'s log-probs [B, <=L-1] fp32 of ``batch``'s targets."""
        out = torch.zeros_like(batch.sampler_logprobs)
        for start, stop in self._micro_batches(batch, sharded=False):
            mb = batch.rows(start, stop).to(self.device)
            with torch.no_grad():
                with self._autocast():
                    hidden = self._hidden_states(lag, mb)[:, :-1]
                targets = mb.input_ids[:, 1:].masked_fill(~mb.loss_mask, -100)
                logp = linear_logprobs(
                    hidden, lag.lm_head_weight.to(hidden.dtype), targets,
                    temperature=self.cfg.generation.temperature, ignore_index=-100,
                    **self.kernel_args,
                )
            out[start : start + len(mb), : logp.shape[1]] = logp.to(out.device)
        return out

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _hidden_states(self, policy: Policy, mb: TrainBatch) -> torch.Tensor:
        """``policy``'s last hidden states [B, L, D] of ``mb`` in its padded layout, computed
        on packed rows when ``trainer.packing`` (``oapl.training.packing``)."""
        return packing.hidden_states(policy, mb, packing=self.packing, row_tokens=self.row_tokens)

    def _micro_batches(self, batch: TrainBatch, sharded: bool = True) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of ``batch``'s micro-batches, whole groups each, from
        ``trainer.max_tokens_per_micro_batch`` and ``micro_batch_size``; ``sharded``: as many
        as every other process runs (``_agree_count``)."""
        t = self.cfg.trainer
        kw = dict(packing=self.packing, max_tokens=t.max_tokens_per_micro_batch,
                  micro_batch_size=t.micro_batch_size, row_tokens=self.row_tokens)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        plan = packing.plan_micro_batches(lengths, self.cfg.generation.n, **kw)
        count = self._agree_count(len(plan)) if sharded else len(plan)
        if count != len(plan):
            plan = packing.plan_micro_batches(lengths, self.cfg.generation.n, count=count, **kw)
        return plan

    def _loss(self, mb: TrainBatch):
        """The configured loss on micro-batch ``mb`` (an ``oapl_kernels`` LossOutput)."""
        with self._autocast():
            hidden = self._hidden_states(self.policy, mb)[:, :-1]
        weight = self.policy.lm_head_weight.to(hidden.dtype)
        targets = mb.input_ids[:, 1:]
        lag = mb.lag_logprobs if mb.lag_logprobs is not None else self.lag_logprobs(mb)
        a, g = self.cfg.algorithm, self.cfg.generation
        common = dict(group_size=g.n, temperature=g.temperature, **self.kernel_args)
        if a.name == "oapl":
            return oapl_loss(hidden, weight, targets, lag, mb.rewards, mb.loss_mask,
                             beta1=a.beta1, beta2=a.beta2, values=mb.values, **common)
        old = "detached" if a.grpo_old == "detached" else None
        return grpo_loss(hidden, weight, targets, lag, mb.rewards, mb.loss_mask, clip_eps=a.clip_eps,
                         tis_cap=a.tis_cap, old_logprobs=old, **common)

    # -- the step: written once; a sharded trainer overrides the five hooks below ------------

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch``; returns scalar metrics. ``token_logratio_abs_mean``
        / ``_max``: |log pi_theta - the sampler's log-prob| per completion token at the weights
        before the step (at lag 0 this is the engine-trainer mismatch, measured for free);
        ``sampler_gap_*`` and ``lag_loss_*`` / ``lag_residual_abs_*`` (``metrics.gap_metrics``):
        the sampler's log pi_lag against the recomputed one with ``lag_logprobs=recompute``,
        else against the current policy's (meaningful at lag 0 only)."""
        m = self._step(*self._share(batch))
        self.fresh_version = None  # the weights moved
        return {**m, "train_tokens": float(batch.attention_mask.sum())}

    def _share(self, batch: TrainBatch) -> tuple[TrainBatch, int, int]:
        """This process's rows of ``batch``, with the batch's sequence and completion-token
        counts (the micro-batch weights' denominators)."""
        return batch, len(batch), batch.num_completion_tokens

    def _agree_count(self, count: int) -> int:
        """The number of micro-batches every process runs, given this one's plan needs
        ``count`` (sharded: the largest over processes)."""
        return count

    def _before_micro_batch(self, i: int, count: int) -> None:
        """Called before micro-batch ``i`` of ``count``."""

    def _reduce(self, sums: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Metric sums (float64 [8]) and maxima (float64 [1]) over all processes."""
        return sums, top

    def _full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The gradient norm over the whole model."""
        return norm

    def _step(self, local: TrainBatch, B: int, n_tok: int) -> dict[str, float]:
        """Accumulate gradients over this process's micro-batches, clip, step. OAPL's loss is a
        mean over sequences and GRPO's over completion tokens (``LossOutput.weighting``), so
        each micro-batch's loss is weighted by its share of the whole batch's ``B`` sequences
        or ``n_tok`` completion tokens: the sum equals the loss of the whole batch, however the
        micro-batches are formed (``_micro_batches``) and whether they are packed."""
        local = local.to(self.device)
        plan = self._micro_batches(local)
        self.optimizer.zero_grad(set_to_none=True)
        # loss, seq_logratio_mean, entropy_mean, adv_abs_mean, sum and count of |logp - sampler|,
        # positions the forwards processed, real tokens among them; then gap_sums
        sums = torch.zeros(8 + len(GAP_SUMS), dtype=torch.float64)
        top = torch.zeros(1, dtype=torch.float64)  # max |logp - sampler|
        a = self.cfg.algorithm
        for i, (start, stop) in enumerate(plan):
            mb = local.rows(start, stop)
            if mb.lag_logprobs is None:
                mb.lag_logprobs = self.lag_logprobs(mb)
            self._before_micro_batch(i, len(plan))
            out = self._loss(mb)
            seq_w = len(mb) / B
            tok_w = mb.num_completion_tokens / max(n_tok, 1)
            w = seq_w if out.weighting == "sequence" else tok_w
            (out.loss * w).backward()
            diff = (out.logprobs - mb.sampler_logprobs).abs()[mb.loss_mask].double()
            lengths = mb.attention_mask.sum(dim=1).tolist()
            sums[:8] += torch.tensor([
                float(out.loss.detach()) * w, float(out.seq_logratio_mean) * seq_w,
                float(out.entropy_mean) * tok_w, float(out.advantages.abs().mean()) * seq_w,
                float(diff.sum()), diff.numel(),
                packing.forward_positions(lengths, packing=self.packing, row_tokens=self.row_tokens),
                sum(lengths)], dtype=torch.float64)
            # The sampler's log pi_lag against the trainer's: the recomputed one, else the
            # current policy's (the same weights at lag 0 only; the loop keeps it there).
            ref = mb.lag_logprobs if a.lag_logprobs == "recompute" else out.logprobs
            oapl = out.residuals is not None
            sums[8:] += gap_sums(ref, mb.sampler_logprobs, mb.loss_mask, out.logprobs,
                                 out.advantages, a.beta2 if oapl else None)
            if diff.numel():
                top = torch.maximum(top, diff.max().cpu().reshape(1))
        sums, top = self._reduce(sums, top)
        clip = self.cfg.trainer.grad_clip
        params = [p for p in self.policy.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        loss, logratio, entropy, adv, diff_sum, diff_n, positions, real = sums[:8].tolist()
        return {"loss": loss, "seq_logratio_mean": logratio, "entropy_mean": entropy,
                "adv_abs_mean": adv, "grad_norm": float(self._full_norm(norm)),
                "token_logratio_abs_mean": diff_sum / diff_n if diff_n else 0.0,
                "token_logratio_abs_max": float(top),
                "train_pad_share": 1.0 - real / positions if positions else 0.0,
                "micro_batches": float(len(plan)),
                **gap_metrics(sums[8:], diff_n, with_loss=a.name == "oapl")}

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.policy.named_weights()

    def push_weights(self):
        # Full weights (merged with LoRA) through named_weights, which a subclass may
        # override (FSDP gathers).
        return self.policy.push_weights() if self.policy.pushes_adapter else self.named_weights()

    def save_pretrained(self, directory: str) -> None:
        """The model (with LoRA: the adapter, or merged with ``output.merge_lora``)."""
        self.policy.save_pretrained(directory, merge_lora=self.cfg.output.merge_lora)

    def save(self, directory: str) -> None:
        """Write the trained weights (``Policy.save_weights``: the model, or the adapter) and
        ``optimizer.pt``."""
        self.policy.save_weights(directory)
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        self.save_lag_policies(directory)

    def load(self, directory: str) -> None:
        """Restore what ``save`` wrote."""
        self.policy.load_weights(directory)
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device)
        self.optimizer.load_state_dict(state)
        self.load_lag_policies(directory)

    def save_lag_policies(self, directory: str) -> None:
        """Write the frozen copies a resumed run still needs into ``directory``
        (``LAG_POLICIES_FILE``, tensors named ``<version>/<HF name>``, with LoRA
        ``<version>/<adapter tensor name>``: the frozen adapters only; no file when there are
        none): all but the one equal to the current weights (the resumed run's first push
        freezes that again). With the engine ahead, the batches a checkpoint carries were
        sampled by such older versions."""
        if self.policy.lora is not None:
            from .lora import frozen_state

            named = {v: frozen_state(lag).items() for v, lag in self.lag_policies.items()}
        else:
            named = {v: ((name, p.detach().cpu().contiguous())
                         for name, p in lag.model.named_parameters())
                     for v, lag in self.lag_policies.items()}
        tensors = {f"{v}/{name}": t for v, pairs in named.items() if v != self.fresh_version
                   for name, t in pairs}
        path = os.path.join(directory, LAG_POLICIES_FILE)
        if tensors:
            safetensors.torch.save_file(tensors, path)
        elif os.path.exists(path):
            os.remove(path)

    def load_lag_policies(self, directory: str) -> None:
        """Replace the frozen copies with those ``save_lag_policies`` wrote (none if none)."""
        self.lag_policies.clear()
        self.fresh_version = None
        path = os.path.join(directory, LAG_POLICIES_FILE)
        if not os.path.exists(path):
            return
        by_version: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for key, tensor in safetensors.torch.load_file(path).items():
            version, name = key.split("/", 1)
            by_version.setdefault(int(version), []).append((name, tensor))
        for version, named in sorted(by_version.items()):
            if self.policy.lora is not None:
                from .lora import frozen_from_state

                self.lag_policies[version] = frozen_from_state(self.policy, dict(named))
            else:
                self.freeze_lag_policy(version, named)
