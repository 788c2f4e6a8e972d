"""Reward functions: ``fn(record, completion) -> float`` in [0, 1].

``record`` is a prompt record (``prompt``, ``answer``, source fields); ``completion`` the
decoded completion text. ``score_all`` runs a function over a batch and turns any exception
into reward 0, flagged as failed (the loop counts them), so one bad sample never kills a run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from .data import toy_task

RewardFn = Callable[[dict, str], float]
log = logging.getLogger(__name__)


def exact_match(record: dict, completion: str) -> float:
    """1.0 iff the stripped completion equals the stripped answer."""
    return float(completion.strip() == str(record["answer"]).strip())


def math_answer(record: dict, completion: str) -> float:
    """1.0 iff math-verify finds the completion's final answer equal to the gold answer
    (e.g. ``\\frac{1}{2}`` and ``0.5``; ``\\boxed{...}`` is preferred when present).
    Runs math-verify's own time limits, which need the main thread (they use SIGALRM)."""
    from math_verify import parse, verify

    gold = parse(str(record["answer"]))
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {record['answer']!r}")
    return float(verify(gold, parse(completion)))


def word_problems(record: dict, completion: str) -> float:
    """``oapl.word_problems.score``: the completion's final answer (the last ``\\boxed{}``,
    else the last number) equal to the gold one by math-verify; works in any thread."""
    from .word_problems import score

    return score(completion, str(record["answer"]))


def toy(record: dict, completion: str) -> float:
    """The checker of the record's built-in toy task (``record["task"]``)."""
    return toy_task(record["task"]).score(record, completion)


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match, "math": math_answer, "toy": toy, "word_problems": word_problems,
}


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {sorted(REWARDS)}")
    return REWARDS[name]


def score_all(
    fn: RewardFn, records: Sequence[dict], completions: Sequence[str]
) -> tuple[list[float], list[bool]]:
    """Reward of each (record, completion) pair, and whether the function failed on it
    (raised, or returned a non-finite value): failures score 0.0."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    rewards, failed = [], []
    for rec, text in zip(records, completions):
        try:
            r = float(fn(rec, text))
            if not math.isfinite(r):
                raise ValueError(f"non-finite reward {r}")
        except Exception as exc:  # noqa: BLE001 - a reward bug must not kill the run
            log.debug("reward function failed on %r: %r", text[:80], exc)
            r, bad = 0.0, True
        else:
            bad = False
        rewards.append(r)
        failed.append(bad)
    return rewards, failed
