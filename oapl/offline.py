"""Offline OAPL, as in the paper's own training: sample a rollout file with the current model,
train on the file with no engine running, repeat in rounds.

    oapl generate CONFIG [key=value ...] [-o PATH]   -> a rollout file (``oapl.sources.rollout_file``)
    oapl train CONFIG data.rollouts=PATH             -> the ordinary loop over the file
    oapl rounds CONFIG rounds=N                      -> ``run_rounds``: generate, train, repeat

``generate_rollouts`` samples ``generation.n`` completions of every prompt of the data source
(after ``data.limit``), scores them, and stores V* per group (``optimal_values`` with
``algorithm.beta1``). Training on the file is ``oapl.loop.train`` with a
``oapl.sources.file.RolloutFileSource``.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from transformers import AutoTokenizer

from oapl_kernels import optimal_values

from .batch import score_rollouts
from .config import Config, save_config
from .engine.generator import Generator, VLLMGenerator, sample_groups
from .engine.transport import wire_dtype
from .loop import train
from .model_dir import checkpoint_step, is_checkpoint, model_dir, push_model
from .prompts import load_prompts, sampling_seed
from .rollout.multiturn import sample_episodes
from .rollout.turns import TurnFormat
from .run import set_threads
from .sources.rollout_file import write_rollouts
from .tasks import load_reward


def generate_rollouts(
    cfg: Config, out_path: str, generator: Generator | None = None, *,
    version: int | None = None, round_no: int = 0,
) -> dict:
    """Sample and score ``generation.n`` completions of every prompt with ``model.path`` and
    write them, with V* per group, to the rollout file ``out_path``; return a summary.

    ``generator``: an engine to reuse (the model's weights are pushed into it); by default one
    is built for the model and closed afterwards. ``version``: the policy version to record
    (default: a checkpoint's step, else 0). ``round_no`` shifts the sampling seeds.
    """
    set_threads(cfg)
    path = model_dir(cfg.model.path, cfg)
    if version is None:
        version = checkpoint_step(cfg.model.path) if is_checkpoint(cfg.model.path) else 0
    tok = AutoTokenizer.from_pretrained(path)
    prompts = load_prompts(cfg.data, tok)
    reward_fn, reward_workers = load_reward(cfg.data)
    n = cfg.generation.n
    own = generator is None
    if own:
        generator = VLLMGenerator(path, cfg.generation, seed=cfg.seed)
    else:
        push_model(generator, path, version, wire_dtype(cfg.generation.dtype))
    try:
        seed = sampling_seed(cfg.seed, round_no * len(prompts) * n)
        if cfg.env.name:  # multi-turn: the environment scores each rollout
            rollouts, rewards, failed = sample_episodes(
                generator, cfg.env, prompts, cfg.generation, seed, TurnFormat(tok),
                cfg.data.prompts_per_step, "oapl generate")
        else:
            rollouts = sample_groups(generator, prompts, cfg.generation, seed,
                                     cfg.data.prompts_per_step, "oapl generate")
    finally:
        if own:
            generator.close()
    records = [prompts[r.prompt_index].record for r in rollouts]
    if cfg.env.name:
        texts = [tok.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
    else:
        texts, rewards, failed = score_rollouts(reward_fn, tok, rollouts, records,
                                                reward_workers)
    values = optimal_values(torch.tensor(rewards, dtype=torch.float64), group_size=n,
                            beta1=cfg.algorithm.beta1)
    rows = [
        {
            "group": i // n, "prompt_id": r.prompt_index, "sample": i % n,
            "prompt": records[i]["prompt"], "prompt_ids": r.prompt_ids,
            "completion_ids": r.completion_ids, "completion": texts[i], "logprobs": r.logprobs,
            "finish_reason": r.finish_reason, "reward": rewards[i],
            "value": float(values[i // n]), "version": version,
            "temperature": cfg.generation.temperature, "beta1": cfg.algorithm.beta1,
            **({} if r.segments is None else {
                "segments": [[a, b, version] for a, b, _ in r.segments], "status": r.status}),
        }
        for i, r in enumerate(rollouts)
    ]
    write_rollouts(out_path, rows)
    return {"rollouts": out_path, "model": path, "version": version, "rows": len(rows),
            "groups": len(prompts), "reward_mean": sum(rewards) / len(rewards),
            "reward_errors": sum(failed)}


def run_rounds(cfg: Config, rounds: int, generator: Generator | None = None) -> list[dict]:
    """``rounds`` offline rounds: round r samples ``<output_dir>/round_<r>/rollouts.parquet``
    with the latest model (the config's model, then the previous round's ``final_model``) and
    trains on it into ``round_<r>/`` (``trainer.steps`` steps). One line per round goes to
    ``<output_dir>/rounds.jsonl`` (its file, version and mean sampled reward, the trained
    model); the lines are returned. ``generator``: an engine to reuse, else one is built."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if cfg.data.rollouts is not None:
        raise ValueError("oapl rounds writes its own rollout files: leave data.rollouts unset")
    log_path = os.path.join(cfg.output_dir, "rounds.jsonl")
    if os.path.exists(log_path):
        raise ValueError(f"{cfg.output_dir} already holds rounds: pick another output_dir")
    set_threads(cfg)
    model = model_dir(cfg.model.path, cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    own = generator is None
    if own:
        generator = VLLMGenerator(model, cfg.generation, seed=cfg.seed)
    history = []
    try:
        for r in range(rounds):
            rcfg = copy.deepcopy(cfg)
            rcfg.output_dir = os.path.join(cfg.output_dir, f"round_{r}")
            rcfg.model.path = model
            version = r * cfg.trainer.steps
            gen = generate_rollouts(rcfg, os.path.join(rcfg.output_dir, "rollouts.parquet"),
                                    generator, version=version, round_no=r)
            rcfg.data.rollouts = gen["rollouts"]
            model = train(rcfg)["final_model"]
            line = {"round": r, "version": version, "rollouts": gen["rollouts"],
                    "reward_mean": gen["reward_mean"], "reward_errors": gen["reward_errors"],
                    "trained_model": model}
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            history.append(line)
    finally:
        if own:
            generator.close()
    return history
