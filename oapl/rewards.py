"""Reward functions: ``fn(record, completion) -> float`` in [0, 1].

``record`` is a prompt record (``prompt``, ``answer``, source fields); ``completion`` the
decoded completion text. ``score_all`` runs a function over a batch (on a bounded thread pool
when asked) and turns any exception into reward 0, flagged as failed (the loop counts them),
so one bad sample never kills a run. ``code`` (``oapl.code_reward``) runs the program in the
completion against the record's tests in a sandbox.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from . import code_reward
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
    "code": code_reward.code_reward, "exact_match": exact_match, "math": math_answer,
    "toy": toy, "word_problems": word_problems,
}


def get_reward_fn(name: str, **options) -> RewardFn:
    """The reward ``name`` with ``options`` (``data.reward_kwargs``; only ``code`` takes any).
    ``code`` checks its sandbox here, so a run that cannot isolate programs stops at once."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {sorted(REWARDS)}")
    if name == "code":
        return code_reward.configure(**options)
    if options:
        raise ValueError(f"data.reward_kwargs: reward {name!r} takes no options, got {options}")
    return REWARDS[name]


def score_all(
    fn: RewardFn, records: Sequence[dict], completions: Sequence[str], workers: int = 1
) -> tuple[list[float], list[bool]]:
    """Reward of each (record, completion) pair, and whether the function failed on it
    (raised, or returned a non-finite value): failures score 0.0. With ``workers`` > 1 the
    pairs are scored on a pool of that many threads."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    pairs = list(zip(records, completions))
    if workers > 1 and len(pairs) > 1:
        with ThreadPoolExecutor(min(workers, len(pairs)), thread_name_prefix="reward") as pool:
            scored = list(pool.map(lambda pair: _score_one(fn, *pair), pairs))
    else:
        scored = [_score_one(fn, rec, text) for rec, text in pairs]
    return [r for r, _ in scored], [bad for _, bad in scored]


def _score_one(fn: RewardFn, record: dict, completion: str) -> tuple[float, bool]:
    """(reward, failed) of one pair; a raising or non-finite reward is (0.0, True)."""
    try:
        r = float(fn(record, completion))
        if not math.isfinite(r):
            raise ValueError(f"non-finite reward {r}")
    except Exception as exc:  # noqa: BLE001 - a reward bug must not kill the run
        log.debug("reward function failed on %r: %r", completion[:80], exc)
        return 0.0, True
    return r, False
