"""Toy tasks that need no files, for the tiny built-in model (``oapl.tiny``): their records,
and every possible answer (for the tiny model's format-only warm-up). Scored by exact match.

Add one: a function returning a ``ToyTask`` and one line in ``TOY_TASKS``; it is then
``data.source: toy:<name>``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from . import ask, bits


@dataclass(frozen=True)
class ToyTask:
    """``records``: dicts with ``prompt``, ``answer`` and ``task``; ``answers``: every answer
    token, each one token of the tiny vocabulary; ``vocab``: the tiny model's tokens (None:
    ``oapl.tiny.VOCAB``); ``answer_len``: answer tokens per answer (the format warm-up's);
    ``warmup_examples(tokenizer)``: (ids, loss mask) pairs for a warm-up on whole sequences
    instead (a multi-turn task's), or None."""

    name: str
    records: list[dict]
    answers: list[str]
    vocab: tuple[str, ...] | None = None
    answer_len: int = 1
    warmup_examples: Callable | None = None


def max_task() -> ToyTask:
    """``max a b =`` -> ``max(a, b)`` over digit pairs (100 prompts; chance 0.1 when uniform).
    Learnable at toy scale (it needs comparing two positions); (a + b) mod 10 is not."""
    records = [
        {"prompt": f"max {a} {b} =", "answer": str(max(a, b)), "task": "max"}
        for a in range(10)
        for b in range(10)
    ]
    return ToyTask("max", records, [str(d) for d in range(10)])


def _bits(name: str):
    """``toy:cmp`` / ``toy:thr``: six-bit answers (``oapl.tasks.bits``, issue 18)."""
    def build() -> ToyTask:
        return ToyTask(name, bits.train_records(name), ["0", "1"], vocab=bits.VOCABS[name],
                       answer_len=bits.WIDTH)

    return build


def ask_task() -> ToyTask:
    """``max a =``, with a hidden digit h to ask for, -> ``max(a, h)``: two turns with the
    ``ask`` environment (``oapl.tasks.ask``, ``env.name: ask``)."""
    return ToyTask("ask", ask.records(), [str(d) for d in range(10)], vocab=ask.VOCAB,
                   warmup_examples=ask.warmup_examples)


TOY_TASKS = {"max": max_task, "cmp": _bits("cmp"), "thr": _bits("thr"), "ask": ask_task}


@functools.lru_cache(maxsize=None)
def toy_task(name: str) -> ToyTask:
    if name not in TOY_TASKS:
        raise ValueError(f"unknown toy task {name!r}; available: {sorted(TOY_TASKS)}")
    return TOY_TASKS[name]()
