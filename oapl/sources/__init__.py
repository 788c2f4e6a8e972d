"""Where the loop's batches come from: ``make_source`` picks one from the config.

- ``engine.EngineSource``: an engine samples inline, in this process (``generation.ahead: 0``);
- ``ahead.AheadSource``: an engine in its own worker process (``worker``) samples
  ``generation.ahead`` batches ahead of the trainer, on a fixed schedule (``schedule``);
- ``file.RolloutFileSource``: a rollout file, no engine (``data.rollouts``; offline rounds);
- ``servers.ServerSource``: vLLM servers (``generation.servers`` / ``replicas``), on the same
  fixed schedule.

Every source hands out ``ScoredBatch``es and takes weights, never the trainer (``base``).
"""

from __future__ import annotations

from ..config import Config, uses_servers
from ..engine.generator import Generator
from .ahead import AheadSource
from .base import BatchSource, ScoredBatch
from .engine import EngineSource
from .file import RolloutFileSource

__all__ = ["BatchSource", "ScoredBatch", "make_source"]


def make_source(cfg: Config, model_path: str, tokenizer, generator: Generator | None = None,
                engine_process: bool = False) -> BatchSource:
    """The source ``cfg`` asks for. ``generator``: an engine to sample with (else one is
    built); ``engine_process``: build it in a worker process even at ``generation.ahead: 0``
    (under torchrun)."""
    if cfg.data.rollouts is not None:
        if generator is not None:
            raise ValueError("data.rollouts trains from a file: no engine is used")
        return RolloutFileSource(cfg, model_path, tokenizer)
    if uses_servers(cfg.generation):
        if generator is not None:
            raise ValueError("generation.servers/replicas sample on servers: pass no engine")
        from .servers import ServerSource  # imports aiohttp

        return ServerSource(cfg, model_path, tokenizer)
    if generator is not None:
        if cfg.generation.ahead:
            raise ValueError("generation.ahead >= 1 runs its own engine process: pass no engine")
        return EngineSource(cfg, model_path, tokenizer, generator)
    if cfg.generation.ahead or engine_process:
        return AheadSource(cfg, model_path)
    return EngineSource(cfg, model_path, tokenizer)
