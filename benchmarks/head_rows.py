"""What scoring only the completion tokens saves in the head: ``oapl_loss`` fwd+bwd at the SmolLM2
CPU example's shape, the head given the completion tokens only (what the trainer does: the
loss gathers the masked positions before the kernels) vs every real token of the rows vs every
position of the padded rows.

    PYTHONPATH=. .venv/bin/python -m benchmarks.head_rows [--rounds 2] [--json FILE]

Shape: ``examples/smollm2-cpu.yaml``'s micro-batch, 16 prompts x 4 completions with the length
mix of ``benchmarks.packing_cpu.synthetic_batch`` (prompts of 50-80 tokens, completions of 10-60,
a fifth cut at 96; rows of ~110 real tokens padded to ~175), D=576, V=49152 (SmolLM2-135M's
head), fp32, temperature 0.7, one torch thread. The three cases run in this one process on the
same hidden states, rounds interleaved; per case the median CPU seconds (user + system) and wall
seconds of one fwd+bwd and the peak bytes torch allocates during one call
(``common.peak_allocated``: inputs excluded, gradients included).
"""
from __future__ import annotations

import argparse

import torch

from oapl_kernels import oapl_loss

from .common import emit, peak_allocated, time_interleaved, timing_cells
from .packing_cpu import synthetic_batch

DIM, VOCAB = 576, 49152


def _inputs(seed: int = 0) -> dict:
    batch = synthetic_batch(16, 4, 96, VOCAB, seed=seed)
    b, t = batch.loss_mask.shape
    g = torch.Generator().manual_seed(seed)
    real = batch.attention_mask[:, 1:].bool()
    return {"hidden": torch.randn(b, t, DIM, generator=g), "weight": torch.randn(VOCAB, DIM, generator=g) / DIM ** 0.5,
            "targets": batch.input_ids[:, 1:], "lag": torch.where(batch.loss_mask, -1.0, 0.0),
            "rewards": batch.rewards, "masks": {"completion tokens (the trainer)": batch.loss_mask,
                                                "every real token": real,
                                                "every position (padded rows)": torch.ones_like(real)}}


def _case(inputs: dict, mask: torch.Tensor):
    h = inputs["hidden"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()

    def run():
        out = oapl_loss(h, w, inputs["targets"], inputs["lag"], inputs["rewards"], mask, group_size=4,
                        beta1=1.0, beta2=0.02, temperature=0.7, impl="torch")
        out.loss.backward()
        h.grad = w.grad = None
        return out.loss.detach()
    return run


def run(rounds: int) -> list[dict]:
    inputs = _inputs()
    calls, rows = [], []
    for name, mask in inputs["masks"].items():
        calls.append(_case(inputs, mask))
        calls[-1]()  # warm-up
        rows.append({"case": name, "rows": int(mask.sum()), "peak_bytes": peak_allocated(calls[-1])[1]})
    time_interleaved(calls, rows, rounds)
    return rows


def markdown(rows: list[dict]) -> str:
    base = rows[0]
    out = ["| head input | rows | CPU s (median) | wall s (median) | peak MiB | CPU vs completion only | peak vs completion only |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['rows']:,} | {timing_cells(r, base)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="also write the measured rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.rounds)
    emit(rows, markdown(rows), args.json)


if __name__ == "__main__":
    main()
