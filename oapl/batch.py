"""The types that flow through a run: ``Rollout`` (one sampled completion), ``ScoredBatch``
(a batch of rollouts with their rewards, as a source hands it out), ``TrainBatch`` (rollouts as
padded tensors), ``collate`` (the one to the other) and ``score_all`` (a reward function over a
batch, failures counted). The engine, the sources, the trainer, rollout files
and evaluation all import them from here.

Names: ``sampler_logprobs`` are the engine's own per-token log-probs of the tokens it sampled
(log pi_lag as the sampler computed it); ``lag_logprobs`` are the log pi_lag the loss uses,
either those same numbers or a trainer-side recomputation (``algorithm.lag_logprobs``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import torch

from .rewards import RewardFn

log = logging.getLogger(__name__)


ROLLOUT_STATUSES = ("done", "truncated", "failed")


@dataclass
class Rollout:
    """One sampled rollout: the prompt's ids, then ``completion_ids``, every token after the
    prompt. ``logprobs[j]`` is the sampler's log pi_lag(completion_ids[j] | prefix) at the
    sampling temperature (after top-k/top-p renormalization when those are set; untempered
    with ``logprobs_mode="raw_logprobs"``); ``version`` is the trainer step whose weights the
    engine held when it sampled (its first model segment's, for a multi-turn rollout).

    A multi-turn rollout (``oapl.rollout``) alternates model segments and environment
    segments: ``segments`` lists the model's as ``(start, stop, version)`` ranges of
    ``completion_ids`` with the policy version that sampled each; the tokens outside them are
    the environment's (its replies with the chat template's turn markers, tokenized once),
    with log-prob 0.0 and no loss. None: one model segment, the whole completion, at
    ``version`` (a single-turn rollout). ``status``: ``done``, ``truncated`` (a turn or token
    limit ended it) or ``failed`` (its environment broke)."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    version: int
    segments: list[tuple[int, int, int]] | None = None
    status: str = "done"

    @property
    def model_mask(self) -> list[bool]:
        """Per completion token: True where the model sampled it (the tokens the loss sees)."""
        if self.segments is None:
            return [True] * len(self.completion_ids)
        mask = [False] * len(self.completion_ids)
        for start, stop, _ in self.segments:
            mask[start:stop] = [True] * (stop - start)
        return mask

    @property
    def num_model_tokens(self) -> int:
        if self.segments is None:
            return len(self.completion_ids)
        return sum(stop - start for start, stop, _ in self.segments)


@dataclass
class ScoredBatch:
    """One batch of groups as a source hands it out (picklable: no tensors): its ``rollouts``
    (in group order; each row's ``version`` is the policy version that sampled it), their
    ``rewards``, which reward calls ``failed``, and ``values``, a precomputed V* per row (a
    rollout file's) or None. ``timings``: seconds the trainer's process spent on it
    (``generate_s``, ``score_s`` inline, ``wait_s`` when the engine runs in its own process),
    spread over the batch's minibatch steps and counted in their step time; ``metrics``: other
    per-step values added to each of its steps' records as they are (e.g. the engine's own
    timings when it runs in another process)."""

    rollouts: list[Rollout]
    rewards: list[float]
    failed: list[bool]
    values: list[float] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainBatch:
    """B rollouts as right-padded tensors; consecutive groups of G rows share a prompt.

    input_ids [B, L] int64: prompt then completion, then padding.
    attention_mask [B, L] int64: 1 on real tokens.
    loss_mask [B, L-1] bool: True where target t (= input_ids[:, t + 1]) is a completion token
    the model sampled (environment tokens of a multi-turn rollout are not).
    sampler_logprobs [B, L-1] fp32: the engine's log-prob of target t (0 off the mask).
    rewards [B] fp32; versions [B] int64: the policy version that sampled each row.
    values [B] fp32 or None: a precomputed V* per row (offline rollout files), else OAPL
    computes it from the rewards.
    lag_logprobs [B, L-1] fp32 or None: log pi_lag of target t as the loss uses it (0 off the
    mask), set when the batch is drawn (``Trainer.lag_logprobs``); None: the trainer asks
    for it at the step.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    rewards: torch.Tensor
    versions: torch.Tensor
    values: torch.Tensor | None = None
    lag_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_completion_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """Rows [start, stop), with the columns that are padding in all of them cut off."""
        length = int(self.attention_mask[start:stop].sum(dim=1).max())
        cut = {"input_ids": length, "attention_mask": length, "loss_mask": length - 1,
               "sampler_logprobs": length - 1, "lag_logprobs": length - 1}
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                t = t[start:stop, : cut[f.name]] if f.name in cut else t[start:stop]
            out[f.name] = t
        return TrainBatch(**out)

    def to(self, device: torch.device) -> "TrainBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrainBatch(**{k: v if v is None else v.to(device) for k, v in moved.items()})


def collate(rollouts: Sequence[Rollout], rewards: Sequence[float], pad_id: int,
            values: Sequence[float] | None = None) -> TrainBatch:
    """Pack rollouts (in group order), their rewards and optional V* ``values`` into a
    ``TrainBatch``."""
    if len(rollouts) != len(rewards):
        raise ValueError(f"{len(rollouts)} rollouts but {len(rewards)} rewards")
    if values is not None and len(values) != len(rollouts):
        raise ValueError(f"{len(rollouts)} rollouts but {len(values)} values")
    if not rollouts:
        raise ValueError("collate needs at least one rollout")
    B = len(rollouts)
    L = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1), dtype=torch.bool)
    lps = torch.zeros((B, L - 1), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        if len(r.logprobs) != c:
            raise ValueError(
                f"rollout {i}: {len(r.logprobs)} log-probs for {c} completion tokens"
            )
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids, dtype=torch.long)
        attn[i, : p + c] = 1
        model = torch.tensor(r.model_mask, dtype=torch.bool)
        mask[i, p - 1 : p - 1 + c] = model
        lps[i, p - 1 : p - 1 + c] = torch.tensor(r.logprobs, dtype=torch.float32) * model
    return TrainBatch(
        input_ids=ids,
        attention_mask=attn,
        loss_mask=mask,
        sampler_logprobs=lps,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        versions=torch.tensor([r.version for r in rollouts], dtype=torch.long),
        values=None if values is None else torch.tensor(values, dtype=torch.float32),
    )


def _score_one(fn: RewardFn, record: dict, completion: str) -> tuple[float, bool]:
    try:
        r = float(fn(record, completion))
        if not math.isfinite(r):
            raise ValueError(f"non-finite reward {r}")
    except Exception as exc:  # noqa: BLE001 - a reward bug must not kill the run
        log.debug("reward function failed on %r: %r", completion[:80], exc)
        return 0.0, True
    return r, False


def score_all(
    fn: RewardFn, records: Sequence[dict], completions: Sequence[str], workers: int = 1,
) -> tuple[list[float], list[bool]]:
    """Reward of each (record, completion) pair, and whether the function failed on it
    (raised, or returned a non-finite value): failures score 0.0. ``workers > 1`` scores on a
    thread pool of that size (for rewards that wait on subprocesses, such as code)."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    if workers > 1 and len(records) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pairs = list(pool.map(lambda rc: _score_one(fn, *rc), zip(records, completions)))
    else:
        pairs = [_score_one(fn, rec, text) for rec, text in zip(records, completions)]
    return [r for r, _ in pairs], [bad for _, bad in pairs]


def score_rollouts(
    fn: RewardFn, tokenizer, rollouts: Sequence[Rollout], records: Sequence[dict],
    workers: int = 1,
) -> tuple[list[str], list[float], list[bool]]:
    """Decode each rollout's completion (special tokens skipped) and score it against its
    prompt's record: (texts, rewards, failed)."""
    texts = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    rewards, failed = score_all(fn, records, texts, workers)
    return texts, rewards, failed


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS (padding is masked out everywhere)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
