"""LoRA against full fine-tuning on the CPU (``model.lora``): the engine's sampling time with an
adapter against the base (two live in-process engines, calls alternated so both see the same
load), and the trainer's step time, peak memory and push bytes (one subprocess per arm, arms
alternated).

    .venv/bin/python -m benchmarks.lora_cpu sampling --model builtin:smollm2-135m-instruct
    .venv/bin/python -m benchmarks.lora_cpu step --model builtin:smollm2-135m-instruct

Prints one JSON object per measurement and a summary line; numbers go to docs/PERF.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

LORA = dict(rank=16, alpha=32.0, target_modules=["all-linear"])


def _model(path: str) -> str:
    from oapl.model_source import BUILTIN_PREFIX, resolve_model
    from oapl.tiny import build_tiny_model

    if path == "tiny":
        return build_tiny_model(os.path.join(tempfile.gettempdir(), "oapl-lora-bench-tiny"), seed=0)
    return resolve_model(path) if path.startswith(BUILTIN_PREFIX) else path


def sampling(args) -> None:
    """Median seconds per generate call, base engine vs the same engine serving a random
    rank-16 adapter on every linear layer."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from oapl.config import GenerationConfig, LoraConfig
    from oapl.engine.generator import VLLMGenerator
    from oapl.training.policy import Policy

    path = _model(args.model)
    torch.manual_seed(0)
    policy = Policy.from_pretrained(path, torch.float32, torch.device("cpu"), LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    cfg = GenerationConfig(n=args.n, temperature=0.7, max_tokens=args.max_tokens,
                           dtype="bfloat16", max_model_len=args.prompt_len + args.max_tokens + 8,
                           kv_cache_memory_bytes=512 * 2**20, skip_tokenizer_init=True)
    engines = {"base": VLLMGenerator(path, cfg), "lora": VLLMGenerator(path, cfg, lora_rank=16)}
    t = time.perf_counter()
    engines["lora"].load_weights(policy.push_weights(), 1)
    load_s = time.perf_counter() - t
    vocab = policy.model.config.vocab_size
    prompts = [[4 + (7 * i + j) % (vocab - 4) for j in range(args.prompt_len)]
               for i in range(args.prompts)]
    times: dict[str, list[float]] = {k: [] for k in engines}
    for rep in range(args.reps):
        for name, gen in engines.items():
            t = time.perf_counter()
            gen.generate(prompts, list(range(len(prompts))), cfg, seed=rep)
            times[name].append(time.perf_counter() - t)
            print(json.dumps({"arm": name, "rep": rep, "s": round(times[name][-1], 3),
                              "load": os.getloadavg()[0]}), flush=True)
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    print(json.dumps({"summary": "sampling", "model": args.model, "median_s": med,
                      "lora_over_base": med["lora"] / med["base"], "adapter_load_s": load_s,
                      "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens}))
    for gen in engines.values():
        gen.close()


def _step_arm(args) -> None:
    """One arm in this process: ``args.steps`` trainer steps on a synthetic batch of
    ``args.rows`` rows of ``args.tokens`` tokens; median step seconds, peak RSS, push bytes."""
    from oapl.batch import Rollout, collate
    from oapl.config import Config, LoraConfig
    from oapl.engine.adapter import push_bytes
    from oapl.training.policy import Policy
    from oapl.training.trainer import LocalTrainer

    torch._C.set_num_threads(1)
    path = _model(args.model)
    cfg = Config()
    cfg.generation.n, cfg.trainer.device = 4, "cpu"
    cfg.trainer.autocast_dtype = "bfloat16" if args.autocast else None
    if args.arm == "lora":
        cfg.model.lora = LoraConfig(**LORA)
    torch.manual_seed(0)
    policy = Policy.from_pretrained(path, torch.float32, torch.device("cpu"), cfg.model.lora)
    trainer = LocalTrainer(policy, cfg)
    g = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vocab_size
    prompt_len = args.tokens // 2
    rollouts = [Rollout(i // 4, torch.randint(3, vocab, (prompt_len,), generator=g).tolist(),
                        torch.randint(3, vocab, (args.tokens - prompt_len,), generator=g).tolist(),
                        [-1.0] * (args.tokens - prompt_len), "length", 0)
                for i in range(args.rows)]
    batch = collate(rollouts, torch.rand(args.rows, generator=g).tolist(), pad_id=0)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    print(json.dumps({"arm": args.arm, "step_s": times, "median_step_s": statistics.median(times[1:]),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "push_bytes_bf16": push_bytes(trainer.push_weights(), torch.bfloat16),
                      "trainable_params": trainable, "load": os.getloadavg()[0]}), flush=True)


def step(args) -> None:
    """The two arms, alternated, each in its own process (peak memory per arm)."""
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.reps):
        for arm in results:
            cmd = [sys.executable, "-m", "benchmarks.lora_cpu", "_arm", "--arm", arm,
                   "--model", args.model, "--steps", str(args.steps), "--rows", str(args.rows),
                   "--tokens", str(args.tokens)] + (["--autocast"] if args.autocast else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[arm].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[arm][-1]), flush=True)
    summary = {arm: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                     "push_bytes_bf16": rs[0]["push_bytes_bf16"],
                     "trainable_params": rs[0]["trainable_params"]} for arm, rs in results.items()}
    print(json.dumps({"summary": "step", "model": args.model, "rows": args.rows,
                      "tokens": args.tokens, **summary,
                      "lora_over_full_step": summary["lora"]["median_step_s"]
                      / summary["full"]["median_step_s"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["sampling", "step", "_arm"])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--arm", choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--autocast", action="store_true")
    args = ap.parse_args()
    {"sampling": sampling, "step": step, "_arm": _step_arm}[args.what](args)


if __name__ == "__main__":
    main()
