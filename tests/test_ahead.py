"""Asynchronous generation (``generation.ahead``): the engine samples ahead in its own process,
on a fixed schedule. With the real engine: two runs give identical metrics, every row's version
is the scheduled one and the lag stays bounded, SIGKILL + resume continues identically, and
faults (the engine killed, SIGTERM to the run) end everything cleanly with no process left.
The trainer pushes only the versions some batch samples with; the NCCL handover's protocol is
checked here on the CPU, the transfer itself only on two GPUs."""

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from cli_runs import assert_gone, wait_for_steps

from oapl.config import load_config
from oapl.loop import train
from oapl.metrics import read_metrics
from oapl.sources.schedule import lag_bound, push_needed, sampling_version

pytestmark = pytest.mark.vllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")
K, MINI, L = 1, 2, 2
SMALL = ["data.prompts_per_step=16", "generation.n=4", f"algorithm.sync_every={L}",
         f"trainer.minibatches={MINI}", "output.save_every=2", "output.keep_checkpoints=3",
         "model.tiny_format_warmup_steps=20", f"generation.ahead={K}", "output.plot=false",
         "generation.num_threads=1", "trainer.num_threads=1"]
# Everything a run computes; timings and the engine's busy share depend on the machine.
DETERMINISTIC = ("step", "reward_mean", "reward_std", "loss", "lag", "lag_max", "version",
                 "seq_logratio_mean", "entropy_mean", "grad_norm", "completion_len_mean")
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cfg(out, steps, *extra):
    return load_config(TINY, [f"output_dir={out}", f"trainer.steps={steps}", *SMALL, *extra])


def _values(records):
    return [[r[k] for k in DETERMINISTIC] for r in records]


def test_schedule():
    # ahead=0 is the inline loop: batch b sampled by the last push at or before step b*k.
    assert [sampling_version(b, 0, 1, 4) for b in range(9)] == [0, 0, 0, 0, 4, 4, 4, 4, 8]
    assert [sampling_version(b, 1, 1, 1) for b in range(5)] == [0, 0, 1, 2, 3]
    assert [sampling_version(b, 2, 2, 2) for b in range(6)] == [0, 0, 0, 2, 4, 6]
    assert lag_bound(0, 1, 4) == 3 and lag_bound(1, 1, 4) == 4 and lag_bound(2, 2, 2) == 5
    for k, sync in [(2, 3), (3, 2), (3, 4), (1, 1)]:  # the bound is reached, never passed
        lags = [(b + 1) * k - 1 - sampling_version(b, 1, k, sync) for b in range(50)]
        assert max(lags) == lag_bound(1, k, sync)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run with the engine one batch ahead."""
    out = tmp_path_factory.mktemp("ahead") / "straight"
    train(_cfg(out, 8))
    return read_metrics(str(out / "metrics.jsonl"))


def test_deterministic_scheduled_versions_and_bounded_lag(tmp_path, straight):
    train(_cfg(tmp_path / "again", 8))
    again = read_metrics(str(tmp_path / "again" / "metrics.jsonl"))
    assert _values(again) == _values(straight)
    bound = lag_bound(K, MINI, L)
    for r in straight:
        b = (r["step"] - 1) // MINI  # the batch this step trained on
        assert r["version"] == sampling_version(b, K, MINI, L)  # every row of the batch
        assert r["lag_max"] == r["step"] - 1 - r["version"] <= bound
        assert r["wait_s"] >= 0 and 0 <= r["trainer_idle_frac"] <= 1
        # After a checkpoint, its K batches wait beside up to K more in the engine's queue.
        assert 0 <= r["queue"] <= 2 * K
    # The engine runs ahead: batch 2 is sampled by version 0 under ahead=1 (2 inline).
    assert [r["version"] for r in straight] == [0, 0, 0, 0, 2, 2, 4, 4]
    assert max(r["lag_max"] for r in straight) == bound


def test_hung_engine_is_detected_and_stopped(tmp_path):
    """An engine that sends nothing within generation.timeout_s (here: shorter than it takes
    to start) stops the run with EngineError, and its process is gone."""
    from oapl.errors import EngineError

    before = {c.pid for c in psutil.Process().children(recursive=True)}
    with pytest.raises(EngineError, match=r"sent no batch for 1 s \(generation.timeout_s\)"):
        train(_cfg(tmp_path / "run", 8, "generation.timeout_s=1"))
    assert_gone([c.pid for c in psutil.Process().children(recursive=True)
                  if c.pid not in before])


def test_plot_shows_the_idle_share(tmp_path, straight):
    from oapl.plot import plot_runs

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in straight))
    png = plot_runs([str(run)], str(tmp_path / "c.png"))
    assert os.path.getsize(png) > 10_000


def _start(out, steps, *extra):
    cmd = [sys.executable, "-m", "oapl.cli", "train", TINY, f"output_dir={out}",
           f"trainer.steps={steps}", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_continues_identically(tmp_path, straight):
    out = tmp_path / "killed"
    proc = _start(out, 8)
    pids = wait_for_steps(proc, out, 5)
    assert len(pids) >= 2, "the engine runs in a child process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_gone(pids)  # the engine dies with the trainer, even on SIGKILL
    train(_cfg(out, 8, "resume=true"))
    resumed = read_metrics(str(out / "metrics.jsonl"))
    assert _values(resumed) == _values(straight)


def test_engine_killed_gives_one_clear_error(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, 1000)
    pids = wait_for_steps(proc, out, 2)
    engine = [p for p in pids if "spawn_main" in " ".join(psutil.Process(p).cmdline())]
    assert len(engine) == 1, [psutil.Process(p).cmdline() for p in pids]
    os.kill(engine[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    # One line, on a row of its own (the progress bar is closed first).
    lines = [x for x in err.splitlines() if "oapl train: error" in x]
    assert len(lines) == 1 and lines[0].startswith("oapl train: error: the engine process")
    assert "was killed by SIGKILL" in lines[0] and "Traceback" not in err
    # The engine process is as quiet as the trainer's: no library notices on the console.
    assert not [line for line in err.splitlines() if "Warning" in line or "Triton" in line]
    assert_gone(pids)


def test_sigterm_ends_both_processes(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, 1000)
    pids = wait_for_steps(proc, out, 2)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and time.time() - t < 15
    assert_gone(pids)


def test_push_needed_matches_enumeration():
    """A push is needed exactly when some remaining batch samples with its version."""
    for ahead, k, sync, first, total in itertools.product(
            range(4), (1, 2, 3), (1, 2, 3, 5), (0, 1, 3, 6), (0, 4, 9)):
        used = {sampling_version(b, ahead, k, sync) for b in range(first, total)}
        for v in range(total * k + sync + 1):
            assert push_needed(v, first, total, ahead, k, sync) == (v in used), \
                (v, first, total, ahead, k, sync)


def test_at_most_ahead_plus_one_pushes_wait():
    """The bound on staged copies (oapl.engine.transport.nccl.NCCLSender): at a push after
    step s the engine has started every batch the trainer took, so the needed versions <= s
    whose first batch has not started number at most K + 1."""
    total = 40
    for ahead, k, sync in itertools.product(range(1, 5), range(1, 5), range(1, 7)):
        first_batch = {}
        for b in range(total):
            first_batch.setdefault(sampling_version(b, ahead, k, sync), b)
        for s in range(0, total * k + 1, sync):
            started = -(-s // k) - 1
            waiting = [v for v in range(0, s + 1, sync)
                       if push_needed(v, 0, total, ahead, k, sync) and first_batch[v] > started]
            assert len(waiting) <= ahead + 1, (ahead, k, sync, s)


def test_nccl_client_and_engine_side_speak_one_protocol():
    """The trainer's proxy client (what vLLM's NCCLTrainerWeightTransferEngine drives) and the
    engine's side of one version, over plain queues with a stand-in generator: the engine
    begins the update before the client returns from start_weight_update (so the broadcast
    starts only then), then receives and finishes. No NCCL: that needs two GPUs."""
    from oapl.engine.messages import Stop, Stopped, taker
    from oapl.engine.transport.nccl import NCCLReceiver, QueueClient
    from oapl.errors import EngineError

    calls = []

    class Generator:
        def init_weight_transfer(self, init_info):
            calls.append(("init", init_info))

        def start_weight_update(self):
            calls.append("start")

        def update_weights(self, update_info):
            calls.append(("update", update_info))

        def finish_weight_update(self, version):
            calls.append(("finish", version))

    inbox, acks = queue.Queue(), queue.Queue()
    client = QueueClient(inbox, acks, threading.Event())
    take, receiver = taker(inbox), NCCLReceiver(acks)
    stopped = []

    def engine():
        receiver.open(Generator(), take)
        receiver.receive(Generator(), 4, take)
        try:
            take(Stop)
        except Stopped:
            stopped.append(True)

    thread = threading.Thread(target=engine)
    thread.start()
    client.init_weight_transfer_engine({"port": 1})
    client.version = 4
    client.start_weight_update()
    assert calls == [("init", {"port": 1}), "start"]
    client.update_weights({"names": ["w"]})
    client.finish_weight_update()
    inbox.put(Stop())
    thread.join(10)
    assert calls[2:] == [("update", {"names": ["w"]}), ("finish", 4)] and stopped
    stopping = threading.Event()
    stopping.set()
    with pytest.raises(EngineError, match="stopped"):  # nobody acks: close() ends the wait
        QueueClient(queue.Queue(), queue.Queue(), stopping).start_weight_update()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_weight_transfer_on_two_gpus(tmp_path):
    """The trainer on GPU 0, the engine on GPU 1, weights broadcast over vLLM's NCCL transfer:
    the run follows the schedule and samples exactly as with the shared-memory handover (the
    engine gets the same bf16 weights either way). Never run here (no GPU)."""
    gpus = ["trainer.device=cuda:0", "generation.devices=1"]
    runs = {}
    for transfer in ("shared_memory", "nccl"):
        out = tmp_path / transfer
        train(_cfg(out, 8, *gpus, f"generation.weight_transfer={transfer}"))
        runs[transfer] = read_metrics(str(out / "metrics.jsonl"))
    assert [r["version"] for r in runs["nccl"]] == [0, 0, 0, 0, 2, 2, 4, 4]
    assert _values(runs["nccl"]) == _values(runs["shared_memory"])
