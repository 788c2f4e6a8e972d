"""The lagged loop: generate -> score -> train -> every L steps push weights to the generator.

    version = 0                       (the engine holds the trainer's initial weights)
    repeat:
        prompts <- next batch; rollouts <- generator (n per prompt, tagged with its version)
        rewards <- reward_fn(record, completion text)
        for each of `trainer.minibatches` slices: one optimizer step; step += 1
            if step % L == 0: push weights; version = step
        every `output.save_every` steps: checkpoint

A policy version is the trainer step whose weights the engine holds, so a step's ``lag`` is the
number of optimizer steps the policy took since the weights that sampled its batch (0 at L=1
with one minibatch). Between pushes the loop keeps sampling from the stale engine.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import dataclass

import torch
import yaml
from tqdm import tqdm
from transformers import AutoTokenizer

from . import tiny
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data import PromptSampler, load_prompts, toy_task
from .generator import Generator, Rollout, VLLMGenerator
from .metrics import MetricsLog, step_record
from .plot import plot_runs
from .policy import Policy
from .rewards import get_reward_fn, score_all
from .trainer import LocalTrainer, TrainBatch, collate, resolve_device

# Keys that may differ between a run and its resumption.
_RESUMABLE_CHANGES = {"resume", "trainer.steps"}
# Mean |sampler - trainer| log-prob per completion token at the same weights above which the
# loop warns (once per run). bf16 engine vs fp32 trainer measured 0.001-0.006 nats on the tiny
# model; untempered raw_logprobs at temperature 0.7 gave 0.10-0.19.
ABSDIFF_WARN = 0.05


def prepare_model(cfg: Config) -> str:
    """The model directory to train: ``cfg.model.path`` (a HF directory, or a built-in alias
    such as ``builtin:smollm2-135m-instruct`` resolved by ``oapl.model_source``), or the tiny
    model built (once, deterministically) under ``<output_dir>/base_model`` with its format
    warm-up on the toy task's prompts."""
    if cfg.model.path != "tiny":
        from .model_source import BUILTIN_PREFIX, resolve_model

        path = cfg.model.path
        return resolve_model(path) if path.startswith(BUILTIN_PREFIX) else path
    steps = cfg.model.tiny_format_warmup_steps
    prompts, answers, vocab, answer_len = [], [], None, 1
    task = toy_task(cfg.data.source[4:]) if cfg.data.source.startswith("toy:") else None
    if task is not None:
        vocab, answer_len = task.vocab, task.answer_len  # the task's vocabulary (None: VOCAB)
    if steps:
        if task is None:
            raise ValueError("model.tiny_format_warmup_steps needs a toy:<task> data.source")
        tok = tiny.build_tokenizer(vocab or tiny.VOCAB)
        prompts = [tok(cfg.data.prompt_template.format(**r))["input_ids"] for r in task.records]
        answers = task.answers
    return tiny.build_tiny_model(
        os.path.join(cfg.output_dir, "base_model"),
        seed=cfg.model.tiny_seed,
        warmup_prompts=prompts,
        warmup_answers=answers,
        warmup_steps=steps,
        vocab=vocab,
        warmup_answer_len=answer_len,
    )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "engine_kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _prepare_run_dir(cfg: Config) -> str | None:
    """Create the run directory and save ``config.yaml``; on resume, check the saved config
    matches and return the latest checkpoint (None if there is none yet)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    cfg_path = os.path.join(cfg.output_dir, "config.yaml")
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    if not cfg.resume:
        if os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl")):
            raise ValueError(
                f"{cfg.output_dir} already holds a run: pass resume=true, or another output_dir"
            )
        save_config(cfg, cfg_path)
        return None
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            saved = _flatten(yaml.safe_load(f))
        now = _flatten(cfg.to_dict())
        diff = sorted(k for k in saved.keys() | now.keys()
                      if saved.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES)
        if diff:
            raise ValueError(f"resume: config differs from {cfg_path} in {diff}")
    save_config(cfg, cfg_path)
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Batch:
    """One generated and scored batch: its rollouts (in group order), their rewards as a
    ``TrainBatch``, which reward calls failed, and how long generating and scoring took."""

    rollouts: list[Rollout]
    batch: TrainBatch
    failed: list[bool]
    generate_s: float
    score_s: float
    ref_s: float  # computing log pi_lag (the frozen reference's forward with recompute)


class _Run:
    """The state of one training run: model, data, engine, trainer, position."""

    def __init__(self, cfg: Config, generator: Generator | None, trainer_cls: type = LocalTrainer):
        self.cfg = cfg
        if cfg.trainer.num_threads is not None:
            torch._C.set_num_threads(cfg.trainer.num_threads)  # vLLM makes torch's own a no-op
        latest = _prepare_run_dir(cfg)
        model_path = prepare_model(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.prompts = load_prompts(cfg.data, tok)
        self.reward_fn = get_reward_fn(cfg.data.reward)
        self.generator = generator or VLLMGenerator(model_path, cfg.generation, seed=cfg.seed)
        _seed_all(cfg.seed)  # after the engine: building one reseeds the global RNGs
        device = resolve_device(cfg.trainer.device)
        self.policy = Policy.from_pretrained(model_path, getattr(torch, cfg.model.dtype), device)
        self.trainer = trainer_cls(self.policy, cfg)
        self.sampler = PromptSampler(len(self.prompts), cfg.data.prompts_per_step, cfg.seed)
        self.step = 0
        if latest is not None:
            state = load_checkpoint(latest, self.trainer)
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
        # The engine starts from the trainer's weights (a resumed run's, or a reused engine's).
        self.generator.load_weights(self.trainer.named_weights(), version=self.step)
        self.trainer.freeze_reference(self.step)
        self.warned_absdiff = False
        self.log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"))
        self.log.truncate_after(self.step)

    def generate_batch(self) -> _Batch:
        """Sample ``n`` completions of the next prompts from the engine as it is, and score
        them. The sampling seed depends only on the run seed and the batch number."""
        cfg = self.cfg
        idx = self.sampler.next_batch()
        batch_no = self.step // cfg.trainer.minibatches
        seed = cfg.seed * 1_000_000_007 + batch_no * len(idx) * cfg.generation.n
        t = time.perf_counter()
        groups = self.generator.generate(
            [self.prompts[i].token_ids for i in idx], idx, cfg.generation, seed=seed
        )
        generate_s = time.perf_counter() - t
        rollouts = [r for g in groups for r in g]
        t = time.perf_counter()
        texts = self.tokenizer.batch_decode(
            [r.completion_ids for r in rollouts], skip_special_tokens=True
        )
        records = [self.prompts[r.prompt_index].record for r in rollouts]
        rewards, failed = score_all(self.reward_fn, records, texts)
        score_s = time.perf_counter() - t
        batch = collate(rollouts, rewards, self.pad_id)
        t = time.perf_counter()
        batch.ref_logprobs = self.trainer.reference_logprobs(batch)  # at the sampling weights
        ref_s = time.perf_counter() - t
        return _Batch(rollouts, batch, failed, generate_s, score_s, ref_s)

    def train_step(self, b: _Batch, rows: slice) -> dict:
        """One optimizer step on rows ``rows`` of ``b``, the weight push if one is due, and
        the step's metrics record."""
        k = self.cfg.trainer.minibatches
        mb = b.batch.rows(rows.start, rows.stop)
        t = time.perf_counter()
        m = self.trainer.train_step(mb)
        train_s = time.perf_counter() - t
        lag = self.step - float(mb.versions.float().mean())
        self.step += 1
        sync_s = 0.0
        if self.step % self.cfg.algorithm.sync_every == 0:
            t = time.perf_counter()
            self.generator.load_weights(self.trainer.named_weights(), version=self.step)
            self.trainer.freeze_reference(self.step)
            sync_s = time.perf_counter() - t
        step_s = (b.generate_s + b.score_s + b.ref_s) / k + train_s + sync_s
        rollouts = b.rollouts[rows]
        return step_record(
            self.step, mb, rollouts, m, lag=lag, reward_errors=sum(b.failed[rows]), step_s=step_s,
            generate_s=b.generate_s / k, score_s=b.score_s / k, train_s=train_s, sync_s=sync_s,
            ref_s=b.ref_s / k, **self.agreement(mb, m, lag),
        )

    def agreement(self, mb: TrainBatch, m: dict, lag: float) -> dict:
        """``sampler_trainer_absdiff_mean`` / ``_max``: |log pi_vllm - log pi_trainer| per
        completion token of ``mb``, at the same weights. With ``ref_logprobs=recompute`` on
        every step (the frozen reference holds the weights that sampled the batch); with
        ``sampler`` on steps of lag 0 (the policy still holds them: the trainer's own
        forward, ``m``, gives them for free); else ``{}``. Warns once per run when the mean
        exceeds ``ABSDIFF_WARN``."""
        if self.cfg.algorithm.ref_logprobs == "recompute":
            diff = (mb.ref_logprobs - mb.inference_logprobs).abs()[mb.loss_mask]
            mean, top = float(diff.mean()), float(diff.max())
        elif lag == 0 and "sampler_absdiff_mean" in m:
            mean, top = m["sampler_absdiff_mean"], m["sampler_absdiff_max"]
        else:
            return {}
        if mean > ABSDIFF_WARN and not self.warned_absdiff:
            self.warned_absdiff = True
            g = self.cfg.generation
            warnings.warn(
                f"step {self.step}: the engine's log-probs differ from the trainer's by "
                f"{mean:.3f} nats per token on average (max {top:.3f}) at the same weights; "
                f"the engine's numerical noise is ~0.01 or less. Check generation.logprobs_mode "
                f"({g.logprobs_mode!r}; raw_logprobs are untempered, wrong at temperature "
                f"{g.temperature}), top_p/top_k (processed log-probs are renormalized over the "
                "truncated set) and the engine dtype",
                RuntimeWarning, stacklevel=2,
            )
        return {"sampler_trainer_absdiff_mean": mean, "sampler_trainer_absdiff_max": top}

    def checkpoint_due(self) -> bool:
        """At every ``save_every`` steps, and at the end where a checkpoint is possible."""
        cfg = self.cfg
        if self.step % cfg.output.save_every == 0:
            return True
        period = math.lcm(cfg.algorithm.sync_every, cfg.trainer.minibatches)
        return self.step == cfg.trainer.steps and self.step % period == 0

    def run(self) -> dict:
        cfg, k = self.cfg, self.cfg.trainer.minibatches
        bar = tqdm(total=cfg.trainer.steps, initial=self.step, desc="oapl train")
        rewards: list[float] = []
        while self.step < cfg.trainer.steps:
            b = self.generate_batch()
            per = len(b.batch) // k
            for j in range(k):
                record = self.train_step(b, slice(j * per, (j + 1) * per))
                self.log.write(record)
                rewards.append(record["reward_mean"])
                bar.update(1)
                bar.set_postfix(reward10=f"{sum(rewards[-10:]) / len(rewards[-10:]):.3f}",
                                lag=f"{record['lag']:.0f}", loss=f"{record['loss']:.4f}")
            if self.checkpoint_due():
                state = {"step": self.step, "sampler": self.sampler.state_dict()}
                root = os.path.join(cfg.output_dir, "checkpoints")
                save_checkpoint(root, self.trainer, state, keep=cfg.output.keep_checkpoints)
        bar.close()
        final_dir = os.path.join(cfg.output_dir, "final_model")
        self.trainer.save_pretrained(final_dir)
        self.tokenizer.save_pretrained(final_dir)
        summary = {"steps": self.step, "output_dir": cfg.output_dir}
        if cfg.output.plot:
            png = os.path.join(cfg.output_dir, "curves.png")
            summary["plot"] = plot_runs([cfg.output_dir], png)
        return summary


def train(cfg: Config, generator: Generator | None = None,
          trainer_cls: type = LocalTrainer) -> dict:
    """Run (or resume) the training run ``cfg``; return a summary dict.

    ``generator``: an engine to reuse (the trainer's weights are pushed into it at the start);
    by default a ``VLLMGenerator`` is built for the model. ``trainer_cls(policy, cfg)``: the
    trainer (``oapl.fsdp_trainer.FSDPTrainer`` under torchrun, see ``oapl.distributed``).
    With ``data.rollouts`` set, trains offline on that rollout file instead, with no
    generator (``oapl.offline.train_from_file``).
    """
    if cfg.data.rollouts is not None:
        from .offline import train_from_file

        return train_from_file(cfg, trainer_cls)
    return _Run(cfg, generator, trainer_cls).run()
