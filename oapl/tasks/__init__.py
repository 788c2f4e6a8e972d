"""Tasks: a task owns its records and names its reward.

``data.source`` picks a task: a registered name (``TASKS``), ``toy:<name>`` (``oapl.tasks.toy``,
for the tiny model), or a prompt file (``.jsonl``, ``.parquet``, ``datasets:<name>``; see
``oapl.tasks.prompt_file``). ``data.reward`` defaults to the task's own scorer.

Add a dataset: a module here with a ``load(cfg: DataConfig) -> list[dict]`` returning records
(each with ``prompt`` and what its reward reads, e.g. ``answer``), and one line in ``TASKS``::

    TASKS = {..., "my_task": Task("my_task", my_task.load, reward="final_answer")}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import DataConfig
from ..rewards import RewardFn, get_reward, get_reward_fn
from . import humaneval, prompt_file, toy, verifiers_taskset, word_problems


@dataclass(frozen=True)
class Task:
    """``load(cfg)``: the task's records (list of dicts with ``prompt``); ``reward``: the name
    of its default scorer in ``oapl.rewards.REWARDS``, or None for a task that only its
    environment (``env.name``) scores."""

    name: str
    load: Callable[[DataConfig], list[dict]]
    reward: str | None


def _toy(name: str) -> Task:
    def load(cfg: DataConfig) -> list[dict]:
        rows = toy.toy_task(name).records
        return rows[: cfg.limit] if cfg.limit is not None else rows

    toy.toy_task(name)  # an unknown toy task fails here, listing the known ones
    return Task(f"toy:{name}", load, reward="exact_match")


TASKS: dict[str, Task] = {
    "word_problems": Task("word_problems", word_problems.load, reward="final_answer"),
    "humaneval": Task("humaneval", humaneval.load, reward="code"),
}


def get_task(source: str) -> Task:
    """The task of ``data.source``."""
    if source in TASKS:
        return TASKS[source]
    if source.startswith("toy:"):
        return _toy(source[4:])
    if prompt_file.is_prompt_file(source):
        return Task(source, prompt_file.load, reward="exact_match")
    if source.startswith(verifiers_taskset.PREFIX):
        return Task(source, verifiers_taskset.load, reward=None)
    raise ValueError(
        f"data.source {source!r}: expected one of {sorted(TASKS)}, toy:<task> (tasks: "
        f"{sorted(toy.TOY_TASKS)}), a .jsonl or .parquet file, datasets:<name or dir>, or "
        "verifiers:<taskset>"
    )


def reward_name(cfg: DataConfig) -> str | None:
    """``data.reward``, or the task's own scorer when unset (None: its environment scores
    it)."""
    return cfg.reward or get_task(cfg.source).reward


def load_reward(cfg: DataConfig) -> tuple[RewardFn | None, int]:
    """The reward function (with ``data.reward_kwargs``) and the size of its scoring pool
    (``data.reward_workers``, else the reward's default); (None, 1) for a task that only its
    environment scores."""
    name = reward_name(cfg)
    if name is None:
        return None, 1
    reward = get_reward(name)
    workers = cfg.reward_workers or reward.workers
    if reward.main_thread and workers > 1:
        raise ValueError(f"data.reward={name} needs data.reward_workers=1: it only works in "
                         "the main thread")
    return get_reward_fn(name, **cfg.reward_kwargs), workers


def read_records(cfg: DataConfig) -> list[dict]:
    """The task's records, checked to hold the fields its reward reads."""
    records = get_task(cfg.source).load(cfg)
    name = reward_name(cfg)
    if name is None:
        return records
    reward = get_reward(name)
    for i, rec in enumerate(records):
        missing = [k for k in reward.fields if k not in rec]
        if missing:
            key = cfg.answer_key if missing == ["answer"] else missing[0]
            raise ValueError(
                f"data.source {cfg.source!r}: record {i} has no field {key!r}, which reward "
                f"{reward_name(cfg)!r} needs (fields: {sorted(rec)})"
            )
        if reward.check is not None:
            try:
                reward.check(rec)
            except ValueError as exc:
                raise ValueError(f"data.source {cfg.source!r}: record {i}: {exc}") from None
    return records
