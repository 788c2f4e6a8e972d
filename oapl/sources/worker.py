"""The engine's worker process: one program for every engine that runs outside the trainer's
process (``oapl.sources.ahead``). It builds the engine, then samples and scores the run's
batches in order on the fixed schedule (``sampling_version``), loading each batch's policy
version first through the weight transport, and sends each batch back as a ``Sampled``
(messages: ``oapl.engine.messages``).

It runs in a spawned child because vLLM initializes a torch.distributed world of its own (a
1-process world for its workers) in whatever process builds the engine, which under
``torchrun`` already holds the trainer's world, and so that the engine samples while the
trainer trains. Inside, the engine is the same in-process ``VLLMGenerator`` and the same
``EngineSource`` the single-process loop uses.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback

import torch

from ..config import Config
from ..console import quiet_if_parent_was
from ..engine.messages import Failed, Sampled, Start, Stopped, taker
from ..engine.transport import make_receiver
from .schedule import sampling_version

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
    keep the console as quiet as the parent's, and leave Ctrl-C to the trainer (which stops
    the worker)."""
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_worker(cfg: Config, model_path: str, threads: int, inbox, acks, results) -> None:
    """The worker: build the engine, then sample and score batches ``Start.first ..`` of the
    run, applying each batch's version first, until every batch is done or a ``Stop`` comes.
    ``inbox``: the trainer's messages; ``acks``: to the trainer's transport (nccl only);
    ``results``: ``Sampled`` per batch, or one ``Failed``."""
    setup_engine_process(threads, cfg.generation.devices)
    try:
        from transformers import AutoTokenizer

        from .engine import EngineSource

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        source = EngineSource(cfg, model_path, tokenizer)
        g, k = cfg.generation, cfg.trainer.minibatches
        take = taker(inbox)
        start = take(Start)
        source.load_state_dict({"sampler": start.sampler_state, "batches": start.first})
        receiver = make_receiver(cfg, acks)
        receiver.open(source.generator, take)
        held = None  # the version the engine's weights are (None: not yet the trainer's)
        last = time.perf_counter()
        for b in range(start.first, cfg.trainer.steps // k):
            need = sampling_version(b, g.ahead, k, cfg.algorithm.sync_every)
            stall = 0.0
            if held != need:  # the trainer sends exactly the versions some batch needs
                t = time.perf_counter()
                receiver.receive(source.generator, need, take)
                held, stall = need, time.perf_counter() - t
            scored = source.next_batch()
            now = time.perf_counter()
            work = scored.timings["generate_s"] + scored.timings["score_s"]
            results.put(Sampled(b, scored, source.sampler.state_dict(),
                                busy_frac=min(1.0, work / (now - last)), sync_stall_s=stall,
                                queue=results.qsize()))
            last = time.perf_counter()
    except Stopped:
        return
    except Exception:  # noqa: BLE001 - reported to the trainer, which stops the run
        results.put(Failed(traceback.format_exc()))
