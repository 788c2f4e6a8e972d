"""Generic reward functions: ``fn(record, completion) -> float`` in [0, 1].

``record`` is a prompt record (``prompt`` and the task's fields: ``answer``, tests, ...);
``completion`` the decoded completion text. A task names its default scorer
(``oapl.tasks``); ``data.reward`` picks another. ``oapl.batch.score_all`` runs one over a
batch, turning exceptions into reward 0, counted as failures.

Add a reward: a function in a module of this package and one line in ``REWARDS`` (with the
record fields it needs).
"""

from __future__ import annotations

from collections.abc import Callable

from .math import final_answer, math_answer

RewardFn = Callable[[dict, str], float]


def exact_match(record: dict, completion: str) -> float:
    """1.0 iff the stripped completion equals the stripped answer."""
    return float(completion.strip() == str(record["answer"]).strip())


# name -> (function, the record fields it reads besides the completion)
REWARDS: dict[str, tuple[RewardFn, tuple[str, ...]]] = {
    "exact_match": (exact_match, ("answer",)),
    "math": (math_answer, ("answer",)),
    "final_answer": (final_answer, ("answer",)),
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as ``name``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {sorted(REWARDS)}")
    return REWARDS[name][0]


def required_fields(name: str) -> tuple[str, ...]:
    """The record fields reward ``name`` reads."""
    get_reward_fn(name)
    return REWARDS[name][1]
