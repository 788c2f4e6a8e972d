"""End to end: `oapl train` on the tiny config (a few steps), metrics.jsonl well formed, and a
run killed with SIGKILL then resumed: no step lost or repeated, same results as a run that was
never interrupted."""

import math
import os

import pytest

from oapl.training.checkpoint import list_checkpoints
from oapl.cli import main
from oapl.config import load_config
from oapl.loop import train
from oapl.metrics import read_metrics

from cli_runs import kill_after_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")
# Small and fast, with a lag: one push every 2 steps, 2 optimizer steps per generated batch.
SMALL = ["data.prompts_per_step=16", "generation.n=4", "algorithm.sync_every=2",
         "trainer.minibatches=2", "output.save_every=2", "output.keep_checkpoints=3",
         "model.tiny_format_warmup_steps=20"]
KEYS = {"step", "reward_mean", "loss", "lag", "seq_logratio_mean", "entropy_mean",
        "tokens_per_s", "generate_s", "train_s", "sync_s", "reward_errors"}


def _cfg(out, steps, *extra):
    return load_config(TINY, [f"output_dir={out}", f"trainer.steps={steps}", *SMALL, *extra])


def test_train_writes_well_formed_metrics(tmp_path, engine):
    out = tmp_path / "run"
    summary = train(_cfg(out, 6), generator=engine)
    assert summary["steps"] == 6
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert KEYS <= r.keys()
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in r.values())
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["reward_errors"] == 0
    # weights pushed after steps 2, 4: batches of steps 1-2 from version 0, 3-4 from 2, ...
    assert [r["version"] for r in records] == [0, 0, 2, 2, 4, 4]
    assert [r["lag"] for r in records] == [0, 1, 0, 1, 0, 1]
    assert [r["sync_s"] > 0 for r in records] == [False, True] * 3
    assert [os.path.basename(p) for p in list_checkpoints(str(out / "checkpoints"))] == [
        "step_00000002", "step_00000004", "step_00000006"]
    for name in ("config.yaml", "curves.png", "final_model/model.safetensors"):
        assert (out / name).exists(), name
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(out, 6), generator=engine)
    with pytest.raises(ValueError, match=r"config differs .* in \['trainer.lr'\]"):
        train(_cfg(out, 8, "resume=true", "trainer.lr=1e-3"), generator=engine)


def test_grpo_in_the_same_loop_and_plot_overlay(tmp_path, engine):
    runs = []
    for name in ("oapl", "grpo"):
        out = tmp_path / name
        train(_cfg(out, 2, f"algorithm.name={name}", "output.plot=false"), generator=engine)
        records = read_metrics(str(out / "metrics.jsonl"))
        assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
        runs.append(str(out))
    main(["plot", *runs, "-o", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").stat().st_size > 10_000


def test_sigkill_then_resume(tmp_path, engine):
    """A CLI run is killed after its first checkpoints; `resume=true` finishes it. Sampling is
    seeded per batch, so the result matches an uninterrupted run (checked on rewards)."""
    killed = tmp_path / "killed"
    last_ckpt, written = kill_after_steps(TINY, killed, ["trainer.steps=1000", *SMALL],
                                          timeout=240)
    metrics = killed / "metrics.jsonl"
    assert last_ckpt >= 4 and written >= last_ckpt
    steps = written + 2 + written % 2  # beyond the kill, a multiple of minibatches

    train(_cfg(killed, steps, "resume=true"), generator=engine)
    resumed = read_metrics(str(metrics))
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))

    straight = tmp_path / "straight"
    train(_cfg(straight, steps), generator=engine)
    expect = read_metrics(str(straight / "metrics.jsonl"))
    assert [r["version"] for r in resumed] == [r["version"] for r in expect]
    assert [r["reward_mean"] for r in resumed] == [r["reward_mean"] for r in expect]
