"""pass@k of one or more models: ``oapl eval CONFIG [key=value ...] [--model PATH ...]``.

Each model (``tiny``, a HF directory, a run's ``final_model``, or a checkpoint ``step_<N>``)
samples ``generation.n`` completions of every prompt of ``data`` (after ``data.limit``); the
task's reward scores them (with ``env.name``: multi-turn rollouts, the environment scores
them), and a sample is ``correct`` when its reward is 1. Outputs, in
``output_dir`` for one model, in ``output_dir/<label>/`` for each of several:

- ``samples.jsonl``: one line per sample (``prompt_id``, ``sample``, ``prompt``, ``answer``,
  ``completion``, ``reward``, ``correct`` 0/1, ``finish_reason``, ``num_tokens``, ``model``,
  ``model_turns``, ``status``);
- ``pass_at_k.csv``: ``k,pass_at_k`` for k = 1..n, the unbiased estimator
  1 - C(n - c, k) / C(n, k) (c correct samples of n) averaged over prompts;

and ``output_dir/pass_at_k.png``, pass@k against k with the models overlaid.

Sampling seeds are ``EVAL_SEED_OFFSET`` above the run seed's training and ``oapl generate``
seeds, so a toy task (whose prompts are all seen in training) is evaluated on fresh samples.
Where the data has a held-out split, point ``data`` at it (``data.split=test``, or another
``data.source``). All models share one engine (weights pushed in turn), so they must share an
architecture and tokenizer (a base model, its checkpoints and trained versions).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence

from transformers import AutoTokenizer

from .batch import score_rollouts
from .config import Config
from .engine.generator import Generator, VLLMGenerator, sample_groups
from .engine.transport import wire_dtype
from .model_dir import model_dir, push_model
from .prompts import load_prompts, sampling_seed
from .rollout.multiturn import sample_episodes
from .rollout.turns import TurnFormat
from .run import EVAL_SEED_OFFSET, set_threads
from .tasks import load_reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``c`` correct samples of ``n``:
    1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i)
    (no huge binomials; exact 1 when n - c < k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_curve(correct: Sequence[int], n: int) -> list[float]:
    """Mean pass@k over prompts with ``correct[p]`` correct samples of ``n``, for k = 1..n."""
    if not correct:
        raise ValueError("pass@k needs at least one prompt")
    return [sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in range(1, n + 1)]


def model_labels(paths: Sequence[str]) -> list[str]:
    """Short unique names: the directory's name, with its run's name in front for
    ``final_model``, ``base_model`` and checkpoints (``tiny-cpu-final_model``)."""
    labels = []
    for p in paths:
        p = os.path.normpath(p)
        name = os.path.basename(p)
        if name in ("final_model", "base_model") or name.startswith("step_"):
            run = os.path.dirname(p)
            if os.path.basename(run) == "checkpoints":
                run = os.path.dirname(run)
            name = f"{os.path.basename(run)}-{name}"
        labels.append(name)
    return [f"{x}-{i}" if labels.count(x) > 1 else x for i, x in enumerate(labels)]


def _write(out_dir: str, samples: list[dict], curve: list[float]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    with open(os.path.join(out_dir, "pass_at_k.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "pass_at_k"])
        w.writerows([k, f"{v:.6f}"] for k, v in enumerate(curve, start=1))


def plot_pass_at_k(curves: dict[str, list[float]], out_path: str) -> str:
    """pass@k against k (log2 axis), one line per model; write ``out_path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def format_table(curves: dict[str, list[float]]) -> str:
    """pass@k at k = 1, 2, 4, ... and n, one column per model."""
    n = len(next(iter(curves.values())))
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    width = max(10, *(len(x) for x in curves))
    lines = ["k".rjust(4) + "".join(x.rjust(width + 2) for x in curves)]
    lines += [f"{k:4d}" + "".join(f"{c[k - 1]:.3f}".rjust(width + 2) for c in curves.values())
              for k in ks]
    return "\n".join(lines)


def evaluate(cfg: Config, models: Sequence[str] = (), generator: Generator | None = None) -> dict:
    """Evaluate ``models`` (default: ``cfg.model.path``) as described above; return
    ``{"outputs": {label: dir}, "pass_at_k": {label: [pass@1, ..., pass@n]}, "plot", "table"}``.
    ``generator``: an engine to reuse; by default one is built for the first model."""
    set_threads(cfg)
    paths = list(models) or [cfg.model.path]
    dirs = [model_dir(p, cfg) for p in paths]
    labels = model_labels(paths)
    tok = AutoTokenizer.from_pretrained(dirs[0])
    prompts = load_prompts(cfg.data, tok)
    reward_fn, reward_workers = load_reward(cfg.data)
    n = cfg.generation.n
    seed = sampling_seed(cfg.seed, EVAL_SEED_OFFSET)
    own = generator is None
    if own:
        generator = VLLMGenerator(dirs[0], cfg.generation, seed=cfg.seed)
    curves, outputs, multi_turn = {}, {}, {}
    try:
        for i, (label, path) in enumerate(zip(labels, dirs)):
            if not (own and i == 0):
                push_model(generator, path, 0, wire_dtype(cfg.generation.dtype))
            if cfg.env.name:  # multi-turn: the environment scores each rollout
                rollouts, rewards, _ = sample_episodes(
                    generator, cfg.env, prompts, cfg.generation, seed, TurnFormat(tok),
                    cfg.data.prompts_per_step, f"oapl eval {label}")
                records = [prompts[r.prompt_index].record for r in rollouts]
                texts = [tok.decode(r.completion_ids, skip_special_tokens=True)
                         for r in rollouts]
            else:
                rollouts = sample_groups(generator, prompts, cfg.generation, seed,
                                         cfg.data.prompts_per_step, f"oapl eval {label}")
                records = [prompts[r.prompt_index].record for r in rollouts]
                texts, rewards, _ = score_rollouts(reward_fn, tok, rollouts, records,
                                                   reward_workers)
            samples = [
                {"model": label, "prompt_id": r.prompt_index, "sample": j % n,
                 "prompt": rec["prompt"], "answer": rec.get("answer"), "completion": text,
                 "reward": reward, "correct": int(reward >= 1.0),
                 "finish_reason": r.finish_reason, "num_tokens": len(r.completion_ids),
                 "model_turns": len(r.segments or [None]), "status": r.status}
                for j, (r, rec, text, reward) in enumerate(zip(rollouts, records, texts, rewards))
            ]
            correct = [sum(s["correct"] for s in samples[g : g + n])
                       for g in range(0, len(samples), n)]
            curves[label] = pass_at_k_curve(correct, n)
            multi_turn[label] = sum(s["model_turns"] > 1 for s in samples) / len(samples)
            outputs[label] = cfg.output_dir if len(paths) == 1 else os.path.join(
                cfg.output_dir, label)
            _write(outputs[label], samples, curves[label])
    finally:
        if own:
            generator.close()
    png = plot_pass_at_k(curves, os.path.join(cfg.output_dir, "pass_at_k.png"))
    return {"outputs": outputs, "pass_at_k": curves, "plot": png, "table": format_table(curves),
            "multi_turn_frac": multi_turn}
