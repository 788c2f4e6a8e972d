"""A ``VLLMGenerator`` in a child process, behind the ``Generator`` interface.

Under ``torchrun`` the trainer's process already holds the torch.distributed world, and vLLM
initializes one of its own (a 1-process world for its workers) in whatever process builds the
engine: the two cannot share a process. So rank 0 starts the engine in a spawned child, with the
torchrun environment removed, and talks to it over a pipe: ``generate`` requests and rollouts,
and weight pushes as tensors (torch.multiprocessing shares their storage, no disk). Inside the
child the engine is the same in-process ``VLLMGenerator`` the single-process loop uses.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.multiprocessing as mp

from ..batch import Rollout
from ..config import GenerationConfig
from ..console import quiet_if_parent_was

# Set by torchrun; vLLM must not mistake the child for a rank of the trainer's world.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def setup_engine_process(threads: int, devices: str | None = None) -> None:
    """First thing in a spawned engine process: forget torchrun's environment (vLLM must not
    take the child for a rank of the trainer's world), die with the parent (Linux
    ``PR_SET_PDEATHSIG``: no engine left behind when the trainer is killed, even by SIGKILL),
    see only ``devices`` (``CUDA_VISIBLE_DEVICES``) when given, use ``threads`` torch threads,
    keep the console as quiet as the parent's."""
    quiet_if_parent_was()
    for key in _LAUNCHER_ENV:
        os.environ.pop(key, None)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    torch.set_num_threads(threads)


def _quiet_resource_sharer(exc_type, exc, tb) -> None:
    """``sys.excepthook`` without the traceback that multiprocessing's resource sharer thread
    prints (through ``sys.excepthook``) when the engine process dies while receiving a weight
    push: the peer resets the connection that hands over the tensors' file descriptors. The
    dead engine is reported by whoever waits on it, in one line."""
    frames = []
    t = tb
    while t is not None:
        frames.append(t.tb_frame.f_code.co_filename)
        t = t.tb_next
    sharer = os.path.join("multiprocessing", "resource_sharer.py")
    if issubclass(exc_type, (ConnectionError, EOFError)) and any(
            f.endswith(sharer) for f in frames):
        return
    _default_excepthook(exc_type, exc, tb)


_default_excepthook = sys.excepthook


def quiet_resource_sharer() -> None:
    """Install ``_quiet_resource_sharer`` in the process that sends tensors."""
    sys.excepthook = _quiet_resource_sharer


def cpu_copies(named_tensors: Iterable[tuple[str, torch.Tensor]],
               dtype: torch.dtype | None) -> list[tuple[str, torch.Tensor]]:
    """Fresh CPU copies (in ``dtype`` when given) of the tensors, for another process: the
    trainer keeps updating its own, and torch.multiprocessing shares these by memory."""
    return [(name, t.detach().to("cpu", dtype or t.dtype, copy=True))
            for name, t in named_tensors]


def _serve(conn, model_path: str, cfg: GenerationConfig, seed: int, threads: int) -> None:
    """The child: build the engine, then answer ``(method, args)`` requests until ``close``
    (or until the parent goes away). Replies are ``("ok", result)`` or ``("error", text)``."""
    setup_engine_process(threads)
    from .generator import VLLMGenerator

    try:
        gen = VLLMGenerator(model_path, cfg, seed=seed)
    except Exception as e:  # reported to the parent, which raises
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            break
        if method == "close":
            break
        try:
            conn.send(("ok", getattr(gen, method)(*args)))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
    gen.close()


class GeneratorProcess:
    """The ``Generator`` interface over a ``VLLMGenerator`` in a spawned child process.
    ``threads``: the child's torch threads (the engine's CPU compute)."""

    def __init__(self, model_path: str, cfg: GenerationConfig, seed: int = 0, threads: int = 1):
        quiet_resource_sharer()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, model_path, cfg, seed, threads),
                                 daemon=True)
        self._proc.start()
        child.close()
        self._reply()
        self.version = 0
        self._push_dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)

    def _reply(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the generator process exited (code {self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"generator process: {value}")
        return value

    def _call(self, method: str, *args):
        self._conn.send((method, args))
        return self._reply()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_indices: Sequence[int],
        sampling: GenerationConfig,
        seed: int,
    ) -> list[list[Rollout]]:
        """As ``VLLMGenerator.generate``, in the child."""
        return self._call("generate", [list(p) for p in prompts], list(prompt_indices),
                          sampling, seed)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Send the weights (CPU copies in the engine's dtype, shared with the child) and push
        them into its engine."""
        self._call("load_weights", cpu_copies(named_tensors, self._push_dtype), version)
        self.version = version

    def close(self) -> None:
        """Stop the child and wait for it."""
        if self._proc.is_alive():
            self._conn.send(("close", ()))
            self._proc.join(timeout=60)
        self._conn.close()
