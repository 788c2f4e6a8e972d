"""Push time of one model's full weights, shared memory against HTTP + gloo, without training.

    .venv/bin/python benchmarks/push_time.py --model builtin:smollm2-135m-instruct \
        --config examples/smollm2-cpu.yaml [--repeats 3]
    .venv/bin/python benchmarks/push_time.py --model DIR --config examples/tiny-cpu.yaml

The weights are the model directory's own (fp32, Hugging Face names), sent in the wire dtype of
``generation.dtype``, as the loop sends them. Per repeat (medians printed, as JSON):
- shared memory: ``push_s``, the trainer's side (CPU copies in the wire dtype, one queued
  message: ``SharedMemorySender.send``), and ``load_s``, the engine's side
  (``VLLMGenerator.load_weights`` of those copies into an in-process engine);
- HTTP + gloo, one local server (``generation.replicas=1``): ``push_s``, the trainer's side
  (staging the copies: ``HTTPSender.send``), and ``update_s``, one round of vLLM's weight
  protocol on the server with the broadcast (``HTTPSender.deliver``); ``init_s`` once, forming
  the group.
One engine at a time (the in-process one is closed before the server starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from oapl.config import load_config  # noqa: E402
from oapl.engine.transport.base import wire_dtype  # noqa: E402
from oapl.model_source import resolve_model  # noqa: E402


def shared_memory(model: str, cfg, weights, repeats: int) -> dict:
    from oapl.engine.generator import VLLMGenerator
    from oapl.engine.transport.shared_memory import SharedMemorySender

    inbox = mp.get_context("spawn").Queue()
    sender = SharedMemorySender(inbox, wire_dtype(cfg.generation.dtype))
    engine = VLLMGenerator(model, cfg.generation, seed=cfg.seed)
    push, load = [], []
    try:
        for v in range(1, repeats + 1):
            t = time.perf_counter()
            sender.send(v, weights)
            push.append(time.perf_counter() - t)
            msg = inbox.get()
            t = time.perf_counter()
            engine.load_weights(msg.weights, v)
            load.append(time.perf_counter() - t)
    finally:
        engine.close()
        inbox.close()
    return {"push_s": statistics.median(push), "load_s": statistics.median(load)}


def http_gloo(model: str, cfg, weights, repeats: int, log_dir: str) -> dict:
    from oapl.engine.server_client import ServerClient, ServersSyncClient
    from oapl.engine.servers import LocalServers
    from oapl.engine.transport.http import HTTPSender

    g = cfg.generation
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # set by the in-process engine
    local = LocalServers(model, g, cfg.seed, log_dir)
    sender = None
    try:
        local.wait(g.timeout_s)
        client = ServerClient(local.urls[0], g.timeout_s)
        client.connect()
        sender = HTTPSender(ServersSyncClient([client]), "gloo", g.transfer_address,
                            wire_dtype(g.dtype), torch.device("cpu"), g.timeout_s)
        t = time.perf_counter()
        sender.init()
        init_s = time.perf_counter() - t
        push, update = [], []
        for v in range(1, repeats + 1):
            t = time.perf_counter()
            sender.send(v, weights)
            push.append(time.perf_counter() - t)
            t = time.perf_counter()
            sender.deliver(v)
            update.append(time.perf_counter() - t)
    finally:
        if sender is not None:
            sender.close()
        local.close()
    return {"push_s": statistics.median(push), "update_s": statistics.median(update),
            "init_s": init_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model directory or builtin:NAME")
    p.add_argument("--config", required=True, help="the run config whose generation is used")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = resolve_model(args.model)
    cfg = load_config(args.config, [f"model.path={model}", "generation.replicas=1",
                                    "generation.weight_transfer=gloo",
                                    "generation.num_threads=1"])
    torch.set_num_threads(1)
    weights = list(load_file(os.path.join(model, "model.safetensors")).items())
    size = sum(t.numel() for _, t in weights)
    out = {"model": args.model, "params": size}
    out["shared_memory"] = shared_memory(model, cfg, weights, args.repeats)
    with tempfile.TemporaryDirectory() as logs:
        out["http_gloo"] = http_gloo(model, cfg, weights, args.repeats, logs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
