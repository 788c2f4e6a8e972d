"""Loop throughput: the CPU demo inline (``generation.ahead=0``) against the engine sampling
ahead in its own process (``ahead=1``, ``2``), side by side, each config run ``--repeats``
times in turn (ahead 0, 1, 2, 0, 1, 2, ...), on this machine.

    .venv/bin/python benchmarks/loop_throughput.py --out runs/throughput [--steps 300]

Per config (medians over repeats): wall time of the whole command (engine start included),
steps/s over the steps after the first (the engine's start-up excluded), the trainer's idle
share (the part of its step time not spent training: waiting for a batch when the engine
runs ahead, generating and scoring itself when inline), the final reward (mean ``reward_mean`` of the
last 10 steps), the largest lag seen and its bound. Writes ``<out>/throughput.md`` (a markdown
table) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from oapl.config import load_config  # noqa: E402
from oapl.metrics import read_metrics  # noqa: E402
from oapl.sources.schedule import lag_bound  # noqa: E402

CONFIG = os.path.join(ROOT, "examples", "tiny-cpu.yaml")


def run_once(out: str, ahead: int, steps: int) -> dict:
    """One demo run; its summary numbers."""
    overrides = [f"output_dir={out}", f"generation.ahead={ahead}", f"trainer.steps={steps}",
                 "generation.num_threads=1", "output.plot=false"]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oapl.cli", "train", CONFIG, *overrides], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    cfg = load_config(CONFIG, overrides)
    span = records[-1]["time"] - records[0]["time"]
    # The trainer's share of each step not spent training (on its critical path: waiting for
    # a batch when the engine runs ahead, generating and scoring itself when inline).
    work = [r["train_s"] + r["sync_s"] + r["lag_logprobs_s"] for r in records[1:]]
    idle = [r["wait_s"] if ahead else r["generate_s"] + r["score_s"] for r in records[1:]]
    return {
        "wall_s": wall,
        "steps_per_s": (len(records) - 1) / span,
        "idle": sum(idle) / (sum(idle) + sum(work)),
        "final_reward": statistics.mean(r["reward_mean"] for r in records[-10:]),
        "lag_max": max(r["lag_max"] for r in records),
        "lag_bound": lag_bound(ahead, cfg.trainer.minibatches, cfg.algorithm.sync_every),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--ahead", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    results: dict[int, list[dict]] = {k: [] for k in args.ahead}
    for rep in range(args.repeats):
        for k in args.ahead:
            out = os.path.join(args.out, f"ahead{k}_r{rep}")
            results[k].append(run_once(out, k, args.steps))
            print(json.dumps({"ahead": k, "repeat": rep, **results[k][-1]}), flush=True)
    med = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
           for k, rs in results.items()}
    base = med[args.ahead[0]]["steps_per_s"]
    lines = ["| generation.ahead | wall (s) | steps/s | vs inline | trainer idle | "
             "final reward | lag max / bound |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k, m in med.items():
        lines.append(f"| {k} | {m['wall_s']:.0f} | {m['steps_per_s']:.2f} | "
                     f"{m['steps_per_s'] / base:.2f}x | {m['idle']:.1%} | "
                     f"{m['final_reward']:.3f} | {m['lag_max']:.0f} / {m['lag_bound']:.0f} |")
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
