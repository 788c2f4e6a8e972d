"""Run plumbing shared by every command: the run directory and its resume check, threads,
seeds, the sampling-seed rule, the metric loggers, and the final export.

Sampling seeds: a run with seed ``s`` samples its ``k``-th completion (counting every
completion sampled before it in the run) with seed ``sampling_seed(s, k)``; evaluation adds
``EVAL_SEED_OFFSET``, so its samples never reuse training draws.
"""

from __future__ import annotations

import os
import random

import torch
import yaml

from .config import Config, save_config
from .metrics import MetricsLog
from .plot import plot_runs
from .training.checkpoint import list_checkpoints

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"resume", "trainer.steps"}
EVAL_SEED_OFFSET = 2**40  # training seeds are seed * 1_000_000_007 + (samples so far) < 2**40


def set_threads(cfg: Config) -> None:
    """Apply ``trainer.num_threads`` (before any torch work: with more threads than free
    cores, OpenMP threads wait on each other)."""
    if cfg.trainer.num_threads is not None:
        torch._C.set_num_threads(cfg.trainer.num_threads)  # vLLM makes torch's own a no-op


def seed_all(seed: int) -> None:
    """Seed Python's and torch's global RNGs (after building an engine: it reseeds them)."""
    random.seed(seed)
    torch.manual_seed(seed)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "engine_kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_run_dir(cfg: Config) -> None:
    """Raise ``ValueError`` unless ``output_dir`` may hold this run: a new run needs a
    directory without one; a resumed run needs the same config (but ``RESUMABLE_CHANGES``)."""
    cfg_path = os.path.join(cfg.output_dir, "config.yaml")
    if not cfg.resume:
        if os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl")):
            raise ValueError(
                f"{cfg.output_dir} already holds a run: pass resume=true, or another output_dir"
            )
        return
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            saved = _flatten(yaml.safe_load(f))
        now = _flatten(cfg.to_dict())
        diff = sorted(k for k in saved.keys() | now.keys()
                      if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if diff:
            raise ValueError(f"resume: config differs from {cfg_path} in {diff}")


def open_run_dir(cfg: Config) -> str | None:
    """Create the run directory (which ``check_run_dir`` accepted) and save ``config.yaml``;
    return the latest checkpoint to resume from (None for a new run or one without
    checkpoints yet)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    if not cfg.resume:
        return None
    ckpts = list_checkpoints(os.path.join(cfg.output_dir, "checkpoints"))
    return ckpts[-1] if ckpts else None


class Loggers:
    """Where each step's metrics go: ``<output_dir>/metrics.jsonl`` always, plus those of
    ``output.loggers``: TensorBoard event files (``<output_dir>/tensorboard``) and Weights &
    Biases in offline mode (``<output_dir>/wandb``; sync later with ``wandb sync``). All get
    the same numeric scalars, at x = ``step``."""

    def __init__(self, cfg: Config, step: int):
        self.jsonl = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"))
        self.jsonl.truncate_after(step)  # steps after the checkpoint are redone
        self.tensorboard = self.wandb = None
        if "tensorboard" in cfg.output.loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"),
                                             purge_step=step + 1)
        if "wandb" in cfg.output.loggers:
            try:
                import wandb
            except ImportError:
                raise ValueError("output.loggers has wandb, but the wandb package is not "
                                 "installed (pip install wandb)") from None
            self.wandb = wandb.init(mode="offline", dir=cfg.output_dir, config=cfg.to_dict(),
                                    name=os.path.basename(os.path.normpath(cfg.output_dir)),
                                    resume="allow")

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        scalars = {k: v for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def export_final(cfg: Config, trainer, tokenizer) -> dict:
    """Write ``<output_dir>/final_model`` (a HF directory with the tokenizer) and, with
    ``output.plot``, ``curves.png``; return the run's summary."""
    final_dir = os.path.join(cfg.output_dir, "final_model")
    trainer.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    summary = {"output_dir": cfg.output_dir, "final_model": final_dir}
    if cfg.output.plot:
        summary["plot"] = plot_runs([cfg.output_dir], os.path.join(cfg.output_dir, "curves.png"))
    return summary
