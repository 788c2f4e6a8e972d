"""AMX tile state for vLLM's CPU kernels on x86 CPUs that have AMX (Sapphire Rapids and later).

Linux gives a process the AMX tile registers only after it asks (``arch_prctl
ARCH_REQ_XCOMP_PERM``); the first tile instruction of a process that has not asked dies of
SIGILL. vLLM's CPU attention picks its AMX kernel for bf16 on such CPUs without asking, and
oneDNN asks only inside its own AMX paths, so whether an engine process survives its first
request depended on which op ran first (a fresh server process running the tiny toy:ask
model died). ``allow_amx`` asks, through torch; vLLM calls it in each of its processes, the in-process
engine's included (the ``vllm.general_plugins`` entry point in setup.py).
"""

from __future__ import annotations


def allow_amx() -> None:
    """Request the AMX tile state for this process where the CPU has AMX; else nothing."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
