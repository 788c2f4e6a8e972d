"""Atomic checkpoints: ``<root>/step_<N>/`` holds the trainer's files (model safetensors,
optimizer), ``state.json`` (loop state: step, ...), ``rng.pt`` and, when given, ``source.pt``
(the batch source's position and whatever it needs to continue exactly: any picklable object).

A checkpoint is written under ``step_<N>.tmp`` and renamed into place only when complete, so
a crash mid-write leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

from .trainer import Trainer

_NAME = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    """Python and torch (CPU and, when present, CUDA) RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str, trainer: Trainer, state: dict, keep: int,
                    source_state: object = None) -> str:
    """Write checkpoint ``root/step_<state["step"]>`` atomically, then delete all but the
    newest ``keep``. ``state`` must be JSON-serializable and hold an int ``step``;
    ``source_state`` (optional) is pickled into ``source.pt``."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{int(state['step']):08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    trainer.save(tmp)
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
    if source_state is not None:
        torch.save(source_state, os.path.join(tmp, "source.pt"))
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root``, oldest first (``*.tmp`` leftovers are ignored)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _NAME.match(n))]
    return [os.path.join(root, n) for _, n in sorted(found)]


def load_checkpoint(path: str, trainer: Trainer) -> dict:
    """Restore the trainer and the RNGs from checkpoint ``path``; return its loop state, with
    the source's under ``"source"`` when the checkpoint has one."""
    trainer.load(path)
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    source = os.path.join(path, "source.pt")
    if os.path.exists(source):
        state["source"] = torch.load(source, weights_only=False)
    return state
