"""Peak memory of one training step at a large vocabulary: ``OAPLTrainer``'s loss (``oapl_loss``
through the hidden-state hook) against TRL's own GRPO loss (``GRPOTrainer._compute_loss``, which
in TRL 1.16 scores tokens through TRL's chunked fused lm head), on the same model and the same
batch, each loss in a fresh process.

    .venv/bin/python -m benchmarks.trl_memory                  # both losses; a markdown table
    .venv/bin/python -m benchmarks.trl_memory --loss oapl      # one process's JSON line

The model is the tiny Llama of :mod:`oapl.tiny` (hidden 128, 2 layers) over a word-level
vocabulary of ``--vocab`` tokens, random weights; TRL's generation makes the batch (``--batch``
completions of ``--completion`` tokens, groups of 4; a random model over that many tokens never
samples EOS, so every completion is full length). Each process builds the trainer, generates
and scores the batch with ``OAPLTrainer`` (the same seed, so the same batch: the table checks
the completion ids' digest), runs the loss once untimed, then measures one forward + backward
of the loss twice (the parameters' gradients freed before each, so they count):

- ``peak_alloc``: the bytes torch's allocator held above its level before the step
  (``common.peak_allocated``: the profiler's allocation events, exact, in-process);
- ``peak_rss``: the process's resident-set high-water mark above its level before the step
  (``common.peak_rss``: everything, torch or not; may come out high, never low).

The reference ``N x V x 4`` is the size of one fp32 logits tensor over the completion tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(vocab: int, batch: int, completion: int, workdir: str, **overrides):
    """(trainer, model, inputs): an ``OAPLTrainer`` over the tiny model with ``vocab`` tokens and
    one generated, scored micro-batch of ``batch`` rows (TRL's generation, the digit reward)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from datasets import Dataset

    from oapl.integrations.trl import OAPLConfig, OAPLTrainer
    from oapl.tiny import VOCAB, build_tiny_model

    words = VOCAB + [f"w{i}" for i in range(vocab - len(VOCAB))]
    model_dir = build_tiny_model(os.path.join(workdir, f"tiny-v{vocab}"), seed=0, vocab=words)
    kwargs = dict(output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=batch, num_generations=4,
                  max_completion_length=completion, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                  save_strategy="no", beta1=1.0, beta2=0.05, temperature=1.0, seed=0)
    kwargs.update(overrides)

    def reward(completions, **_) -> list[float]:
        return [float(len(c.split()[0]) if c.split() else 0) for c in completions]

    torch.manual_seed(0)
    tr = OAPLTrainer(model=model_dir, reward_funcs=reward, args=OAPLConfig(**kwargs),
                     train_dataset=Dataset.from_list([{"prompt": f"max {a} {b} ="} for a in range(10) for b in range(10)]))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # as Trainer's loop sets it
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    return tr, tr.model, inputs


def step_fn(tr, model, inputs, loss: str):
    """One forward + backward of ``loss`` ('oapl': OAPLTrainer's, 'grpo': TRL's GRPOTrainer's)
    on ``inputs`` (free the parameters' gradients before, for them to count)."""
    from trl import GRPOTrainer

    from oapl.integrations.trl import OAPLTrainer

    compute = OAPLTrainer._compute_loss if loss == "oapl" else GRPOTrainer._compute_loss

    def step():
        compute(tr, model, inputs).backward()

    return step


def run_one(args) -> dict:
    import torch

    from .common import peak_allocated, peak_rss

    with tempfile.TemporaryDirectory() as workdir:
        tr, model, inputs = build(args.vocab, args.batch, args.completion, workdir)
        step = step_fn(tr, model, inputs, args.loss)
        step()  # unmeasured: lazy initialisations
        model.zero_grad(set_to_none=True)
        _, rss = peak_rss(step)
        model.zero_grad(set_to_none=True)
        _, alloc = peak_allocated(step)
        ids = inputs["completion_ids"]
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return {"loss": args.loss, "vocab": args.vocab, "batch": ids.size(0), "completion": ids.size(1),
                "prompt": inputs["prompt_ids"].size(1), "n_tokens": int(ids.numel()),
                "completion_tokens": int(inputs["completion_mask"].sum()),
                "logits_bytes": int(ids.numel()) * args.vocab * 4, "grad_bytes": grad_bytes,
                "peak_alloc_bytes": alloc, "peak_rss_bytes": rss,
                "batch_digest": hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:12],
                "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", choices=("oapl", "grpo"), help="measure one loss in this process")
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.loss:
        print(json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for loss in ("grpo", "oapl"):
        cmd = [sys.executable, "-m", "benchmarks.trl_memory", "--loss", loss, "--vocab", str(args.vocab),
               "--batch", str(args.batch), "--completion", str(args.completion)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if rows[0]["batch_digest"] != rows[1]["batch_digest"]:
        raise SystemExit(f"the two processes generated different batches: {rows}")
    mib = 2**20
    r = rows[0]
    lines = [f"B={r['batch']} x C={r['completion']} completion tokens (N={r['n_tokens']}, prompt {r['prompt']}), "
             f"V={r['vocab']:,}, D=128; N x V x 4 = {r['logits_bytes'] / mib:,.0f} MiB; "
             f"parameter gradients {r['grad_bytes'] / mib:,.0f} MiB (counted in both peaks)", "",
             "| loss | peak alloc (MiB) | peak alloc - grads (MiB) | peak RSS (MiB) | (peak alloc - grads) / (N V 4) |",
             "|---|---|---|---|---|"]
    for row in rows:
        extra = row["peak_alloc_bytes"] - row["grad_bytes"]
        lines.append(f"| {row['loss']} | {row['peak_alloc_bytes'] / mib:,.1f} | {extra / mib:,.1f} | "
                     f"{row['peak_rss_bytes'] / mib:,.1f} | {extra / row['logits_bytes']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
