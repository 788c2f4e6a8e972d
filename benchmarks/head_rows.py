"""What scoring only the completion tokens saves in the head: ``oapl_loss`` fwd+bwd at the SmolLM2
CPU example's shape, the head given the completion tokens only (what the trainer does: the
loss gathers the masked positions before the kernels) vs every real token of the rows vs every
position of the padded rows.

    PYTHONPATH=. .venv/bin/python -m benchmarks.head_rows [--rounds 2] [--json FILE]
    PYTHONPATH=. .venv/bin/python -m benchmarks.head_rows --shape tool [--tool-frac 1.0]

Shape: ``examples/smollm2-cpu.yaml``'s micro-batch, 16 prompts x 4 completions with the length
mix of ``benchmarks.packing_cpu.synthetic_batch`` (prompts of 50-80 tokens, completions of 10-60,
a fifth cut at 96; rows of ~110 real tokens padded to ~175), D=576, V=49152 (SmolLM2-135M's
head), fp32, temperature 0.7, one torch thread. The three cases run in this one process on the
same hidden states, rounds interleaved; per case the median CPU seconds (user + system) and wall
seconds of one fwd+bwd and the peak bytes torch allocates during one call
(``common.peak_allocated``: inputs excluded, gradients included).

``--shape tool``: ``examples/smollm2-tool-cpu.yaml``'s batch, 8 prompts x 4 multi-turn
rollouts (``tool_batch``): prompts of 72-77 tokens (its system prompt and question, as
measured), a model turn of 20-60 tokens (a fifth cut at 96), then with probability
``--tool-frac`` a tool reply of 12-20 tokens (the chat markers and the output) and a second
model turn of 5-30 tokens; one more case, "model and tool tokens", gives the head every
completion token, the environment's too.
"""
from __future__ import annotations

import argparse

import torch

from oapl_kernels import oapl_loss

from .common import emit, measure_cases, timing_table
from oapl.batch import Rollout, collate

from .packing_cpu import synthetic_batch

DIM, VOCAB = 576, 49152


def tool_batch(groups: int, n: int, tool_frac: float, seed: int = 0):
    """``groups`` x ``n`` multi-turn rollouts of the tool example's shape (module docstring);
    returns the collated batch and the mask of every completion token (model and tool)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(100, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                             generator=g).tolist()

    rollouts = []
    for p in range(groups):
        prompt = ids(72, 77)
        for _ in range(n):
            cut = float(torch.rand(1, generator=g)) < 0.2
            first = ids(96, 96) if cut else ids(20, 60)
            comp, segs = list(first), [(0, len(first), 0)]
            if not cut and float(torch.rand(1, generator=g)) < tool_frac:
                comp += ids(12, 20)
                second = ids(5, 30)
                segs.append((len(comp), len(comp) + len(second), 0))
                comp += second
            rollouts.append(Rollout(p, prompt, comp, [-1.0] * len(comp), "stop", 0, segs))
    rewards = torch.randint(0, 2, (len(rollouts),), generator=g).float().tolist()
    batch = collate(rollouts, rewards, pad_id=0)
    every = torch.zeros_like(batch.loss_mask)
    for i, r in enumerate(rollouts):  # completion j sits at target position len(prompt) - 1 + j
        every[i, len(r.prompt_ids) - 1: len(r.prompt_ids) - 1 + len(r.completion_ids)] = True
    return batch, every


def _inputs(seed: int = 0, shape: str = "single", tool_frac: float = 1.0) -> dict:
    extra = {}
    if shape == "tool":
        batch, every = tool_batch(8, 4, tool_frac, seed=seed)
        extra = {"model and tool tokens": every}
    else:
        batch = synthetic_batch(16, 4, 96, VOCAB, seed=seed)
    b, t = batch.loss_mask.shape
    g = torch.Generator().manual_seed(seed)
    real = batch.attention_mask[:, 1:].bool()
    return {"hidden": torch.randn(b, t, DIM, generator=g), "weight": torch.randn(VOCAB, DIM, generator=g) / DIM ** 0.5,
            "targets": batch.input_ids[:, 1:], "lag": torch.where(batch.loss_mask, -1.0, 0.0),
            "rewards": batch.rewards, "masks": {"completion tokens (the trainer)": batch.loss_mask,
                                                **extra,
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


def run(rounds: int, shape: str = "single", tool_frac: float = 1.0) -> list[dict]:
    inputs = _inputs(shape=shape, tool_frac=tool_frac)
    calls = [_case(inputs, mask) for mask in inputs["masks"].values()]
    rows = [{"case": name, "rows": int(mask.sum())} for name, mask in inputs["masks"].items()]
    measure_cases(calls, rows, rounds)
    return rows


def markdown(rows: list[dict]) -> str:
    return timing_table(["head input", "rows"], ["---", "---:"], "completion only",
                        [(f"{r['case']} | {r['rows']:,}", r, rows[0]) for r in rows])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="also write the measured rows here")
    ap.add_argument("--shape", choices=("single", "tool"), default="single",
                    help="the SmolLM2 CPU example's batch, or the python tool example's")
    ap.add_argument("--tool-frac", type=float, default=1.0,
                    help="--shape tool: share of rollouts that call the tool once")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.rounds, args.shape, args.tool_frac)
    emit(rows, markdown(rows), args.json)


if __name__ == "__main__":
    main()
