"""One OAPLTrainer optimizer step under ``accelerate launch`` (DDP over gloo on the CPU), for
tests/test_trl.py, which also takes its toy dataset and reward function from here:

    accelerate launch --multi_gpu --num_processes 2 tests/trl_ddp_worker.py OUT_DIR MODEL_DIR

Each process writes OUT_DIR/rank{r}.pt: its micro-batch, the gradients every process holds
before the optimizer step (DDP's average over the processes; no clipping), the initial
weights and the number of processes.
"""
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from oapl.integrations.trl import OAPLConfig, OAPLTrainer  # first: it filters TRL's notices

import trl.trainer.grpo_trainer as trl_grpo  # noqa: E402  (isort: skip)


def prompts() -> Dataset:
    return Dataset.from_list([{"prompt": f"max {a} {b} ="} for a in range(10) for b in range(10)])


def digit_reward(completions, **kwargs) -> list[float]:
    """A TRL reward function: the completion's first word as a digit / 9, else 0."""
    first = [c.split()[0] if c.split() else "" for c in completions]
    return [int(w) / 9 if w.isdigit() else 0.0 for w in first]


class KeepGradients(TrainerCallback):
    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()}


def main(out_dir: str, model_dir: str) -> None:
    trl_grpo.shuffle_sequence_dict = lambda batch: batch  # keep each group's rows in order
    args = OAPLConfig(output_dir=f"{out_dir}/run", per_device_train_batch_size=6, num_generations=4,
                      max_completion_length=3, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                      save_strategy="no", learning_rate=1e-3, beta1=0.5, beta2=0.1, temperature=0.7, seed=0,
                      max_grad_norm=0.0, logging_steps=1)
    keep = KeepGradients()
    tr = OAPLTrainer(model=model_dir, reward_funcs=digit_reward, args=args, train_dataset=prompts(),
                     callbacks=[keep])
    initial = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    batch = {k: v for k, v in tr._buffered_inputs[0].items() if isinstance(v, torch.Tensor)}
    torch.save({"batch": batch, "grads": keep.grads, "initial": initial,
                "processes": tr.accelerator.num_processes}, f"{out_dir}/rank{tr.accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
