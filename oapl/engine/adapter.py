"""A LoRA adapter as a push payload (``model.lora``): what travels to the engine instead of the
full weights, and how an engine takes it.

A push's weights are either (Hugging Face name, tensor) pairs (full fine-tuning) or an
``AdapterWeights``: PEFT's adapter tensors (names ``base_model.model.<module>.lora_A.weight``
and ``...lora_B.weight``, the names PEFT saves and vLLM loads) with the adapter's
``adapter_config.json``. vLLM loads adapters from a directory, so the engine's side writes the
payload as a PEFT directory (on a RAM disk where there is one) and loads it as a
``LoRARequest`` of that version (``VLLMGenerator``); a vLLM server loads the same directory
through its adapter route (``oapl.engine.transport.adapter_routes``).

Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import safetensors.torch
import torch

# vLLM's allowed ``max_lora_rank`` values (``vllm.config.lora.MaxLoRARanks``).
ENGINE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def engine_max_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in ENGINE_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"model.lora.rank {rank} is larger than vLLM's largest LoRA rank "
                     f"({ENGINE_RANKS[-1]})")


@dataclass
class AdapterWeights:
    """One version of a LoRA adapter. ``tensors``: PEFT name -> tensor (lora_A [r, in],
    lora_B [out, r]); ``config``: the ``adapter_config.json`` mapping (rank, alpha, target
    modules, the base model's path, ...)."""

    tensors: dict[str, torch.Tensor]
    config: dict

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data, what a push moves."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def cpu_copy(self, dtype: torch.dtype | None = None) -> "AdapterWeights":
        """Fresh CPU copies of the tensors (in ``dtype`` when given), for another process or
        a later load: the trainer keeps updating its own."""
        tensors = {k: t.detach().to("cpu", dtype or t.dtype, copy=True)
                   for k, t in self.tensors.items()}
        return AdapterWeights(tensors, dict(self.config))

    def save(self, directory: str) -> str:
        """Write a PEFT adapter directory (``adapter_model.safetensors``,
        ``adapter_config.json``) that PEFT, transformers and vLLM load; returns it."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: t.detach().cpu().contiguous() for k, t in self.tensors.items()}
        safetensors.torch.save_file(tensors, os.path.join(directory, ADAPTER_FILE))
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)
        return directory


def _bytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * (t.element_size() if dtype is None else dtype.itemsize)


def push_bytes(weights, dtype: torch.dtype | None) -> int:
    """Bytes a push of ``weights`` (an ``AdapterWeights`` or (name, tensor) pairs, consumed)
    moves in ``dtype`` (None: each tensor's own)."""
    tensors: Iterable[torch.Tensor] = (weights.tensors.values() if isinstance(weights, AdapterWeights)
                                       else (t for _, t in weights))
    return sum(_bytes(t, dtype) for t in tensors)


def metered(weights, dtype: torch.dtype | None) -> tuple[object, Callable[[], int]]:
    """``weights`` to push, unchanged (pairs still streamed one at a time), and a function that
    gives the bytes the push moves in ``dtype``: for pairs, those of the tensors iterated so
    far (all of them once the push is done)."""
    if isinstance(weights, AdapterWeights):
        total = push_bytes(weights, dtype)
        return weights, lambda: total
    seen = [0]

    def stream():
        for name, t in weights:
            seen[0] += _bytes(t, dtype)
            yield name, t
    return stream(), lambda: seen[0]


def is_adapter_dir(path: str) -> bool:
    """A PEFT adapter directory (an ``adapter_config.json``, no model ``config.json``)."""
    return (os.path.isfile(os.path.join(path, CONFIG_FILE))
            and not os.path.isfile(os.path.join(path, "config.json")))


class AdapterDirs:
    """Where an engine writes the adapters it is pushed: one directory per version under a
    private temporary root (on ``/dev/shm`` when it exists: no disk), removed when replaced
    and by ``close``."""

    def __init__(self) -> None:
        shm = "/dev/shm"
        self.root = tempfile.mkdtemp(prefix="oapl-lora-",
                                     dir=shm if os.path.isdir(shm) else None)

    def write(self, adapter: AdapterWeights, version: int) -> str:
        return adapter.save(os.path.join(self.root, f"v{version}"))

    def remove(self, version: int) -> None:
        shutil.rmtree(os.path.join(self.root, f"v{version}"), ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def adapter_name(version: int) -> str:
    """The engine's name for the adapter of policy ``version`` (vLLM ids: ``version + 1``)."""
    return f"oapl-v{version}"
