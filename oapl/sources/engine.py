"""Batches sampled inline by an engine: the engine samples the next prompts with the weights
it holds (lagging up to ``algorithm.sync_every`` steps), this process scores them, then the
trainer trains; pushes replace the engine's weights in place. The engine is a
``VLLMGenerator`` in this process, or any ``Generator`` given. The engine's worker process
(``oapl.sources.worker``) runs this same source on its side."""

from __future__ import annotations

import time

from ..batch import ScoredBatch, score_rollouts
from ..config import Config
from ..engine.generator import Generator, VLLMGenerator
from ..envs import env_class
from ..prompts import PromptSampler, load_prompts, sampling_seed
from ..rollout.multiturn import run_episodes
from ..rollout.turns import TurnFormat
from ..tasks import load_reward
from .base import Weights


class EngineSource:
    """``data.prompts_per_step`` prompts x ``generation.n`` samples per batch, drawn by a
    ``PromptSampler``; batch ``b`` samples with seed ``sampling_seed(seed, b * samples per
    batch)``. ``generator``: an engine to use (not closed here); by default a
    ``VLLMGenerator`` for ``model_path`` is built (and closed by ``close``). Every push is
    needed: the engine samples the next batch with whatever it holds."""

    fixed_sampler = None

    def __init__(self, cfg: Config, model_path: str, tokenizer, generator: Generator | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prompts = load_prompts(cfg.data, tokenizer)
        self.reward_fn, self.reward_workers = load_reward(cfg.data)
        self.own = generator is None
        self.generator = generator or VLLMGenerator(model_path, cfg.generation, seed=cfg.seed,
                                                    lora_rank=cfg.model.lora.engine_rank)
        self.sampler = PromptSampler(len(self.prompts), cfg.data.prompts_per_step, cfg.seed)
        self.batches = 0
        # env.name: multi-turn rollouts with that environment scoring them (oapl.rollout).
        self.env_cls = env_class(cfg.env.name) if cfg.env.name else None
        self.turns = TurnFormat(tokenizer) if self.env_cls else None

    def start(self, step: int) -> None:
        pass

    def next_batch(self) -> ScoredBatch:
        cfg = self.cfg
        idx = self.sampler.next_batch()
        seed = sampling_seed(cfg.seed, self.batches * len(idx) * cfg.generation.n)
        if self.env_cls is not None:
            ep = run_episodes(self.generator, self.env_cls, cfg.env, [self.prompts[i] for i in idx],
                              cfg.generation, seed, self.turns, cfg.generation.max_model_len)
            self.batches += 1
            timings = {"generate_s": ep.metrics.pop("generate_s"),
                       "score_s": ep.metrics.pop("env_s")}
            return ScoredBatch(ep.rollouts, ep.rewards, ep.failed, timings=timings,
                               metrics=ep.metrics)
        t = time.perf_counter()
        groups = self.generator.generate(
            [self.prompts[i].token_ids for i in idx], idx, cfg.generation, seed=seed
        )
        generate_s = time.perf_counter() - t
        rollouts = [r for g in groups for r in g]
        t = time.perf_counter()
        records = [self.prompts[r.prompt_index].record for r in rollouts]
        _, rewards, failed = score_rollouts(self.reward_fn, self.tokenizer, rollouts, records,
                                            self.reward_workers)
        score_s = time.perf_counter() - t
        self.batches += 1
        return ScoredBatch(rollouts, rewards, failed,
                           timings={"generate_s": generate_s, "score_s": score_s})

    def needs(self, version: int) -> bool:
        return True

    def push(self, weights: Weights, version: int) -> None:
        self.generator.load_weights(weights, version=version)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.batches = int(state["batches"])

    def close(self) -> None:
        if self.own:
            self.generator.close()
