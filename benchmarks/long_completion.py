"""Long completions on the CPU: ``oapl_loss`` fwd+bwd, fused vs unfused vs naive, at one sequence
of 8,192 tokens and at the same 8,192 tokens as 64 sequences of 128. The fused path runs with
each way of splitting a sequence across chunks: "torch" (the default plan: here the side
buffer) and "torch two-pass" (the side buffer forbidden, ``tuning.SIDE_BUFFER_SHARE = 0``).

    python -m benchmarks.long_completion [--rounds 3] [--json results/cpu-long.json]

All cases run in this one process on the same inputs, rounds interleaved (A B C A B C ...) so
that a drifting machine load hits every case alike. Per case: the median CPU seconds (user +
system of this process, the figure to compare on a shared machine) and wall seconds of one
fwd+bwd, and the peak bytes torch allocates during one call (``common.peak_allocated``: exact,
inputs excluded, gradients included). Prints a markdown table, ratios against the fused path.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from oapl_kernels import tuning

from .common import Shape, make_case, make_inputs, peak_allocated

LONG = Shape(1, 8192, 64, 32768, prompt=0)
SHORT = Shape(64, 128, 64, 32768, prompt=0)
TWO_PASS = "torch two-pass"
CASES = [(LONG, "torch"), (LONG, TWO_PASS), (LONG, "torch-unfused"), (LONG, "naive"), (SHORT, "torch")]


def _case(impl: str, inputs: dict):
    """make_case's callable; for TWO_PASS the fused path with the side buffer forbidden."""
    if impl != TWO_PASS:
        return make_case("oapl_fwdbwd", impl, inputs)
    call = make_case("oapl_fwdbwd", "torch", inputs)

    def two_pass():
        share, tuning.SIDE_BUFFER_SHARE = tuning.SIDE_BUFFER_SHARE, 0.0
        try:
            return call()
        finally:
            tuning.SIDE_BUFFER_SHARE = share
    return two_pass


def run(cases, rounds: int) -> list[dict]:
    """Measure each (shape, impl) case: CPU and wall seconds per round, peak bytes."""
    inputs = {shape: make_inputs(shape, torch.device("cpu")) for shape in {s for s, _ in cases}}
    calls = [_case(impl, inputs[shape]) for shape, impl in cases]
    rows = [{"shape": shape.id, "impl": impl, "cpu_s": [], "wall_s": []} for shape, impl in cases]
    for call, row in zip(calls, rows):
        call()  # warm-up
        row["peak_bytes"] = peak_allocated(call)[1]
    for _ in range(rounds):
        for call, row in zip(calls, rows):
            c0, w0 = time.process_time(), time.perf_counter()
            call()
            row["cpu_s"].append(time.process_time() - c0)
            row["wall_s"].append(time.perf_counter() - w0)
    for row in rows:
        row["cpu_median_s"] = sorted(row["cpu_s"])[len(row["cpu_s"]) // 2]
        row["wall_median_s"] = sorted(row["wall_s"])[len(row["wall_s"]) // 2]
    return rows


def markdown(rows: list[dict]) -> str:
    """One table: per case its CPU and wall medians, peak MiB, and CPU/peak ratios to the fused path."""
    fused = {r["shape"]: r for r in rows if r["impl"] == "torch"}
    out = ["| shape | impl | CPU s (median) | wall s (median) | peak MiB | CPU vs fused | peak vs fused |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = fused[r["shape"]]
        out.append(f"| {r['shape']} | {r['impl']} | {r['cpu_median_s']:.2f} | {r['wall_median_s']:.2f} | "
                   f"{r['peak_bytes'] / 2**20:,.1f} | {r['cpu_median_s'] / f['cpu_median_s']:.2f}x | "
                   f"{r['peak_bytes'] / f['peak_bytes']:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Command line: measure the cases, print the table, optionally write the rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the measured rows here")
    args = ap.parse_args(argv)
    rows = run(CASES, args.rounds)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
