"""Batch invariance of token log-probs on the CPU: the largest difference between a row's
log-probs computed alone (a whole row of 20 tokens, or one token) and computed inside a batch of
64 rows, for a plain fp32 GEMM + log_softmax and for ``linear_logprobs`` (torch path), at one and
two torch threads (D=576, V=49152, SmolLM2-135M's head shape, random fp32 inputs).

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.invariance
"""
from __future__ import annotations

import torch

from oapl_kernels import linear_logprobs

from . import naive

D, V, T, ROWS = 576, 49152, 20, 64


def main() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    rows, y = torch.randn(ROWS, T, D, generator=g), torch.randint(0, V, (ROWS, T), generator=g)
    methods = {"plain fp32 GEMM + log_softmax": lambda h, t: naive.logprobs(h, w, t),
               "linear_logprobs (torch path)": lambda h, t: linear_logprobs(h, w, t, impl="torch")}
    print("| threads | method | max abs diff, row alone vs in 64 rows (nats) | one token alone vs in 64 rows |")
    print("|---:|---|---:|---:|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, fn in methods.items():
            with torch.no_grad():
                batch = fn(rows, y)
                row = max((fn(rows[i : i + 1], y[i : i + 1])[0] - batch[i]).abs().max().item() for i in range(ROWS))
                token = max((fn(rows[i, j : j + 1], y[i, j : j + 1])[0] - batch[i, j]).abs().item()
                            for i in range(0, ROWS, 8) for j in range(0, T, 5))
            print(f"| {threads} | {name} | {row:.1e} | {token:.1e} |", flush=True)


if __name__ == "__main__":
    main()
