"""Generation on real vLLM servers on 127.0.0.1 (``generation.servers`` / ``replicas``):
two servers started here with the documented command line (docs/TRAINING.md) serve most runs
of the module, and two runs start their own two replicas. Two runs give identical metrics, and
so does one server instead of two; every row's version is the scheduled one and the lag
bounded; the servers' log-probs agree with the trainer's after pushes; SIGKILL + resume
continues identically; the demo's task on two replicas learns, then a replica killed gives one
clear line (and with reroute on the module's servers the run finishes); SIGKILL of the trainer
leaves no server behind; multi-turn rollouts (two more servers, of the multi-turn demo's model)
give the same metrics on one server as on two.

The identity runs train on the servers' own log-probs (``algorithm.lag_logprobs=sampler``,
the default), so they also assert that a server returns the same log-probs for the same
seeded requests whatever order they arrive in and however it batches them."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from cli_runs import assert_gone, process_tree, wait_for_steps

from oapl.config import load_config
from oapl.loop import train
from oapl.metrics import read_metrics
from oapl.sources.schedule import lag_bound, sampling_version

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")
MULTITURN = os.path.join(ROOT, "examples", "tiny-multiturn.yaml")
START_S = 900  # servers start in 60-200 s on a loaded 2-core machine, 5+ min when it swaps
K, MINI, L = 1, 2, 2
SMALL = ["data.prompts_per_step=16", "generation.n=4", f"algorithm.sync_every={L}",
         f"trainer.minibatches={MINI}", "output.save_every=2", "output.keep_checkpoints=3",
         f"generation.ahead={K}", "output.plot=false", "generation.weight_transfer=gloo",
         "trainer.num_threads=1", f"generation.timeout_s={START_S}",
         "algorithm.lag_logprobs=sampler"]
DETERMINISTIC = ("step", "reward_mean", "reward_std", "loss", "lag", "lag_max", "version",
                 "seq_logratio_mean", "entropy_mean", "grad_norm", "completion_len_mean")
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def documented_command(model: str, port: int) -> list[str]:
    """docs/TRAINING.md's command line for a server started by hand (tiny model, CPU)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--dtype", "bfloat16",
            "--max-model-len", "32", "--logprobs-mode", "processed_logprobs",
            "--gpu-memory-utilization", "0.1", "--kv-cache-memory-bytes", "67108864",
            "--enforce-eager", "--weight-transfer-config", '{"backend": "gloo"}']


DOCUMENTED_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                  "OMP_NUM_THREADS": "1"}


def _wait_healthy(urls, procs, timeout=START_S):
    deadline = time.time() + timeout
    for url, proc in zip(urls, procs):
        while True:
            assert proc.poll() is None, f"the server at {url} exited"
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, f"the server at {url} did not come up"
            time.sleep(1)


@contextlib.contextmanager
def _documented_servers(model, logs):
    """Two servers of ``model`` started with the documented command; their URLs. Stopped
    (their whole process groups) on exit."""
    from oapl.engine.servers import free_port

    urls, procs = [], []
    for i in range(2):
        port = free_port()
        with open(logs / f"server{i}.log", "w") as out:
            procs.append(subprocess.Popen(
                documented_command(model, port), stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **DOCUMENTED_ENV}, cwd=logs, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        _wait_healthy(urls, procs)
        yield urls
    finally:
        for p in procs:
            _kill_group(p.pid)
        for p in procs:
            p.wait()


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """Two servers of the tiny model, for the module."""
    with _documented_servers(tiny_model_dir, tmp_path_factory.mktemp("servers")) as urls:
        yield urls


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _cfg(out, model, steps, *extra):
    return load_config(TINY, [f"output_dir={out}", f"model.path={model}",
                              f"trainer.steps={steps}", *SMALL, *extra])


def _on(urls):
    return "generation.servers=[" + ",".join(urls) + "]"


# Derived from the servers' log-probs: equal up to float noise (absolute tolerances). vLLM's
# CPU kernels are not batch-invariant on every CPU: with AMX a server's bf16 log-probs move
# with the requests that share its batch (seq_logratio_mean by up to ~1e-3 nats per
# completion between one server and two), and the weights drift by as much. The sampled
# tokens, so the rewards, lengths, turns and versions, stay exact.
FLOAT_NOISE = {"loss": 1e-4, "seq_logratio_mean": 5e-3, "entropy_mean": 1e-3,
               "grad_norm": 1e-3}


def assert_same_run(a, b, keys=DETERMINISTIC):
    """The runs ``a`` and ``b`` (metrics records) sampled the same: ``keys`` equal step by
    step, those in ``FLOAT_NOISE`` within its tolerance."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        exact = [k for k in keys if k not in FLOAT_NOISE]
        assert [y[k] for k in exact] == [x[k] for k in exact], (x["step"], exact)
        for k in FLOAT_NOISE.keys() & set(keys):
            assert y[k] == pytest.approx(x[k], abs=FLOAT_NOISE[k]), (x["step"], k)


@pytest.fixture(scope="module")
def straight(servers, tiny_model_dir, tmp_path_factory):
    """An uninterrupted 8-step run on the two servers, one batch ahead."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    train(_cfg(out, tiny_model_dir, 8, _on(servers)))
    return read_metrics(str(out / "metrics.jsonl"))


def test_two_runs_identical_on_schedule(servers, tiny_model_dir, tmp_path, straight):
    train(_cfg(tmp_path / "again", tiny_model_dir, 8, _on(servers)))
    again = read_metrics(str(tmp_path / "again" / "metrics.jsonl"))
    assert_same_run(again, straight)
    train(_cfg(tmp_path / "one", tiny_model_dir, 8, _on(servers[:1])))
    one = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    assert_same_run(one, straight)  # the same seeds whatever the server count
    bound = lag_bound(K, MINI, L)
    for r in straight:
        b = (r["step"] - 1) // MINI
        assert r["version"] == sampling_version(b, K, MINI, L)
        assert r["lag_max"] == r["step"] - 1 - r["version"] <= bound
        assert r["wait_s"] >= 0 and r["push_s"] >= 0 and r["rerouted_groups"] == 0
        for s in range(2):
            assert r[f"server{s}_sync_stall_s"] >= 0 and 0 <= r[f"server{s}_busy_frac"] <= 1
    assert [r["version"] for r in straight] == [0, 0, 0, 0, 2, 2, 4, 4]
    for url in servers:  # each server reports the version it last took
        assert requests.get(url + "/weight_info").json()["weight_version"] in ("4", "6")


def test_servers_logprobs_agree_with_the_trainer_after_pushes(servers, tiny_model_dir, tmp_path):
    """With lag_logprobs=recompute every step compares the sampler's log-probs with the
    trainer's at the weights that sampled them: minibatch 0 of a batch is server 0's share,
    minibatch 1 server 1's. bf16 servers vs the fp32 trainer: as close as the in-process
    engine (0.001-0.006 nats mean per token measured)."""
    out = tmp_path / "run"
    train(_cfg(out, tiny_model_dir, 6, _on(servers), "generation.ahead=0",
               "algorithm.lag_logprobs=recompute"))
    records = read_metrics(str(out / "metrics.jsonl"))
    assert len(records) == 6
    for r in records:
        assert r["sampler_mismatch_mean"] < 0.01, r
        assert r["sampler_mismatch_max"] < 0.1, r


def _start(out, model, steps, *extra):
    cmd = [sys.executable, "-m", "oapl.cli", "train", TINY, f"output_dir={out}",
           f"model.path={model}", f"trainer.steps={steps}", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_continues_identically(servers, tiny_model_dir, tmp_path, straight):
    out = tmp_path / "killed"
    proc = _start(out, tiny_model_dir, 8, _on(servers))
    wait_for_steps(proc, out, timeout=START_S, n=5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    train(_cfg(out, tiny_model_dir, 8, _on(servers), "resume=true"))
    assert_same_run(read_metrics(str(out / "metrics.jsonl")), straight)


def test_replicas_learn_then_one_killed_gives_one_clear_line(tiny_model_dir, tmp_path):
    """The demo's task on two local replicas (the sampler's log-probs, as the demo), 32
    prompts x 8 samples a batch, lr 1e-3: over 60 steps the mean reward of the last quarter
    beats the first quarter's by 0.1 (seed 0 measured 0.124 -> 0.329, chance 0.1); then one
    replica is killed: one line naming its URL, exit 1, and every process the run started is
    gone."""
    out = tmp_path / "run"
    proc = _start(out, tiny_model_dir, 1000, "generation.replicas=2", "trainer.lr=1e-3",
                  "output.save_every=100", "data.prompts_per_step=32", "generation.n=8",
                  "algorithm.lag_logprobs=sampler")
    wait_for_steps(proc, out, timeout=START_S, n=60)
    rewards = [r["reward_mean"] for r in read_metrics(str(out / "metrics.jsonl"))[:60]]
    assert sum(rewards[-15:]) / 15 > sum(rewards[:15]) / 15 + 0.1, rewards
    pids = process_tree(proc.pid)
    api = [p for p in pids if "api_server" in " ".join(psutil.Process(p).cmdline())
           and "server_guard" not in " ".join(psutil.Process(p).cmdline())]
    assert len(api) == 2
    port = psutil.Process(api[1]).cmdline()
    port = port[port.index("--port") + 1]
    os.kill(api[1], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    # On a row of its own: the progress bar is closed first.
    lines = [x for x in err.splitlines() if "oapl train: error" in x]
    assert all(x.startswith("oapl train: error") for x in lines), err[-3000:]
    assert len(lines) == 1 and f"server http://127.0.0.1:{port}" in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert_gone(pids, within=30.0)


def test_sigkill_of_the_trainer_leaves_no_server(tiny_model_dir, tmp_path):
    """Killed while its replicas start (their engine processes already up)."""
    out = tmp_path / "run"
    proc = _start(out, tiny_model_dir, 1000, "generation.replicas=2")
    deadline = time.time() + START_S
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        names = []
        for p in process_tree(proc.pid):
            try:
                names.append(" ".join(psutil.Process(p).cmdline()))
            except psutil.Error:  # gone, or a zombie, meanwhile
                pass
        if sum("EngineCore" in n for n in names) == 2:
            break
        assert time.time() < deadline
        time.sleep(0.5)
    pids = process_tree(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_gone(pids, within=30.0)


def test_multiturn_on_servers_same_whatever_the_server_count(tmp_path):
    """The multi-turn demo's task (toy:ask, the tiny model's own vocabulary and warm-up) on
    two servers of its model: conversations of two turns and more, every batch sampled by its
    scheduled version, and one server gives the same metrics as two (a conversation's turns
    go to its group's server, seeded as in one process)."""
    from oapl.model_dir import prepare_tiny

    model = prepare_tiny(load_config(MULTITURN, [f"output_dir={tmp_path}"]))

    def run(name, urls):
        out = tmp_path / name
        train(load_config(MULTITURN, [f"output_dir={out}", f"model.path={model}",
                                      "trainer.steps=6", *SMALL, _on(urls)]))
        return read_metrics(str(out / "metrics.jsonl"))

    keys = DETERMINISTIC + ("turns_mean", "multi_turn_frac", "env_tokens_mean",
                            "model_tokens_mean", "env_failures", "env_truncated")
    (tmp_path / "logs").mkdir()
    with _documented_servers(model, tmp_path / "logs") as urls:
        two, one = run("two", urls), run("one", urls[:1])
    assert_same_run(one, two, keys)
    assert [r["version"] for r in two] == [0, 0, 0, 0, 2, 2]
    assert max(r["multi_turn_frac"] for r in two) > 0.1 and all(
        r["env_failures"] == 0 for r in two), two


def test_reroute_finishes_when_a_server_dies(servers, tiny_model_dir, tmp_path):
    """Last: it kills one of the module's servers. Its groups go to the other one. L = 10:
    version 0 samples every batch, so the death is met while sampling (a server failing in
    an update stops the run, reroute or not)."""
    out = tmp_path / "run"
    proc = _start(out, tiny_model_dir, 10, _on(servers), "generation.on_server_failure=reroute",
                  "algorithm.sync_every=10", "output.save_every=10")
    wait_for_steps(proc, out, timeout=START_S, n=3)
    port = servers[1].rsplit(":", 1)[1]
    victim = [c for c in psutil.process_iter(["cmdline"])
              if c.info["cmdline"] and "--port" in c.info["cmdline"]
              and c.info["cmdline"][c.info["cmdline"].index("--port") + 1] == port]
    _kill_group(os.getpgid(victim[0].pid))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    records = read_metrics(str(out / "metrics.jsonl"))
    assert len(records) == 10 and sum(r["rerouted_groups"] for r in records) > 0
