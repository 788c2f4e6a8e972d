"""`oapl train` under ``torchrun``: an FSDP2-sharded trainer on every rank, the loop on rank 0.

    torchrun --nproc_per_node=N -m oapl.cli train CONFIG [key=value ...]

Rank 0 prepares the model and runs the ordinary loop (``oapl.loop.train``) with an
``FSDPTrainer`` and the vLLM engine in its worker process (``oapl.sources.worker``: vLLM cannot
share a process that holds the trainer's world), at ``generation.ahead: 0`` too; ranks 1..N-1
build the same ``FSDPTrainer`` and follow rank 0's commands.
The process group uses nccl on CUDA (one GPU per local rank) and gloo on the CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import Config
from .engine.generator import Generator
from .loop import train as loop_train
from .model_dir import model_dir
from .run import set_threads
from .training.fsdp_trainer import FSDPTrainer, stop_followers
from .training.policy import Policy
from .training.trainer import resolve_device


def launched() -> bool:
    """True in a process that torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _init(cfg: Config) -> torch.device:
    """Join the process group; the trainer's device on this rank."""
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # A long timeout: the other ranks wait in a collective while rank 0 generates.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(hours=2))
    return device


def train(cfg: Config, generator: Generator | None = None) -> dict | None:
    """Run (or resume) ``cfg`` on all ranks of the torchrun world; rank 0 returns the loop's
    summary, the others None. ``generator``: rank 0's engine to use instead of a new one."""
    device = _init(cfg)
    set_threads(cfg)
    rank = dist.get_rank()
    path = [model_dir(cfg.model.path, cfg) if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    summary = None
    if rank == 0:
        summary = loop_train(cfg, generator=generator, trainer_cls=FSDPTrainer,
                             engine_process=True)
        stop_followers()
    else:
        policy = Policy.from_pretrained(path[0], getattr(torch, cfg.model.dtype), device)
        FSDPTrainer(policy, cfg).follow()
    # On an error, rank 0 exits without this and torchrun stops the ranks that wait on it.
    dist.barrier()  # without it, gloo aborts at exit in about half the runs
    dist.destroy_process_group()
    return summary
