"""The one step loop, over a batch source (``oapl.sources``):

    source <- make_source(cfg)        (an engine inline or in its worker process, or a file)
    push the trainer's weights        (as version `step`, if the source needs them)
    repeat until trainer.steps:
        scored <- source.next_batch() (rows tagged with the version that sampled them)
        batch <- collate(scored)      (once, here)
        log pi_lag of the batch       (the sampler's, or recomputed by a frozen copy)
        for each of `trainer.minibatches` slices: one optimizer step; step += 1
            if step % L == 0: push    (source.push(weights, step) if the source needs that
                                       version; the trainer freezes it as pi_lag)
            metrics -> loggers
        every `output.save_every` steps: checkpoint (trainer, RNGs, the source's position)
    final_model, curves.png

The loop owns every push: a source takes weights and hands out scored rollouts, and never
sees the trainer. A policy version is the trainer step whose weights the sampler held, so a
step's ``lag`` is the number of optimizer steps the policy took since the weights that sampled
its rows (0 at L=1 with one minibatch). Online training, offline training on a rollout file,
each round of ``oapl rounds`` and the rank-0 process under torchrun all run this loop.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from .batch import ScoredBatch, TrainBatch, collate, pad_token_id
from .config import Config
from .engine.adapter import metered
from .engine.generator import Generator
from .engine.transport import wire_dtype
from .metrics import step_record
from .model_dir import hf_weights, model_dir
from .run import Loggers, check_run_dir, export_final, open_run_dir, seed_all, set_threads
from .sources import BatchSource, make_source
from .sources.schedule import sampling_version
from .training.checkpoint import load_checkpoint, save_checkpoint
from .training.policy import Policy
from .training.trainer import LocalTrainer, Trainer, resolve_device

# Mean |sampler - trainer| log-prob per completion token at the same weights above which the
# loop warns (once per run). bf16 engine vs fp32 trainer measured 0.001-0.006 nats on the tiny
# model; untempered raw_logprobs at temperature 0.7 gave 0.10-0.19.
MISMATCH_WARN = 0.05


class _Loop:
    """The state of one run: config, trainer, source, loggers, position; ``pad_id``: the
    tokenizer's padding id, for collating."""

    def __init__(self, cfg: Config, trainer: Trainer, source: BatchSource, step: int,
                 pad_id: int):
        self.cfg, self.trainer, self.source, self.step = cfg, trainer, source, step
        self.pad_id = pad_id
        self.loggers = Loggers(cfg, step)
        self.warned_mismatch = False

    def start(self) -> None:
        """Start the source at this step and give its sampler the weights it starts from: the
        trainer's, or a fixed model's as pi_lag (a rollout file's sampler)."""
        self.source.start(self.step)
        if self.source.fixed_sampler is not None:  # the starting model, even on resume
            self.trainer.freeze_lag_policy(
                0, hf_weights(self.source.fixed_sampler, getattr(torch, self.cfg.model.dtype)))
        else:
            self.push()

    def push(self) -> tuple[float, int]:
        """The trainer's weights (``push_weights``: with ``model.lora`` the adapter) to the
        source as version ``step``, if it needs them, and the trainer's frozen pi_lag with
        them; the seconds the push itself took and the bytes it moved (in the wire dtype)."""
        if not self.source.needs(self.step):
            return 0.0, 0
        t = time.perf_counter()
        weights, moved = metered(self.trainer.push_weights(), wire_dtype(self.cfg.generation.dtype))
        self.source.push(weights, self.step)
        push_s = time.perf_counter() - t
        self.trainer.freeze_lag_policy(self.step)
        return push_s, moved()

    def train_minibatch(self, b: ScoredBatch, train: TrainBatch, rows: slice) -> dict:
        """One optimizer step on rows ``rows`` of ``train`` (collated from ``b``), the push if
        one is due, and the step's metrics record."""
        k = self.cfg.trainer.minibatches
        mb = train.rows(rows.start, rows.stop)
        t = time.perf_counter()
        m = self.trainer.train_step(mb)
        train_s = time.perf_counter() - t
        lag = self.step - float(mb.versions.float().mean())
        self.step += 1
        sync_s = push_s = 0.0
        push_bytes = 0
        if self.step % self.cfg.algorithm.sync_every == 0:
            t = time.perf_counter()
            push_s, push_bytes = self.push()
            sync_s = time.perf_counter() - t
        timings = {"generate_s": 0.0, "score_s": 0.0, "lag_logprobs_s": 0.0,
                   **{key: v / k for key, v in b.timings.items()}}
        step_s = sum(timings.values()) + train_s + sync_s
        extra = {**timings, "train_s": train_s, "sync_s": sync_s, "push_s": push_s,
                 "push_bytes": push_bytes,
                 "lag_max": self.step - 1 - int(mb.versions.min()), **b.metrics,
                 **self.mismatch(mb, m, lag)}
        if "wait_s" in timings:
            extra["trainer_idle_frac"] = timings["wait_s"] / step_s
        return step_record(self.step, mb, b.rollouts[rows], m, lag=lag,
                           reward_errors=sum(b.failed[rows]), step_s=step_s, **extra)

    def mismatch(self, mb, m: dict, lag: float) -> dict:
        """``sampler_mismatch_mean`` / ``_max``: |sampler - trainer| log-prob per completion
        token of ``mb`` at the same weights, and the trainer's ``sampler_gap_*`` (signed, per
        sequence and token) and ``lag_loss_*`` / ``lag_residual_abs_*`` (the step's loss with
        either log pi_lag). With ``lag_logprobs=recompute`` on every step (the frozen copy
        holds the weights that sampled the batch); with ``sampler`` on steps of lag 0 (the
        policy still holds them: the trainer's own forward gives them for free); else ``{}``.
        Warns once per run when the mean exceeds ``MISMATCH_WARN``."""
        if self.cfg.algorithm.lag_logprobs == "recompute":
            diff = (mb.lag_logprobs - mb.sampler_logprobs).abs()[mb.loss_mask]
            mean, top = float(diff.mean()), float(diff.max())
        elif lag == 0:
            mean, top = m["token_logratio_abs_mean"], m["token_logratio_abs_max"]
        else:
            return {}
        gaps = {k: v for k, v in m.items() if k.startswith(("sampler_gap_", "lag_loss_",
                                                             "lag_residual_abs_"))}
        if mean > MISMATCH_WARN and not self.warned_mismatch:
            self.warned_mismatch = True
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
        return {"sampler_mismatch_mean": mean, "sampler_mismatch_max": top, **gaps}

    def release_lag_policies(self) -> None:
        """After a batch is drawn: drop the trainer's frozen pi_lag copies that no batch still
        to come was sampled by. An engine's batches follow the fixed schedule
        (``sampling_version``, inline too), so the next batch's version is the oldest needed;
        a fixed sampler's one copy stays."""
        if self.source.fixed_sampler is None:
            k, g = self.cfg.trainer.minibatches, self.cfg.generation
            self.trainer.release_lag_policies(
                sampling_version(self.step // k + 1, g.ahead, k, self.cfg.algorithm.sync_every))

    def checkpoint_due(self) -> bool:
        """At every ``save_every`` steps, and at the end where the sampler holds the trainer's
        weights between batches (a multiple of lcm(sync_every, minibatches))."""
        cfg = self.cfg
        if self.step % cfg.output.save_every == 0:
            return True
        period = math.lcm(cfg.algorithm.sync_every, cfg.trainer.minibatches)
        return self.step == cfg.trainer.steps and self.step % period == 0

    def run(self) -> dict:
        """Train to ``trainer.steps``; the mean reward of the first and last 10 steps run."""
        cfg = self.cfg
        rewards: list[float] = []
        # "with": a failure closes the bar first, so its one-line error starts a new row.
        with tqdm(total=cfg.trainer.steps, initial=self.step, desc="oapl train") as bar:
            while self.step < cfg.trainer.steps:
                self.train_batch(bar, rewards)
        self.loggers.close()
        if not rewards:
            return {}
        return {"reward_first10": sum(rewards[:10]) / len(rewards[:10]),
                "reward_last10": sum(rewards[-10:]) / len(rewards[-10:])}

    def train_batch(self, bar, rewards: list[float]) -> None:
        """The source's next batch: its minibatch steps (each step's mean reward appended to
        ``rewards``, ``bar`` advanced), then a checkpoint if one is due."""
        cfg, k = self.cfg, self.cfg.trainer.minibatches
        b = self.source.next_batch()
        train = collate(b.rollouts, b.rewards, self.pad_id, values=b.values)
        t = time.perf_counter()
        train.lag_logprobs = self.trainer.lag_logprobs(train)  # at the sampling weights
        self.release_lag_policies()
        b.timings["lag_logprobs_s"] = time.perf_counter() - t
        per = len(train) // k
        for j in range(k):
            record = self.train_minibatch(b, train, slice(j * per, (j + 1) * per))
            self.loggers.write(record)
            rewards.append(record["reward_mean"])
            bar.update(1)
            bar.set_postfix(reward10=f"{sum(rewards[-10:]) / len(rewards[-10:]):.3f}",
                            lag=f"{record['lag']:.0f}", loss=f"{record['loss']:.4f}")
        if self.checkpoint_due():
            root = os.path.join(cfg.output_dir, "checkpoints")
            save_checkpoint(root, self.trainer, {"step": self.step},
                            keep=cfg.output.keep_checkpoints,
                            source_state=self.source.state_dict())


def train(cfg: Config, generator: Generator | None = None,
          trainer_cls: type = LocalTrainer, engine_process: bool = False) -> dict:
    """Run (or resume) the training run ``cfg``; return a summary dict.

    ``generator``: an engine to sample with (the trainer's weights are pushed into it at the
    start); by default the source builds one, in this process, or in its worker process with
    ``generation.ahead >= 1`` or ``engine_process``. ``trainer_cls(policy, cfg)``: the trainer
    (``oapl.training.fsdp_trainer.FSDPTrainer`` under torchrun, see ``oapl.distributed``).
    With ``data.rollouts`` set, the batches come from that rollout file and no engine runs.
    """
    set_threads(cfg)
    check_run_dir(cfg)  # before any slow work
    path = model_dir(cfg.model.path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Validates a rollout file in full; an engine process builds while the trainer loads.
    source = make_source(cfg, path, tokenizer, generator, engine_process)
    try:
        latest = open_run_dir(cfg)
        seed_all(cfg.seed)  # after the engine: building one reseeds the global RNGs
        policy = Policy.from_pretrained(path, getattr(torch, cfg.model.dtype),
                                        resolve_device(cfg.trainer.device), cfg.model.lora)
        trainer = trainer_cls(policy, cfg)
        step = 0
        if latest is not None:
            state = load_checkpoint(latest, trainer)
            step = state["step"]
            source.load_state_dict(state["source"])
        loop = _Loop(cfg, trainer, source, step, pad_token_id(tokenizer))
        loop.start()
        rewards = loop.run()
        return {"steps": cfg.trainer.steps, **rewards, **export_final(cfg, trainer, tokenizer)}
    finally:
        source.close()
