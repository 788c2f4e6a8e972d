"""pass@k and entropy of the lag sweep's final policies on a 6-bit task (issue 18, part 3).

    .venv/bin/python experiments/pass_at_k_entropy.py --sweep runs/lag_sweep_thr --task thr \\
        --lags 1 256 --out experiments/long_task/pass_at_k_entropy

For every finished run ``<sweep>/runs/<method>_<hp>_L<L>_s<seed>`` at the given lags (and the
base model the runs share), on the task's 500 held-out prompts (``oapl.tasks.bits``):

- **exact pass@k**, k = 1..256: the policy's probability p_x of the exact answer for each prompt
  (teacher forcing, ``exact_reward``), then mean_x 1 - (1 - p_x)^k. This is the quantity the
  unbiased estimator estimates, without its sampling noise, for every seed;
- **sampled pass@k**, k = 1..64, with ``oapl eval`` (the real engine, n = 64 samples of each of
  the first ``--eval-prompts`` held-out prompts, the unbiased estimator), for the seed-0 model of
  each method and lag and the base model: a check of the exact curve through the same path a
  user would take;
- **entropy**: the mean per-token entropy (nats) of the policy along its own samples
  (``--samples`` per prompt, temperature 1, answer tokens and EOS), and ``entropy_answer`` of
  ``exact_reward`` (after the right prefix).

A rerun reuses the measurements of models already in ``--out/summary.json`` when it was made
with the same task, ``--samples`` and ``--eval-prompts`` (a finished run's ``final_model`` does
not change), so adding a method to the sweep measures only its models.

Outputs in ``--out``: ``summary.json``, ``table.md``, ``pass_at_k.png`` (a panel per lag,
exact curves as mean over seeds with min-max band, sampled seed-0 points), ``entropy.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):  # oapl, and lag_sweep beside this script (also when imported)
    if path not in sys.path:
        sys.path.insert(0, path)

from lag_sweep import COLORS, FULL, METHODS, run_name  # noqa: E402 - after the path set-up

KS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BASE = {"label": "base model", "color": "gray"}


def finished_runs(sweep: str, lags: list[int], seeds: list[int]) -> list[dict]:
    """The runs of the sweep at ``lags`` and ``seeds``, each method at its tuned value
    (``tuning.json``), that have a ``final_model``."""
    with open(os.path.join(sweep, "tuning.json")) as f:
        tuning = json.load(f)
    out = []
    for method, tuned in tuning.items():
        for lag in lags:
            for seed in seeds:
                name = run_name(method, tuned["chosen"], lag, seed)
                d = os.path.join(sweep, "runs", name)
                if os.path.isdir(os.path.join(d, "final_model")):
                    out.append({"name": name, "method": method, "lag": lag, "seed": seed,
                                "dir": d})
    return out


def exact_pass_at_k(p: list[float], ks: list[int]) -> list[float]:
    """mean_x 1 - (1 - p_x)^k for each k: pass@k of a policy whose success probability on
    prompt x is p_x."""
    return [sum(1.0 - (1.0 - px) ** k for px in p) / len(p) for k in ks]


def sampled_entropy(model_dir: str, records: list[dict], samples: int, seed: int = 0) -> float:
    """Mean per-token entropy (nats) of the policy along its own samples: ``samples``
    completions of each prompt at temperature 1, up to 8 tokens or EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok(r["prompt"])["input_ids"] for r in records])
    ids = ids.repeat_interleave(samples, 0)
    gen = torch.Generator().manual_seed(seed)
    alive = torch.ones(len(ids), dtype=torch.bool)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(8):
            logp = torch.log_softmax(model(ids).logits[:, -1].float(), -1)
            ent = -(logp.exp() * logp).sum(-1)
            total += float(ent[alive].sum())
            count += int(alive.sum())
            nxt = torch.multinomial(logp.exp(), 1, generator=gen)
            alive &= nxt[:, 0] != tok.eos_token_id
            ids = torch.cat([ids, nxt], 1)
            if not alive.any():
                break
    return total / count


def measure(model_dir: str, records: list[dict], samples: int) -> dict:
    from oapl.tasks.bits import exact_reward

    ev = exact_reward(model_dir, records)
    return {"expected_reward": ev["expected_reward"], "entropy_answer": ev["entropy_answer"],
            "entropy_sampled": sampled_entropy(model_dir, records, samples),
            "exact_pass_at_k": exact_pass_at_k(ev["per_prompt"], KS)}


def oapl_eval(models: dict[str, str], task: str, prompts: int, out: str) -> dict[str, list]:
    """pass@1..64 of each model through ``oapl eval`` (one engine, the unbiased estimator)."""
    from oapl.evaluate import model_labels
    from oapl.tasks.bits import write_heldout_jsonl

    os.makedirs(out, exist_ok=True)
    data = write_heldout_jsonl(task, os.path.join(out, "heldout.jsonl"))
    cmd = [sys.executable, "-m", "oapl.cli", "eval", os.path.join(REPO, "examples",
           "tiny-bits.yaml"), f"data.source={data}", f"data.limit={prompts}",
           "generation.n=64", "trainer.num_threads=1", f"output_dir={out}"]
    for path in models.values():
        cmd += ["--model", path]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    curves = {}
    for key, label in zip(models, model_labels(list(models.values()))):
        with open(os.path.join(out, label, "pass_at_k.csv")) as f:
            curves[key] = [float(r["pass_at_k"]) for r in csv.DictReader(f)]
    return curves


def figures(out: str, summary: dict, lags: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lags), figsize=(5.5 * len(lags), 4.2), squeeze=False)
    base = summary["base"]
    for ax, lag in zip(axes[0], lags):
        ax.plot(KS, base["exact_pass_at_k"], "--", color=BASE["color"], label=BASE["label"])
        if "sampled_pass_at_k" in base:
            s = base["sampled_pass_at_k"]
            ax.plot(range(1, len(s) + 1), s, ".", ms=3, color=BASE["color"])
        for method, by_lag in summary["methods"].items():
            runs = by_lag.get(str(lag), [])
            if not runs:
                continue
            curves = [r["exact_pass_at_k"] for r in runs]
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(KS))]
            lo = [min(c[i] for c in curves) for i in range(len(KS))]
            hi = [max(c[i] for c in curves) for i in range(len(KS))]
            ax.plot(KS, mean, "-o", ms=3, color=COLORS[method],
                    label=f"{METHODS[method]['label']} ({len(runs)} seeds)")
            ax.fill_between(KS, lo, hi, color=COLORS[method], alpha=0.15)
            for r in runs:
                if "sampled_pass_at_k" in r:
                    s = r["sampled_pass_at_k"]
                    ax.plot(range(1, len(s) + 1), s, ".", ms=3, color=COLORS[method])
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (held-out)")
        ax.set_title(f"L = {lag}: exact (lines, seed min-max band), oapl eval seed 0 (dots)",
                     fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pass_at_k.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(base["entropy_sampled"], ls="--", color=BASE["color"], label=BASE["label"])
    methods = list(summary["methods"])
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        for i, lag in enumerate(lags):
            runs = summary["methods"][method].get(str(lag), [])
            xs = [i + (j - (len(methods) - 1) / 2) * width] * len(runs)
            ax.plot(xs, [r["entropy_sampled"] for r in runs], "o", color=COLORS[method],
                    label=METHODS[method]["label"] if i == 0 else None)
    ax.set_xticks(range(len(lags)), [f"L = {lag}" for lag in lags])
    ax.set_ylabel("per-token entropy along own samples (nats)")
    ax.set_title("Entropy of the final policies (one point per seed)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "entropy.png"), dpi=120)
    plt.close(fig)


def table(summary: dict, lags: list[int]) -> str:
    lines = ["| method | L | seeds | pass@1 | pass@8 | pass@64 | pass@256 | entropy (own samples) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def row(label, lag, runs):
        cells = []
        for k in (1, 8, 64, 256):
            xs = [r["exact_pass_at_k"][KS.index(k)] for r in runs]
            cells.append(f"{statistics.mean(xs):.3f}" + (
                f" [{min(xs):.3f}, {max(xs):.3f}]" if len(xs) > 1 else ""))
        ent = [r["entropy_sampled"] for r in runs]
        cells.append(f"{statistics.mean(ent):.3f}" + (
            f" [{min(ent):.3f}, {max(ent):.3f}]" if len(ent) > 1 else ""))
        lines.append(f"| {label} | {lag} | {len(runs)} | " + " | ".join(cells) + " |")

    row(BASE["label"], "-", [summary["base"]])
    for lag in lags:
        for method, by_lag in summary["methods"].items():
            if by_lag.get(str(lag)):
                row(METHODS[method]["label"], lag, by_lag[str(lag)])
    return "\n".join(lines) + "\n"


def run_measurements(summary: dict) -> list[dict]:
    """Every run's measurements in a summary (the base model's apart)."""
    return [m for by_lag in summary["methods"].values() for rs in by_lag.values() for m in rs]


def previous(out: str, settings: dict) -> dict[str, dict]:
    """The measurements in ``out/summary.json`` by run name (``"base"`` for the base model),
    if it was made with ``settings``; else none."""
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if old.get("settings") != settings:
        return {}
    return {"base": old["base"], **{m["name"]: m for m in run_measurements(old)}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", required=True, help="the lag sweep's --out directory")
    p.add_argument("--task", default="thr", choices=["thr", "cmp"])
    p.add_argument("--lags", type=int, nargs="+", default=[1, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=FULL["seeds"])
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=8, help="samples per prompt for the entropy")
    p.add_argument("--eval-prompts", type=int, default=200,
                   help="held-out prompts for oapl eval (0: skip the sampled check)")
    args = p.parse_args(argv)

    import torch

    from oapl.console import quiet
    from oapl.tasks.bits import heldout_records

    quiet()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    records = heldout_records(args.task)
    runs = finished_runs(args.sweep, args.lags, args.seeds)
    if not runs:
        raise SystemExit(f"no finished runs at L in {args.lags} under {args.sweep}/runs")
    base_dir = os.path.join(runs[0]["dir"], "base_model")
    settings = {"task": args.task, "samples": args.samples, "eval_prompts": args.eval_prompts}
    known = previous(args.out, settings)
    summary = {"task": args.task, "prompts": len(records), "ks": KS, "settings": settings,
               "base": known.get("base") or measure(base_dir, records, args.samples),
               "methods": {}}
    for r in runs:
        m = known.get(r["name"])
        if m is None:
            m = measure(os.path.join(r["dir"], "final_model"), records, args.samples)
            m.update(name=r["name"], seed=r["seed"])
        summary["methods"].setdefault(r["method"], {}).setdefault(str(r["lag"]), []).append(m)
        print(f"{r['name']}: pass@1 {m['exact_pass_at_k'][0]:.3f}, pass@256 "
              f"{m['exact_pass_at_k'][-1]:.3f}, entropy {m['entropy_sampled']:.3f}"
              + (" (measured before)" if r["name"] in known else ""), flush=True)
    if args.eval_prompts:
        models = {"base": base_dir}
        models.update({r["name"]: os.path.join(r["dir"], "final_model")
                       for r in runs if r["seed"] == 0})
        models = {k: v for k, v in models.items() if "sampled_pass_at_k" not in known.get(k, {})}
        if models:
            with tempfile.TemporaryDirectory() as tmp:
                curves = oapl_eval(models, args.task, args.eval_prompts, tmp)
            if "base" in curves:
                summary["base"]["sampled_pass_at_k"] = curves["base"]
            for m in run_measurements(summary):
                if m["name"] in curves:
                    m["sampled_pass_at_k"] = curves[m["name"]]
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(summary, args.lags))
    figures(args.out, summary, args.lags)
    print(table(summary, args.lags))
    return summary


if __name__ == "__main__":
    main()
