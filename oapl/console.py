"""A clean console for the ``oapl`` command: progress bars and results, not the libraries'
notices. vLLM's warnings about the CPU build (no tcmalloc, no triton-cpu, eager mode, a chat
template it cannot warm up for a tiny tokenizer), torch's NUMA notice and transformers'
shard-writing bars say nothing a user can act on. Errors still show; ``OAPL_VERBOSE=1`` keeps
everything."""

from __future__ import annotations

import logging
import os
import warnings

# Set before vLLM / torch / transformers are imported (they read them at import time).
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_CONFIGURE_LOGGING": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Set by ``quiet``: tells the processes this one starts (the engine's) to be quiet as well.
QUIET_MARK = "OAPL_QUIET"


def quiet() -> None:
    """Silence library notices for this process and the processes it starts, unless
    ``OAPL_VERBOSE`` is set."""
    if os.environ.get("OAPL_VERBOSE"):
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ[QUIET_MARK] = "1"
    # multiprocessing's resource tracker (its own process, which reads this variable) warns at
    # exit about the semaphores of an engine process that was killed; it cleans them up itself.
    tracker = "ignore::UserWarning:multiprocessing.resource_tracker"
    if tracker not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(
            w for w in (os.environ.get("PYTHONWARNINGS"), tracker) if w)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
    logging.getLogger("vllm").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quiet_if_parent_was() -> None:
    """In a process started by one that called ``quiet`` (environment variables pass to a
    child, but logger levels and warning filters do not): be quiet too."""
    if os.environ.get(QUIET_MARK):
        quiet()
