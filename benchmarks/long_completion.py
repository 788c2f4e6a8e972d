"""Long completions on the CPU: ``oapl_loss`` fwd+bwd, fused vs unfused vs naive, at one sequence
of 8,192 tokens and at the same 8,192 tokens as 64 sequences of 128. The fused path runs with
each way of splitting a sequence across chunks: "torch" (the default plan: here the side
buffer) and "torch two-pass" (the side buffer forbidden, ``tuning.SIDE_BUFFER_SHARE = 0``).

    python -m benchmarks.long_completion [--rounds 3] [--json results/cpu-long.json]
    TRITON_INTERPRET=1 python -m benchmarks.long_completion --contexts

``--contexts``: one completion of 2^14, 2^15, 2^16 and 2^17 tokens (D=64, V=32768, the default
64 MiB workspace), the fused torch path, and naive where its [N, V] logits fit a third of the
machine's available memory; with the Triton interpreter on, also the fused Triton path at a
small split-heavy shape (one completion of 1,024 tokens over chunks of 16 rows, D=16, V=512).
One call per case (:func:`run_once`), not rounds, on one torch thread.

Otherwise all cases run in this one process on the same inputs, rounds interleaved (A B C A B C ...) so
that a drifting machine load hits every case alike. Per case: the median CPU seconds (user +
system of this process, the figure to compare on a shared machine) and wall seconds of one
fwd+bwd, and the peak bytes torch allocates during one call (``common.peak_allocated``: exact,
inputs excluded, gradients included). Prints a markdown table, ratios against the fused path.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from oapl_kernels import tuning

from oapl_kernels.logprobs import backend
from oapl_kernels.triton import interpreting

from .common import Shape, emit, make_case, make_inputs, measure_cases, peak_allocated, timing_table

LONG = Shape(1, 8192, 64, 32768, prompt=0)
SHORT = Shape(64, 128, 64, 32768, prompt=0)
TWO_PASS = "torch two-pass"
CASES = [(LONG, "torch"), (LONG, TWO_PASS), (LONG, "torch-unfused"), (LONG, "naive"), (SHORT, "torch")]
CONTEXTS = [Shape(1, 2**k, 64, 32768, prompt=0) for k in range(14, 18)]
INTERPRETED = Shape(1, 1024, 16, 512, prompt=0)
INTERPRETED_ROWS = 16


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def context_cases() -> list:
    """The --contexts cases: fused torch at each length, naive where 3 fp32 [N, V] tensors
    (logits, log-softmax, their gradient) fit a third of the available memory, and the
    interpreted Triton case when TRITON_INTERPRET=1."""
    cases = [(shape, "torch") for shape in CONTEXTS]
    cases += [(shape, "naive") for shape in CONTEXTS if 3 * 4 * shape.n * shape.v * 3 < _available_bytes()]
    if interpreting():
        cases.append((INTERPRETED, "triton"))
    return cases


def _case(impl: str, inputs: dict):
    """make_case's callable; for TWO_PASS the fused path with the side buffer forbidden; for
    "triton" (interpreted) the fused path with a workspace of INTERPRETED_ROWS rows."""
    if impl == "triton":
        chunk = backend("triton").FusedChunk
        os.environ[tuning.WORKSPACE_ENV] = str(INTERPRETED_ROWS * chunk.bytes_per_row(
            inputs["weight"].shape[0], inputs["weight"].shape[1], torch.float32) / 2**20)
        call = make_case("oapl_fwdbwd", "triton", inputs)

        def interpreted():
            try:
                return call()
            finally:
                os.environ.pop(tuning.WORKSPACE_ENV)
        return interpreted
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
    rows = [{"shape": shape.id, "impl": impl} for shape, impl in cases]
    measure_cases(calls, rows, rounds)
    return rows


def run_once(cases) -> list[dict]:
    """The --contexts measurement, one call per case (a call of the longest takes minutes on a
    shared 2-core machine): the CPU and wall seconds of the call that :func:`common.peak_allocated`
    profiles, and its peak bytes, shortest first, each row printed when measured; the first torch
    case also times one unprofiled call after it, which gives the profiler's share of the time
    (``unprofiled_cpu_s``)."""
    rows = []
    for shape, impl in sorted(cases, key=lambda c: c[0].n):
        call = _case(impl, make_inputs(shape, torch.device("cpu")))
        c0, w0 = time.process_time(), time.perf_counter()
        peak = peak_allocated(call)[1]
        row = {"shape": shape.id, "impl": impl, "peak_bytes": peak, "cpu_median_s": time.process_time() - c0,
               "wall_median_s": time.perf_counter() - w0, "load": os.getloadavg()[0]}
        if impl == "torch" and not any("unprofiled_cpu_s" in r for r in rows):
            c0 = time.process_time()
            call()
            row["unprofiled_cpu_s"] = time.process_time() - c0
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """One table: per case its CPU and wall medians, peak MiB, and CPU/peak ratios to the fused path."""
    fused = {r["shape"]: r for r in rows if r["impl"] in ("torch", "triton")}
    return timing_table(["shape", "impl"], ["---", "---"], "fused",
                        [(f"{r['shape']} | {r['impl']}", r, fused[r["shape"]]) for r in rows])


def main(argv: list[str] | None = None) -> None:
    """Command line: measure the cases, print the table, optionally write the rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (not with --contexts)")
    ap.add_argument("--json", help="also write the measured rows here")
    ap.add_argument("--contexts", action="store_true", help="the 2^14..2^17-token table instead")
    args = ap.parse_args(argv)
    if args.contexts:
        torch.set_num_threads(1)  # CPU seconds then count work, not a second thread's spinning
    rows = run_once(context_cases()) if args.contexts else run(CASES, args.rounds)
    emit(rows, markdown(rows), args.json)


if __name__ == "__main__":
    main()
