"""``metrics.jsonl``: one JSON object per optimizer step, appended and flushed as it goes; and
the statistics of the gap between the sampler's log pi_lag and the trainer's (``gap_sums``,
``gap_metrics``)."""

from __future__ import annotations

import json
import math
import os
import time

import torch

# The float64 sums gap_sums returns, in order (summable over micro-batches and processes).
GAP_SUMS = ("gap", "gap_sq", "seqs", "res_sampler_sq", "res_recompute_sq", "res_sampler_abs",
            "res_recompute_abs")


def read_metrics(path: str) -> list[dict]:
    """All complete records of a metrics file (a torn last line, from a kill, is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class MetricsLog:
    """Appends records to ``path``. ``truncate_after(step)`` first drops records of steps
    after ``step`` (those a resumed run will redo), so no step is repeated or lost."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> None:
        records = read_metrics(self.path) if os.path.exists(self.path) else []
        kept = [r for r in records if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def step_record(step: int, batch, rollouts, m: dict, *, lag: int, reward_errors: int,
                step_s: float, **timings) -> dict:
    """The metrics of one optimizer step on ``batch`` (a TrainBatch of ``rollouts``), with
    ``m`` the trainer's metrics; ``step_s`` is the step's wall time for ``tokens_per_s``, and
    ``timings`` (generate_s, train_s, ...) and any extra metrics are added as given."""
    return {
        "step": step,
        "reward_mean": float(batch.rewards.mean()),
        "reward_std": float(batch.rewards.std(unbiased=False)),
        "reward_errors": reward_errors,
        "loss": m["loss"],
        "lag": lag,
        "version": int(batch.versions.max()),
        "seq_logratio_mean": m["seq_logratio_mean"],
        "entropy_mean": m["entropy_mean"],
        "adv_abs_mean": m["adv_abs_mean"],
        "grad_norm": m["grad_norm"],
        "token_logratio_abs_mean": m["token_logratio_abs_mean"],
        "completion_len_mean": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        "truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "tokens_per_s": m["train_tokens"] / step_s,
        "train_pad_share": m["train_pad_share"],
        "micro_batches": m["micro_batches"],
        **timings,
        "time": time.time(),
    }


def gap_sums(reference: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor,
             logprobs: torch.Tensor | None = None, advantages: torch.Tensor | None = None,
             beta2: float | None = None) -> torch.Tensor:
    """Sums (float64 [len(GAP_SUMS)], on the CPU) of the per-sequence signed gap
    ``g_i = sum_t mask (reference - sampler)`` between a trainer-side log pi_lag and the
    sampler's, all [B, T] (``mask`` bool, True on completion tokens), and, for OAPL (``logprobs``
    [B, T] log pi_theta, ``advantages`` [B], ``beta2`` given), of the residuals
    ``beta2 * sum_t mask (logprobs - lag) - A_i`` the batch gives with lag = the sampler's and
    with lag = the reference: squared (their mean is the OAPL loss) and absolute. Without them
    the residual sums are 0."""
    m = mask.bool()
    seq = lambda x: torch.where(m, x, 0).double().sum(dim=1)  # noqa: E731
    ref, samp = seq(reference), seq(sampler)
    gap = ref - samp
    out = [gap.sum(), gap.square().sum(), torch.tensor(float(gap.numel()), dtype=torch.float64)]
    if beta2 is None:
        out += [torch.zeros((), dtype=torch.float64)] * 4
    else:
        theta, adv = seq(logprobs), advantages.double().reshape(-1)
        res_s, res_r = beta2 * (theta - samp) - adv, beta2 * (theta - ref) - adv
        out += [res_s.square().sum(), res_r.square().sum(), res_s.abs().sum(), res_r.abs().sum()]
    return torch.stack(out).cpu()


def gap_metrics(sums: torch.Tensor, tokens: float, with_loss: bool = True) -> dict[str, float]:
    """The metrics of ``gap_sums`` (summed over micro-batches) for ``tokens`` completion tokens:
    ``sampler_gap_seq_mean`` / ``_std`` (signed, per sequence, nats), ``sampler_gap_token_mean``
    (signed, per token); with ``with_loss`` the OAPL loss and mean |residual| with log pi_lag from
    the sampler (``lag_loss_sampler``, ``lag_residual_abs_sampler``) and from the trainer-side
    reference (``lag_loss_recompute``, ``lag_residual_abs_recompute``)."""
    v = dict(zip(GAP_SUMS, sums.tolist()))
    n = max(v["seqs"], 1.0)
    mean = v["gap"] / n
    out = {"sampler_gap_seq_mean": mean,
           "sampler_gap_seq_std": math.sqrt(max(v["gap_sq"] / n - mean * mean, 0.0)),
           "sampler_gap_token_mean": v["gap"] / max(tokens, 1.0)}
    if with_loss:
        out |= {"lag_loss_sampler": v["res_sampler_sq"] / n,
                "lag_loss_recompute": v["res_recompute_sq"] / n,
                "lag_residual_abs_sampler": v["res_sampler_abs"] / n,
                "lag_residual_abs_recompute": v["res_recompute_abs"] / n}
    return out
