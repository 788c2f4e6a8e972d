"""Summarize the runs that tried to learn a 6-bit answer task (issue 18, part 1).

    .venv/bin/python experiments/long_task_attempts.py RUN_DIR [RUN_DIR ...] --out experiments/long_task

Reads each run's ``metrics.jsonl`` and ``config.yaml`` (the runs may have been stopped early)
and writes ``<out>/attempts.json``, ``<out>/attempts.md`` (one row per run) and
``<out>/curves.png`` (reward, entropy and completion length per step, 10-step means).
Per run: the steps it ran, the mean reward of its first and last 10 steps and its best
10-step mean, the per-token entropy of its first and last step, the completion length of its
last 10 steps (7 = six bits and EOS), the share of steps whose gradient was clipped, and the
median seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import yaml


# The task variant each run used, by its name's prefix (the generator was changed between them;
# oapl/tasks/bits.py now has toy:cmp balanced and toy:thr at threshold 3).
VARIANTS = {
    "cmpv0": "cmp, a_j = b_j allowed (bits 0 w.p. 0.55; an earlier generator)",
    "cmp": "cmp (bits balanced)",
    "thr50": "thr, threshold 5 (bits balanced; THR = 5)",
    "thr3": "thr, threshold 3 (bits 1 w.p. 0.7; the registered toy:thr)",
}


def variant(name: str) -> str:
    return VARIANTS[max((k for k in VARIANTS if name.startswith(k + "_")), key=len)]


def summarize(run: str) -> dict:
    recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    r = [x["reward_mean"] for x in recs]
    best = max(statistics.fmean(r[i : i + 10]) for i in range(max(1, len(r) - 9)))
    clip = cfg["trainer"]["grad_clip"]
    return {
        "run": os.path.basename(run.rstrip("/")),
        "task": variant(os.path.basename(run.rstrip("/"))),
        "method": cfg["algorithm"]["name"] + (
            f"+TIS({cfg['algorithm']['tis_cap']})" if cfg["algorithm"]["name"] == "grpo" else ""),
        "L": cfg["algorithm"]["sync_every"],
        "beta2": cfg["algorithm"]["beta2"] if cfg["algorithm"]["name"] == "oapl" else None,
        "lr": cfg["trainer"]["lr"],
        "grad_clip": clip,
        "steps": len(recs),
        "reward_first10": statistics.fmean(r[:10]),
        "reward_last10": statistics.fmean(r[-10:]),
        "reward_best10": best,
        "entropy_first": recs[0]["entropy_mean"],
        "entropy_last": recs[-1]["entropy_mean"],
        "length_last10": statistics.fmean(x["completion_len_mean"] for x in recs[-10:]),
        "clipped_frac": sum(x["grad_norm"] > clip for x in recs) / len(recs),
        # median step time (a run stopped and resumed has one long gap)
        "s_per_step": statistics.median(b["time"] - a["time"] for a, b in zip(recs, recs[1:])),
        "curves": {k: [x[k] for x in recs] for k in
                   ("reward_mean", "entropy_mean", "completion_len_mean")},
    }


def _smooth(xs, w=10):
    return [statistics.fmean(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="experiments/long_task")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = [summarize(r) for r in args.runs]
    with open(os.path.join(args.out, "attempts.json"), "w") as f:
        json.dump(rows, f)
    with open(os.path.join(args.out, "attempts.md"), "w") as f:
        f.write("| run | task | method | L | beta2 | lr | clip | steps | reward first 10 | "
                "last 10 | best 10 | entropy first -> last | length, last 10 | clipped | "
                "s/step |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n")
        for x in rows:
            b2 = "-" if x["beta2"] is None else f"{x['beta2']:g}"
            f.write(f"| {x['run']} | {x['task']} | {x['method']} | {x['L']} | {b2} | "
                    f"{x['lr']:g} | {x['grad_clip']:g} | {x['steps']} | "
                    f"{x['reward_first10']:.3f} | {x['reward_last10']:.3f} | "
                    f"{x['reward_best10']:.3f} | {x['entropy_first']:.2f} -> "
                    f"{x['entropy_last']:.2f} | {x['length_last10']:.2f} | "
                    f"{x['clipped_frac']:.0%} | {x['s_per_step']:.1f} |\n")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from panels import plot_panels

    plot_panels(os.path.join(args.out, "curves.png"),
                [(x["run"], list(range(1, x["steps"] + 1)),
                  [_smooth(x["curves"][k]) for k in
                   ("reward_mean", "entropy_mean", "completion_len_mean")]) for x in rows],
                ["sampler reward (10-step mean); dotted: chance 1/64",
                 "entropy per completion token (nats)",
                 "completion length (7 = six bits + EOS; max 8)"], hline=1 / 64, width=5.3)
    for x in rows:
        print(f"{x['run']}: {x['steps']} steps, reward {x['reward_first10']:.3f} -> "
              f"{x['reward_last10']:.3f} (best {x['reward_best10']:.3f}), entropy "
              f"{x['entropy_first']:.2f} -> {x['entropy_last']:.2f}, length "
              f"{x['length_last10']:.2f}")


if __name__ == "__main__":
    main()
