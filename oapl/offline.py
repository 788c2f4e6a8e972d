"""Offline OAPL, as in the paper's own training: sample a rollout file with the current model,
train on the file with no generator running, repeat in rounds.

    oapl generate CONFIG [key=value ...] [-o PATH]   -> a rollout file (``oapl.rollout_file``)
    oapl train CONFIG data.rollouts=PATH             -> ``train_from_file``
    oapl rounds CONFIG rounds=N                      -> ``run_rounds``: generate, train, repeat

``generate_rollouts`` samples ``generation.n`` completions of every prompt of the data source
(after ``data.limit``), scores them, and stores V* per group (``optimal_values`` with
``algorithm.beta1``). ``train_from_file`` validates the whole file first, then takes
``trainer.steps`` optimizer steps of ``data.prompts_per_step / trainer.minibatches`` groups each,
walking the file's groups in reshuffled epochs; the loss uses the stored V*
(``oapl_loss(values=...)``), and as log pi_lag the file's log-probs (``algorithm.ref_logprobs:
sampler``) or a frozen copy of the starting model's (``recompute``, as in the paper). Outputs (metrics.jsonl,
checkpoints, final_model, curves.png, resume) are those of the online loop.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from oapl_kernels import optimal_values

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, GenerationConfig, save_config
from .data import Prompt, PromptSampler, load_prompts
from .generator import Generator, Rollout, VLLMGenerator
from .loop import _prepare_run_dir, _seed_all
from .metrics import MetricsLog, step_record
from .model_dir import checkpoint_step, is_checkpoint, model_dir, push_model
from .plot import plot_runs
from .policy import Policy
from .rewards import get_reward_fn, score_all
from .rollout_file import read_rollouts, write_rollouts
from .trainer import LocalTrainer, collate, resolve_device


def sample_groups(
    generator: Generator, prompts: Sequence[Prompt], sampling: GenerationConfig, seed: int,
    chunk: int, desc: str,
) -> list[Rollout]:
    """``sampling.n`` rollouts of every prompt, in group order, ``chunk`` prompts per engine
    call. Prompt ``i`` samples with seed ``seed + i * n`` whatever the chunking."""
    out: list[Rollout] = []
    for start in tqdm(range(0, len(prompts), chunk), desc=desc, unit="call"):
        part = prompts[start : start + chunk]
        groups = generator.generate([p.token_ids for p in part], [p.index for p in part],
                                    sampling, seed=seed + start * sampling.n)
        out += [r for g in groups for r in g]
    return out


def set_threads(cfg: Config) -> None:
    """Apply ``trainer.num_threads`` (before any torch work: with more threads than free
    cores, OpenMP threads wait on each other)."""
    if cfg.trainer.num_threads is not None:
        torch._C.set_num_threads(cfg.trainer.num_threads)  # vLLM makes torch's own a no-op


def engine_dtype(cfg: Config) -> str:
    """The dtype to load pushed weights in: the engine's, float32 for ``auto``."""
    return "float32" if cfg.generation.dtype == "auto" else cfg.generation.dtype


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
    reward_fn = get_reward_fn(cfg.data.reward, **cfg.data.reward_kwargs)
    n = cfg.generation.n
    own = generator is None
    if own:
        generator = VLLMGenerator(path, cfg.generation, seed=cfg.seed)
    else:
        push_model(generator, path, version, engine_dtype(cfg))
    try:
        seed = cfg.seed * 1_000_000_007 + round_no * len(prompts) * n
        rollouts = sample_groups(generator, prompts, cfg.generation, seed,
                                 cfg.data.prompts_per_step, "oapl generate")
    finally:
        if own:
            generator.close()
    texts = tok.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    records = [prompts[r.prompt_index].record for r in rollouts]
    rewards, failed = score_all(reward_fn, records, texts, cfg.data.score_workers)
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
        }
        for i, r in enumerate(rollouts)
    ]
    write_rollouts(out_path, rows)
    return {"rollouts": out_path, "model": path, "version": version, "rows": len(rows),
            "groups": len(prompts), "reward_mean": sum(rewards) / len(rewards),
            "reward_errors": sum(failed)}


def train_from_file(cfg: Config, trainer_cls: type = LocalTrainer) -> dict:
    """Train on the rollout file ``cfg.data.rollouts``, no generator; return a summary.
    ``trainer_cls(policy, cfg)`` builds the trainer (as in ``oapl.loop.train``).

    The file is validated in full (against ``generation.n``, ``generation.temperature``,
    ``algorithm.beta1`` and the model's vocabulary) before the run directory is touched. Each
    step's ``lag`` counts the optimizer steps taken since the start of this run: the file is
    taken to come from the starting model (as in ``oapl rounds``).
    """
    set_threads(cfg)
    path = model_dir(cfg.model.path, cfg)
    a = cfg.algorithm
    data = read_rollouts(
        cfg.data.rollouts, group_size=cfg.generation.n, temperature=cfg.generation.temperature,
        beta1=a.beta1 if a.name == "oapl" else None,
        vocab_size=AutoConfig.from_pretrained(path).vocab_size,
    )
    latest = _prepare_run_dir(cfg)
    tok = AutoTokenizer.from_pretrained(path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _seed_all(cfg.seed)
    policy = Policy.from_pretrained(path, getattr(torch, cfg.model.dtype),
                                    resolve_device(cfg.trainer.device))
    trainer = trainer_cls(policy, cfg)
    # algorithm.ref_logprobs=recompute: log pi_lag from a frozen copy of the starting model
    # (the paper's offline setup), which must have sampled every row (one version).
    trainer.freeze_reference(max(r.version for r in data.rollouts))
    G = data.group_size
    sampler = PromptSampler(data.num_groups, cfg.data.prompts_per_step // cfg.trainer.minibatches,
                            cfg.seed)
    step = 0
    if latest is not None:
        state = load_checkpoint(latest, trainer)
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
    log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"))
    log.truncate_after(step)
    bar = tqdm(total=cfg.trainer.steps, initial=step, desc="oapl train (offline)")
    while step < cfg.trainer.steps:
        rows = [g * G + j for g in sampler.next_batch() for j in range(G)]
        rollouts = [data.rollouts[i] for i in rows]
        batch = collate(rollouts, [data.rewards[i] for i in rows], pad_id)
        if data.values is not None and a.name == "oapl":
            batch.values = torch.tensor([data.values[i] for i in rows], dtype=torch.float32)
        t = time.perf_counter()
        m = trainer.train_step(batch)
        train_s = time.perf_counter() - t
        record = step_record(step + 1, batch, rollouts, m, lag=step, reward_errors=0, step_s=train_s,
                             generate_s=0.0, score_s=0.0, train_s=train_s, sync_s=0.0)
        step += 1
        log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % cfg.output.save_every == 0 or step == cfg.trainer.steps:
            state = {"step": step, "sampler": sampler.state_dict()}
            save_checkpoint(os.path.join(cfg.output_dir, "checkpoints"), trainer, state,
                            keep=cfg.output.keep_checkpoints)
    bar.close()
    final_dir = os.path.join(cfg.output_dir, "final_model")
    trainer.save_pretrained(final_dir)
    tok.save_pretrained(final_dir)
    summary = {"steps": step, "output_dir": cfg.output_dir, "rollouts": cfg.data.rollouts,
               "final_model": final_dir}
    if cfg.output.plot:
        summary["plot"] = plot_runs([cfg.output_dir], os.path.join(cfg.output_dir, "curves.png"))
    return summary


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
            model = train_from_file(rcfg)["final_model"]
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
