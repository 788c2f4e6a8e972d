"""Loop throughput: the CPU demo inline (``generation.ahead=0``) against the engine sampling
ahead in its own process (``ahead=1``, ``2``) and against local vLLM servers
(``generation.replicas=N``, weights over HTTP + gloo, ``--server-ahead`` batches ahead), side
by side, each config run ``--repeats`` times in turn (ahead 0, 1, 2, servers 1, 2, 0, ...), on
this machine.

    .venv/bin/python benchmarks/loop_throughput.py --out runs/throughput [--steps 300]
    .venv/bin/python benchmarks/loop_throughput.py --out runs/servers --ahead 0 1 \
        --replicas 1 2 --steps 40 --set data.prompts_per_step=16 generation.n=4

Per config (medians over repeats): wall time of the whole command (engine start included),
steps/s over the steps after the first (the engine's start-up excluded), the trainer's idle
share (the part of its step time not spent training: waiting for a batch when the engine
runs ahead, generating and scoring itself when inline), the final reward (mean ``reward_mean`` of the
last 10 steps), the largest lag seen and its bound, and the medians over the steps that pushed
of ``push_s`` (the trainer's side of a push) and, for servers, ``update_s`` (one round of the
weight protocol on every server), with the largest ``sync_stall_s``. Writes
``<out>/throughput.md`` (a markdown table) and prints it.
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


def run_once(out: str, ahead: int, steps: int, replicas: int = 0, extra=(),
             config: str = CONFIG) -> dict:
    """One run of ``config`` (on ``replicas`` local servers if not 0); its summary numbers."""
    overrides = [f"output_dir={out}", f"generation.ahead={ahead}", f"trainer.steps={steps}",
                 "generation.num_threads=1", "output.plot=false", *extra]
    if replicas:
        overrides += [f"generation.replicas={replicas}", "generation.weight_transfer=gloo"]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oapl.cli", "train", config, *overrides], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    cfg = load_config(config, overrides)
    span = records[-1]["time"] - records[0]["time"]
    # The trainer's share of each step not spent training (on its critical path: waiting for
    # a batch when the engine runs ahead, generating and scoring itself when inline).
    work = [r["train_s"] + r["sync_s"] + r["lag_logprobs_s"] for r in records[1:]]
    idle = [r["wait_s"] if ahead or replicas else r["generate_s"] + r["score_s"]
            for r in records[1:]]
    pushed = [r for r in records if r["push_s"] > 0] or records
    updates = [r["update_s"] * cfg.trainer.minibatches for r in records if r.get("update_s")]
    return {
        "wall_s": wall,
        "steps_per_s": (len(records) - 1) / span,
        "idle": sum(idle) / (sum(idle) + sum(work)),
        "final_reward": statistics.mean(r["reward_mean"] for r in records[-10:]),
        "lag_max": max(r["lag_max"] for r in records),
        "lag_bound": lag_bound(ahead, cfg.trainer.minibatches, cfg.algorithm.sync_every),
        "push_s": statistics.median(r["push_s"] for r in pushed),
        "update_s": statistics.median(updates) if updates else 0.0,
        "sync_stall_s_max": max(r.get("sync_stall_s", 0.0) for r in records)
        * cfg.trainer.minibatches,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--ahead", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--replicas", type=int, nargs="*", default=[],
                   help="also run on this many local servers (each count a config)")
    p.add_argument("--server-ahead", type=int, default=1, help="generation.ahead on servers")
    p.add_argument("--config", default=CONFIG, help="the run's config (default: the demo)")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    args = p.parse_args()
    configs = [(str(k), k, 0) for k in args.ahead]
    configs += [(f"{n} server{'s' * (n > 1)}, ahead {args.server_ahead}", args.server_ahead, n)
                for n in args.replicas]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    for rep in range(args.repeats):
        for label, k, n in configs:
            out = os.path.join(args.out, f"ahead{k}_servers{n}_r{rep}")
            results[label].append(run_once(out, k, args.steps, n, args.set,
                                                  args.config))
            print(json.dumps({"config": label, "repeat": rep, **results[label][-1]}),
                  flush=True)
    med = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
           for k, rs in results.items()}
    base = med[configs[0][0]]["steps_per_s"]
    lines = ["| generation.ahead | wall (s) | steps/s | vs first | trainer idle | "
             "final reward | lag max / bound | push_s | update_s | sync_stall_s max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in med.items():
        lines.append(f"| {k} | {m['wall_s']:.0f} | {m['steps_per_s']:.2f} | "
                     f"{m['steps_per_s'] / base:.2f}x | {m['idle']:.1%} | "
                     f"{m['final_reward']:.3f} | {m['lag_max']:.0f} / {m['lag_bound']:.0f} | "
                     f"{m['push_s']:.4f} | {m['update_s']:.3f} | {m['sync_stall_s_max']:.3f} |")
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
