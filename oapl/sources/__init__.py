"""Where the loop's batches come from: ``make_source`` picks one from the config.

- ``engine.EngineSource``: an engine samples inline, in this process (``generation.ahead: 0``);
- ``ahead.AheadSource``: an engine in its own process samples ``generation.ahead`` batches
  ahead of the trainer, on a fixed schedule;
- ``file.RolloutFileSource``: a rollout file, no engine (``data.rollouts``; offline rounds).
"""

from __future__ import annotations

from ..config import Config
from ..engine.generator import Generator
from .ahead import AheadSource
from .base import BatchSource, SampledBatch
from .engine import EngineSource
from .file import RolloutFileSource

__all__ = ["BatchSource", "SampledBatch", "make_source"]


def make_source(cfg: Config, model_path: str, tokenizer,
                generator: Generator | None = None) -> BatchSource:
    """The source ``cfg`` asks for. ``generator``: an engine to sample with (else one is built)."""
    if cfg.data.rollouts is not None:
        if generator is not None:
            raise ValueError("data.rollouts trains from a file: no engine is used")
        return RolloutFileSource(cfg, model_path, tokenizer)
    if cfg.generation.ahead:
        if generator is not None:
            raise ValueError("generation.ahead >= 1 runs its own engine process: pass no engine")
        return AheadSource(cfg, model_path, tokenizer)
    return EngineSource(cfg, model_path, tokenizer, generator)
