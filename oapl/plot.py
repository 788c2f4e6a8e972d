"""PNG curves of one or more runs' ``metrics.jsonl``, runs overlaid."""

from __future__ import annotations

import os

from .metrics import read_metrics

PANELS = [
    ("reward_mean", "reward (mean)"),
    ("loss", "loss"),
    ("lag", "lag (steps)"),
    ("entropy_mean", "entropy (nats / token)"),
    ("seq_logratio_mean", "log pi_theta / pi_lag (per sequence)"),
]
# Drawn when some run logged it: the share of each step the trainer waited for a batch
# (generation.ahead >= 1).
OPTIONAL_PANELS = [("trainer_idle_frac", "trainer idle share")]


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[str], out_path: str, smooth: int = 10) -> str:
    """Draw each panel of ``PANELS`` for every run (raw, faint, and a moving average over
    ``smooth`` steps); write ``out_path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for run in run_dirs:
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{run}: no metrics.jsonl (not a run directory)")
        runs[run] = read_metrics(path)
        if not runs[run]:
            raise ValueError(f"{run}: metrics.jsonl has no records")
    panels = PANELS + [(key, title) for key, title in OPTIONAL_PANELS
                       if any(key in r for records in runs.values() for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for run, records in runs.items():
        steps = [r["step"] for r in records]
        label = os.path.basename(os.path.normpath(run))
        for ax, (key, title) in zip(axes, panels):
            ys = [float(r.get(key, float("nan"))) for r in records]
            (line,) = ax.plot(steps, _smooth(ys, smooth), label=label)
            ax.plot(steps, ys, color=line.get_color(), alpha=0.25, linewidth=0.8)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
