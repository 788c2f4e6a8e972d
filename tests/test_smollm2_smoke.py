"""A few-step smoke run of the real model: `oapl train examples/smollm2-cpu.yaml` on
SmolLM2-135M-Instruct (builtin alias, converted once into the user's cache), the word-problem
task and its math-verify reward, with the real vLLM engine; 2 steps of 2 prompts x 2 samples,
16 tokens each. Run as a subprocess so that vLLM's process-wide side effects (thread count,
global seeds) stay out of the test process."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm  # the real engine, in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "smollm2-cpu.yaml")
TINY_RUN = ["trainer.steps=2", "data.prompts_per_step=2", "generation.n=2",
            "generation.max_tokens=16", "data.limit=8", "algorithm.sync_every=1",
            "output.save_every=2", "output.plot=false",
            "generation.kv_cache_memory_bytes=67108864"]


def test_smollm2_few_steps(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "oapl.cli", "train", CONFIG, f"output_dir={out}", *TINY_RUN],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["reward_errors"] == 0
        for key in ("loss", "entropy_mean", "grad_norm", "seq_logratio_mean", "train_s"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 < r["completion_len_mean"] <= 16
        assert r["lag"] == 0
    assert (out / "final_model" / "config.json").is_file()
    assert (out / "final_model" / "tokenizer.json").is_file()


def test_word_problems_source_and_reward():
    from oapl.config import load_config
    from oapl.tasks import read_records, reward_name
    from oapl.rewards import get_reward_fn
    from oapl.tasks.word_problems import make_split

    cfg = load_config(CONFIG, ["data.limit=5"])
    assert read_records(cfg.data) == make_split("train", 5)
    held_out = read_records(load_config(CONFIG, ["data.limit=5", "data.split=eval"]).data)
    assert held_out == make_split("eval", 5)
    assert read_records(load_config(CONFIG, ["data.limit=5", "data.split=test"]).data) == held_out
    fn = get_reward_fn(reward_name(cfg.data))
    rec = held_out[0]
    assert fn(rec, f"The answer is {rec['answer']}.") == 1.0
    assert fn(rec, f"\\boxed{{{int(rec['answer']) + 1}}}") == 0.0
