"""Weight transports (``generation.weight_transfer``), one file each behind the interface of
``base``: ``shared_memory`` (CPU copies shared with the engine's process) and ``nccl`` (vLLM's
NCCL weight transfer from the trainer's GPU; imports vLLM, so only when chosen)."""

from __future__ import annotations

import torch

from ...config import Config
from .base import WeightReceiver, WeightSender, Weights, wire_dtype
from .shared_memory import SharedMemoryReceiver, SharedMemorySender

__all__ = ["WeightReceiver", "WeightSender", "Weights", "make_receiver", "make_sender",
           "wire_dtype"]


def make_sender(cfg: Config, inbox, acks) -> WeightSender:
    """The trainer's side of ``cfg``'s transport to an engine worker reading ``inbox`` (and
    acking on ``acks``). With nccl the rendezvous starts now, in the sender's thread."""
    g = cfg.generation
    if g.weight_transfer == "nccl":
        from .nccl import NCCLSender

        index = torch.device(cfg.trainer.device).index
        device = torch.cuda.current_device() if index is None else index
        kw = g.engine_kwargs  # the engine's workers: tensor- times pipeline-parallel size
        world = kw.get("tensor_parallel_size", 1) * kw.get("pipeline_parallel_size", 1) + 1
        return NCCLSender(inbox, acks, wire_dtype(g.dtype), device, world)
    return SharedMemorySender(inbox, wire_dtype(g.dtype))


def make_receiver(cfg: Config, acks) -> WeightReceiver:
    """The engine worker's side of ``cfg``'s transport."""
    if cfg.generation.weight_transfer == "nccl":
        from .nccl import NCCLReceiver

        return NCCLReceiver(acks)
    return SharedMemoryReceiver()
