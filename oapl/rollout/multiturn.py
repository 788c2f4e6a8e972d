"""Multi-turn rollouts: the engine and an environment take turns until the environment says
the rollout is over or a limit cuts it.

    turn 1: one engine call for all prompts, ``generation.n`` samples each (exactly the
            single-turn call: same prompts, seeds and results)
    repeat: every live conversation's environment step runs in a thread pool; the replies
            back together (within ``env.gather_s`` of the first) are tokenized once
            (``TurnFormat``) and appended to the exact ids; all of those conversations then
            take their next turn in ONE engine call (one sample each)

A conversation's turn ``t >= 1`` samples with seed ``seed + t * 2**32 + k`` (``k``: its row),
whatever else shares the call, so which conversations go together never changes the samples.
Limits per rollout: ``env.max_turns`` model turns, ``env.max_tokens`` tokens after the prompt
(model and environment), the engine's ``max_model_len``, ``env.max_reply_tokens`` per reply.
A rollout that reaches one is ``truncated`` and keeps the reward its environment last gave
(a model turn cut by a limit is still shown to the environment once, for its score). One whose
environment raises, returns something that is not a ``Step`` with a text reply and a finite
reward, or does not answer within ``env.step_timeout_s``, is ``failed`` with reward 0; both
are counted (``env_failures``, ``env_truncated``) and the batch goes on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from ..batch import Rollout
from ..config import EnvConfig, GenerationConfig
from ..envs import Message, Step, env_class
from ..prompts import Prompt
from .pool import StepPool
from .turns import TurnFormat

TURN_SEED_STRIDE = 2**32
# The batch's metrics that are counts and seconds (the others are means over rollouts).
_COUNTS = ("env_failures", "env_truncated", "env_reply_cut", "engine_calls")
_SECONDS = ("generate_s", "env_s")


@dataclasses.dataclass
class Episodes:
    """A batch of finished rollouts (group order), their rewards, which ones ``failed``
    (their environment broke) and the batch's metrics (floats)."""

    rollouts: list[Rollout]
    rewards: list[float]
    failed: list[bool]
    metrics: dict[str, float]


class _Conversation:
    """One rollout in progress (touched by the driver's thread only, except ``env``, which
    its own step job builds)."""

    def __init__(self, row: int, rollout: Rollout, record: dict):
        self.row, self.rollout, self.record = row, rollout, record
        self.env = None
        self.messages: list[Message] = []
        self.turns = 1
        self.reward = 0.0
        self.said: Message | None = None  # the model's last turn, as the environment saw it
        self.last_cut = False  # the last model turn was cut (no EOS, or a token limit)

    def context(self) -> list[int]:
        return self.rollout.prompt_ids + self.rollout.completion_ids


def _as_step(out) -> Step:
    """The environment's answer checked: a ``Step`` (or a (reply, reward, done) tuple) with a
    finite reward and, unless done, a text reply."""
    if isinstance(out, tuple) and len(out) == 3:
        out = Step(*out)
    if not isinstance(out, Step):
        raise TypeError(f"step returned {type(out).__name__}, not a Step")
    reward = out.reward
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(
            reward):
        raise TypeError(f"reward {reward!r} is not a finite number")
    if not isinstance(out.done, bool):
        raise TypeError(f"done {out.done!r} is not a bool")
    reply = out.reply
    if not out.done:
        if isinstance(reply, str):
            reply = {"role": "user", "content": reply}
        if not (isinstance(reply, dict) and isinstance(reply.get("content"), str)
                and isinstance(reply.get("role", "user"), str)):
            raise TypeError(f"reply {reply!r} is not text or a message with text content")
        reply = {"role": reply.get("role", "user"), "content": reply["content"]}
    return Step(reply, float(reward), out.done)


def run_episodes(generator, env_cls: type, cfg: EnvConfig, prompts: Sequence[Prompt],
                 sampling: GenerationConfig, seed: int, fmt: TurnFormat,
                 max_model_len: int) -> Episodes:
    """``sampling.n`` multi-turn rollouts of each prompt with environments ``env_cls(
    **cfg.kwargs)`` (one per rollout), sampled by ``generator`` (a ``Generator``; turns after
    the first use its ``seeds=`` argument)."""
    t0 = time.perf_counter()
    groups = generator.generate([p.token_ids for p in prompts], [p.index for p in prompts],
                                sampling, seed=seed)
    generate_s = time.perf_counter() - t0
    convs: list[_Conversation] = []
    for p, group in zip(prompts, groups):
        for r in group:
            convs.append(_Conversation(len(convs), r, p.record))
    counts = {**dict.fromkeys(_COUNTS, 0), "engine_calls": 1}
    failed = [False] * len(convs)
    pool = StepPool(cfg.workers, cfg.step_timeout_s)
    one = dataclasses.replace(sampling, n=1)

    def budget(c: _Conversation) -> int:
        room = max_model_len - len(c.rollout.prompt_ids)
        return min(room, cfg.max_tokens) if cfg.max_tokens is not None else room

    def add_model_turn(c: _Conversation, ids: list[int], lps: list[float], finish: str,
                       version: int) -> None:
        r = c.rollout
        keep = min(len(ids), budget(c) - len(r.completion_ids))
        start = len(r.completion_ids)
        r.completion_ids += list(ids[:keep])
        r.logprobs += list(lps[:keep])
        r.segments.append((start, start + keep, version))
        r.finish_reason = finish
        c.last_cut = keep < len(ids) or finish != "stop"

    def submit(c: _Conversation) -> None:
        """Show the environment the model's last turn (the first job also builds and resets
        it): the job returns (reset's messages or None, the checked step)."""
        start, stop, _ = c.rollout.segments[-1]
        said = {"role": "assistant", "content": fmt.text(c.rollout.completion_ids[start:stop])}
        history, first = list(c.messages), c.env is None

        def job() -> tuple[list[Message] | None, Step]:
            msgs = None
            if first:
                c.env = env_cls(**cfg.kwargs)
                msgs = c.env.reset(c.record)
                if not (isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs)):
                    raise TypeError(f"reset returned {msgs!r}, not a list of messages")
            return msgs, _as_step(c.env.step([*(msgs or history), said]))

        c.said = said
        pool.submit(c.row, job)

    def finish(c: _Conversation, status: str) -> None:
        c.rollout.status = status
        if status == "truncated":
            counts["env_truncated"] += 1
            c.rollout.finish_reason = "length"
        elif status == "failed":
            counts["env_failures"] += 1
            failed[c.row] = True
            c.reward = 0.0

    for c in convs:
        r = c.rollout
        ids, lps = r.completion_ids, r.logprobs
        r.completion_ids, r.logprobs, r.segments = [], [], []
        add_model_turn(c, ids, lps, r.finish_reason, r.version)
        submit(c)
    env_s = 0.0
    while pool.busy():
        t = time.perf_counter()
        answered = pool.collect(cfg.gather_s)
        env_s += time.perf_counter() - t
        ready = []
        for row, ok, value in answered:
            c = convs[row]
            if not ok:
                finish(c, "failed")
                continue
            reset, step = value
            if reset is not None:
                c.messages = list(reset)
            c.messages.append(c.said)
            c.reward = step.reward
            if step.done:
                finish(c, "done")
                continue
            if c.last_cut or c.turns >= cfg.max_turns:
                finish(c, "truncated")
                continue
            reply, cut = fmt.reply_ids(step.reply, cfg.max_reply_tokens)
            counts["env_reply_cut"] += cut
            r = c.rollout
            if len(r.completion_ids) + len(reply) >= budget(c):  # no room for a model token
                finish(c, "truncated")
                continue
            r.completion_ids += reply
            r.logprobs += [0.0] * len(reply)
            c.messages.append(step.reply)
            ready.append(c)
        if not ready:
            continue
        t = time.perf_counter()
        outs = generator.generate(
            [c.context() for c in ready], [c.rollout.prompt_index for c in ready], one,
            seed=seed, seeds=[seed + c.turns * TURN_SEED_STRIDE + c.row for c in ready])
        generate_s += time.perf_counter() - t
        counts["engine_calls"] += 1
        for c, (sample,) in zip(ready, outs):
            c.turns += 1
            add_model_turn(c, sample.completion_ids, sample.logprobs, sample.finish_reason,
                           sample.version)
            submit(c)
    rollouts = [c.rollout for c in convs]
    n = len(convs)
    metrics = {**{k: float(v) for k, v in counts.items()},
               "turns_mean": sum(c.turns for c in convs) / n,
               "multi_turn_frac": sum(c.turns > 1 for c in convs) / n,
               "model_tokens_mean": sum(r.num_model_tokens for r in rollouts) / n,
               "env_tokens_mean": sum(len(r.completion_ids) - r.num_model_tokens
                                      for r in rollouts) / n,
               "generate_s": generate_s, "env_s": env_s}
    return Episodes(rollouts, [c.reward for c in convs], failed, metrics)


def merge_episodes(parts: Sequence[Episodes]) -> Episodes:
    """Batches run side by side (a batch's shares on several servers) as one, in order:
    counts summed, means weighted by rollouts, seconds the longest (they overlapped)."""
    rollouts = [r for p in parts for r in p.rollouts]
    metrics = {}
    for key in parts[0].metrics:
        values = [p.metrics[key] for p in parts]
        if key in _COUNTS:
            metrics[key] = sum(values)
        elif key in _SECONDS:
            metrics[key] = max(values)
        else:
            metrics[key] = sum(v * len(p.rollouts) for v, p in zip(values, parts)) / len(rollouts)
    return Episodes(rollouts, [x for p in parts for x in p.rewards],
                    [x for p in parts for x in p.failed], metrics)


def sample_episodes(generator, cfg: EnvConfig, prompts: Sequence[Prompt],
                    sampling: GenerationConfig, seed: int, fmt: TurnFormat, chunk: int,
                    desc: str) -> tuple[list[Rollout], list[float], list[bool]]:
    """Multi-turn rollouts of every prompt with the environment ``cfg.name`` (rollouts,
    rewards, failed; group order), ``chunk`` prompts per ``run_episodes`` batch, with a
    progress bar; the batch from prompt ``start`` samples with seed ``seed + start *
    sampling.n`` (its turn 1 draws what ``sample_groups`` draws). For ``oapl eval`` and
    ``oapl generate``."""
    from tqdm import tqdm

    env_cls = env_class(cfg.name)
    rollouts, rewards, failed = [], [], []
    for start in tqdm(range(0, len(prompts), chunk), desc=desc, unit="batch"):
        ep = run_episodes(generator, env_cls, cfg, prompts[start:start + chunk], sampling,
                          seed + start * sampling.n, fmt, sampling.max_model_len)
        rollouts += ep.rollouts
        rewards += ep.rewards
        failed += ep.failed
    return rollouts, rewards, failed
