"""Generic reward functions: ``fn(record, completion) -> float`` in [0, 1].

``record`` is a prompt record (``prompt`` and the task's fields: ``answer``, tests, ...);
``completion`` the decoded completion text. A task names its default scorer
(``oapl.tasks``); ``data.reward`` picks another, ``data.reward_kwargs`` its options.
``oapl.batch.score_all`` runs one over a batch (on a bounded thread pool when the reward
allows), turning exceptions into reward 0, counted as failures.

Add a reward: a function in a module of this package and one line in ``REWARDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import code
from .math import final_answer, math_answer

RewardFn = Callable[[dict, str], float]


def exact_match(record: dict, completion: str) -> float:
    """1.0 iff the stripped completion equals the stripped answer."""
    return float(completion.strip() == str(record["answer"]).strip())


@dataclass(frozen=True)
class Reward:
    """A registered reward: ``fn``; the record ``fields`` it reads (checked when the data
    loads), and ``check(record)``, which raises ValueError for a record it cannot score
    (also when the data loads); ``configure(**options) -> fn`` for one that takes options
    (checked at start);
    ``workers``: the default size of its scoring pool (``data.reward_workers``);
    ``main_thread``: it only works in the main thread (no pool)."""

    fn: RewardFn
    fields: tuple[str, ...]
    configure: Callable[..., RewardFn] | None = None
    check: Callable[[dict], None] | None = None
    workers: int = 1
    main_thread: bool = False


REWARDS: dict[str, Reward] = {
    "exact_match": Reward(exact_match, ("answer",)),
    # math-verify's own time limits use SIGALRM: main thread only.
    "math": Reward(math_answer, ("answer",), main_thread=True),
    "final_answer": Reward(final_answer, ("answer",)),
    # Its threads wait on sandboxed programs, so a batch of hung ones costs about one timeout.
    "code": Reward(code.code_reward, ("prompt",), configure=code.configure, workers=64,
                   check=code.check_record),
}


def get_reward(name: str) -> Reward:
    """The registry entry of reward ``name``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {sorted(REWARDS)}")
    return REWARDS[name]


def get_reward_fn(name: str, **options) -> RewardFn:
    """The reward ``name`` with ``options`` (``data.reward_kwargs``; only ``code`` takes any).
    ``code`` checks its sandbox here, so a run that cannot isolate programs stops at once."""
    reward = get_reward(name)
    if reward.configure is not None:
        return reward.configure(**options)
    if options:
        raise ValueError(f"data.reward_kwargs: reward {name!r} takes no options, got {options}")
    return reward.fn
