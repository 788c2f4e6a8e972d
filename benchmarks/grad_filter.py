"""Gradient filtering on real distributions: the fused OAPL loss's gradient error vs float64, the
share of vocab blocks skipped and the CPU time, as functions of ``grad_filter_eps``.

    PYTHONPATH=. .venv/bin/python -m benchmarks.grad_filter [--eps 0 1e-6 1e-5 1e-4 1e-3] [--json FILE]

Inputs (``benchmarks.head_states``): N = 8,192 completion tokens of SmolLM2-135M-Instruct's own
samples, its final hidden states there and its head (D=576, V=49152, fp32), "trained"; the same
tokens through a randomly initialized model of the same config, "untrained". Per state and eps:
``oapl_loss`` fwd+bwd, fused (the trainer's path; the default 64 MiB workspace: chunks of <= 256
rows, sequences whole), temperature 0.7 (the SmolLM2 example's), beta2 = 0.02, one completion
per prompt, the sampler's log-probs set so every residual is non-zero; plus the unfused path
(its backward filters over all N rows at once) at eps = 0 and the largest eps. Error: relative
Frobenius norm ||g - g64|| / ||g64|| and max |g - g64| / max |g64| of dH and dW against float64
without filtering (``naive.chunked_grads``). Skipped: ``oapl_kernels.filtering.count``. CPU s:
user + system seconds of the call, one torch thread, in this one process.
"""
from __future__ import annotations

import argparse
import time

import torch

from oapl_kernels import filtering, oapl_loss
from oapl_kernels.objective import OAPLObjective

from . import head_states, naive
from .common import emit

TEMPERATURE, BETA2 = 0.7, 0.02


def _batch(state: dict) -> dict:
    """The state's tokens as [B, T] rows (one sequence each) with mask, rewards and log-probs."""
    lengths = state["lengths"]
    b, t, d = len(lengths), max(lengths), state["hidden"].shape[1]
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    hidden = torch.zeros(b, t, d)
    hidden[mask] = state["hidden"]
    targets = torch.zeros(b, t, dtype=torch.int64)
    targets[mask] = state["targets"]
    g = torch.Generator().manual_seed(0)
    lag = torch.where(mask, -torch.rand(b, t, generator=g) * 2, 0.0)
    return {"hidden": hidden, "targets": targets, "mask": mask, "lag": lag,
            "rewards": torch.randint(0, 2, (b,), generator=g).float(), "lengths": lengths}


def _reference(state: dict, batch: dict):
    """float64 dH [N, D] (kept rows) and dW of the loss, without filtering."""
    h, w, y = state["hidden"].double(), state["weight"].double(), state["targets"]
    logp = naive.chunked_logprobs(h, w, y, temperature=TEMPERATURE)
    seq = torch.repeat_interleave(torch.arange(len(batch["lengths"])), torch.tensor(batch["lengths"]))
    sums = torch.zeros(len(batch["lengths"]), dtype=torch.float64).index_add_(0, seq, logp)
    objective = OAPLObjective(batch["lag"].double().sum(1), torch.zeros(len(sums), dtype=torch.float64), BETA2)
    g = objective.seq_grad(objective.residuals(sums), len(sums))[seq]
    return naive.chunked_grads(h, w, y, g, temperature=TEMPERATURE)


def _call(state: dict, batch: dict, eps: float, fused: bool) -> dict:
    h = batch["hidden"].clone().requires_grad_()
    w = state["weight"].clone().requires_grad_()
    c0, w0 = time.process_time(), time.perf_counter()
    with filtering.count() as counts:
        out = oapl_loss(h, w, batch["targets"], batch["lag"], batch["rewards"], batch["mask"], group_size=1,
                        beta1=1.0, beta2=BETA2, temperature=TEMPERATURE, impl="torch", fused=fused,
                        grad_filter_eps=eps)
        out.loss.backward()
    return {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
            "skipped": counts.skipped_fraction, "dH": h.grad[batch["mask"]], "dW": w.grad}


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = got.double() - ref
    return (diff.norm() / ref.norm()).item(), (diff.abs().max() / ref.abs().max()).item()


def run(eps_list: list[float], states=head_states.STATES) -> list[dict]:
    rows = []
    for name in states:
        state = head_states.load(name)
        batch = _batch(state)
        t0 = time.time()
        ref_h, ref_w = _reference(state, batch)
        print(f"  {name}: float64 reference in {time.time() - t0:.0f} s", flush=True)
        cases = [(eps, True) for eps in eps_list] + [(0.0, False), (max(eps_list), False)]
        for eps, fused in cases:
            r = _call(state, batch, eps, fused)
            row = {"state": name, "path": "fused" if fused else "unfused", "eps": eps, "cpu_s": r["cpu_s"],
                   "wall_s": r["wall_s"], "skipped": r["skipped"]}
            row["dH_fro"], row["dH_max"] = _errors(r["dH"], ref_h)
            row["dW_fro"], row["dW_max"] = _errors(r["dW"], ref_w)
            rows.append(row)
            print(f"  {row}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    base = {(r["state"], r["path"]): r["cpu_s"] for r in rows if r["eps"] == 0}
    out = ["| state | path | eps | dH error (Frobenius / max) | dW error (Frobenius / max) | blocks skipped | CPU s | vs eps=0 |",
           "|---|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['state']} | {r['path']} | {r['eps']:g} | {r['dH_fro']:.1e} / {r['dH_max']:.1e} | "
                   f"{r['dW_fro']:.1e} / {r['dW_max']:.1e} | {100 * r['skipped']:.1f}% | {r['cpu_s']:.1f} | "
                   f"{r['cpu_s'] / base[(r['state'], r['path'])]:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.0, 1e-6, 1e-5, 1e-4, 1e-3])
    ap.add_argument("--states", nargs="+", default=list(head_states.STATES))
    ap.add_argument("--json", help="also write the measured rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.eps, args.states)
    emit(rows, markdown(rows), args.json)


if __name__ == "__main__":
    main()
