"""``metrics.jsonl``: one JSON object per optimizer step, appended and flushed as it goes."""

from __future__ import annotations

import json
import os
import time


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
