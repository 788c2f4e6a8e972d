"""The trainer's CUDA path on a GPU without vLLM: policy (HF Llama, bf16) -> hidden states ->
``oapl_kernels`` Triton kernels -> AdamW, on synthetic rollouts.

    python3 benchmarks/gpu_trainer_check.py --out results/gpu

Checks that one train step's loss and gradients through the Triton path (fused and unfused)
match the chunked PyTorch path on the same GPU, that repeated steps lower the OAPL loss, and
times a step. Writes <out>/gpu_trainer_check.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oapl.config import Config  # noqa: E402
from oapl.batch import Rollout  # noqa: E402
from oapl.training.policy import Policy  # noqa: E402
from oapl.batch import collate
from oapl.training.trainer import LocalTrainer  # noqa: E402


def _model_dir(vocab: int, hidden: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=4, num_attention_heads=hidden // 64, num_key_value_heads=4, head_dim=64,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    path = tempfile.mkdtemp(prefix="oapl-gpu-model-")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _rollouts(groups: int, group: int, vocab: int, prompt_len: int, max_completion: int):
    rng = random.Random(0)
    rollouts, rewards = [], []
    for g in range(groups):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        for _ in range(group):
            n = rng.randint(1, max_completion)
            rollouts.append(Rollout(g, prompt, [rng.randrange(vocab) for _ in range(n)],
                                    [-rng.uniform(8, 12) for _ in range(n)], "stop", 0))
            rewards.append(float(rng.random() < 0.5))
    return rollouts, rewards


def _trainer(path: str, impl: str, device: torch.device) -> LocalTrainer:
    cfg = Config()
    cfg.generation.n, cfg.generation.temperature = 8, 0.9
    cfg.trainer.kernel_impl, cfg.trainer.lr, cfg.trainer.grad_clip = impl, 1e-4, 0.0
    return LocalTrainer(Policy.from_pretrained(path, torch.bfloat16, device), cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--small", action="store_true", help="a tiny shape (a dry run on the CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab, hidden, prompt_len, completion = (1000, 256, 8, 12) if args.small else (151936, 1024, 128, 384)
    path = _model_dir(vocab, hidden)
    batch = collate(*_rollouts(8, 8, vocab, prompt_len, completion), pad_id=0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "tokens": int(batch.loss_mask.sum()), "sequences": len(batch), "vocab": vocab}
    grads = {}
    for impl in ("torch", "triton"):
        trainer = _trainer(path, impl, device)
        trainer.optimizer.step = lambda: None  # compare gradients of the same weights
        metrics = trainer.train_step(batch)
        grads[impl] = ([p.grad.float().clone() for p in trainer.policy.parameters()], metrics["loss"])
        del trainer
    (g_t, loss_t), (g_x, loss_x) = grads["torch"], grads["triton"]
    result["loss_torch"], result["loss_triton"] = loss_t, loss_x
    result["grad_rel_err_max"] = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                                     for a, b in zip(g_x, g_t))
    trainer = _trainer(path, "triton", device)
    losses, times = [], []
    for _ in range(6):
        t0 = time.perf_counter()
        losses.append(trainer.train_step(batch)["loss"])  # returns floats: synchronizes
        times.append(time.perf_counter() - t0)
    result["losses"] = losses
    result["step_s_median"] = sorted(times[1:])[len(times[1:]) // 2]
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result["ok"] = (abs(loss_x - loss_t) <= 1e-2 * abs(loss_t) and result["grad_rel_err_max"] < 5e-2
                    and losses[-1] < losses[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_trainer_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
