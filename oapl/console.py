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


def quiet() -> None:
    """Silence library notices for this process and the processes it starts, unless
    ``OAPL_VERBOSE`` is set."""
    if os.environ.get("OAPL_VERBOSE"):
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
    logging.getLogger("vllm").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
