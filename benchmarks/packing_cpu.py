"""Train-step time, padded vs packed micro-batches, on the SmolLM2 CPU example (issue 17).

    PYTHONPATH=. .venv/bin/python -m benchmarks.packing_cpu [--repeat 2] [--prompts 16]
        [--variants NAME ...] [--out FILE]

One SmolLM2-135M-Instruct policy (``examples/smollm2-cpu.yaml``: fp32 weights, bf16 autocast,
1 torch thread, 16 prompts x 4 completions per step), one synthetic batch shaped like that
example's rollouts: a prompt of 50-80 tokens per group, completions of 10-60 tokens, a fifth of
them cut at ``generation.max_tokens`` = 96, so rows of ~110 real tokens padded to ~175. Each
variant is a ``LocalTrainer`` on the same policy (its own AdamW state); the variants' steps
alternate (variant order rotated every round) so that the noise of a shared CPU falls on all of
them alike. Prints, per variant, the padding share of the forward positions (the trainer's
``train_pad_share``), the micro-batches, the median ``train_step`` seconds and its ratio to the
padded step, the same for the process's CPU time (one thread: the CPU time is what the step
costs, less sensitive than the wall clock to other jobs on the machine); writes the raw times
as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from oapl.batch import Rollout, collate
from oapl.config import load_config
from oapl.model_source import resolve_model
from oapl.training.policy import Policy
from oapl.training.trainer import LocalTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "smollm2-cpu.yaml")

VARIANTS = {  # name: trainer overrides
    "padded": ["trainer.packing=false"],
    "packed, one row": ["trainer.packing=true", "trainer.packed_row_tokens=100000"],
    "packed, rows <= 512": ["trainer.packing=true", "trainer.packed_row_tokens=512"],
    "packed + budget 1024": ["trainer.packing=true", "trainer.packed_row_tokens=512",
                             "trainer.max_tokens_per_micro_batch=1024"],
}


def synthetic_batch(groups: int, n: int, max_tokens: int, vocab: int, seed: int = 0):
    """``groups`` x ``n`` rollouts with the example's length mix (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for p in range(groups):
        prompt = torch.randint(100, vocab, (int(torch.randint(50, 81, (1,), generator=g)),),
                               generator=g).tolist()
        for _ in range(n):
            c = max_tokens if float(torch.rand(1, generator=g)) < 0.2 else int(
                torch.randint(10, 61, (1,), generator=g))
            comp = torch.randint(100, vocab, (c,), generator=g).tolist()
            rollouts.append(Rollout(p, prompt, comp, [-1.0] * c, "stop", 0))
    rewards = torch.randint(0, 2, (len(rollouts),), generator=g).float().tolist()
    return collate(rollouts, rewards, pad_id=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="timed steps per variant")
    ap.add_argument("--prompts", type=int, default=None,
                    help="groups per step (default: the example's data.prompts_per_step)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="/work/runs/packing/packing_cpu.json")
    args = ap.parse_args(argv)

    base = load_config(CONFIG)
    torch.set_num_threads(base.trainer.num_threads or torch.get_num_threads())
    policy = Policy.from_pretrained(resolve_model(base.model.path), torch.float32,
                                    torch.device("cpu"))
    batch = synthetic_batch(args.prompts or base.data.prompts_per_step, base.generation.n,
                            base.generation.max_tokens, policy.model.config.vocab_size)
    lengths = batch.attention_mask.sum(dim=1).float()
    print(f"batch: {len(batch)} rows, real tokens mean {lengths.mean():.0f} "
          f"(min {lengths.min():.0f}, max {lengths.max():.0f}), padded to "
          f"{batch.input_ids.shape[1]}; threads {torch.get_num_threads()}", flush=True)
    trainers = {name: LocalTrainer(policy, load_config(CONFIG, VARIANTS[name]))
                for name in args.variants}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    cpu: dict[str, list[float]] = {name: [] for name in trainers}
    metrics: dict[str, dict] = {}
    names = list(trainers)
    for r in range(args.repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            metrics[name] = trainers[name].train_step(batch)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"round {r} {name}: {times[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU",
                  flush=True)
    ref = statistics.median(times[names[0]])
    ref_cpu = statistics.median(cpu[names[0]])
    print(f"\n| variant | padding share | micro-batches | train_s wall (median of {args.repeat})"
          f" | vs {names[0]} | CPU s (median) | vs {names[0]} |\n|---|---|---|---|---|---|---|")
    for name in names:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"| {name} | {metrics[name]['train_pad_share']:.0%} | "
              f"{metrics[name]['micro_batches']:.0f} | {med:.1f} s | {med / ref:.2f}x | "
              f"{med_cpu:.1f} s | {med_cpu / ref_cpu:.2f}x |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"times": times, "cpu_times": cpu, "metrics": metrics, "variants": VARIANTS}, f, indent=1)


if __name__ == "__main__":
    main()
