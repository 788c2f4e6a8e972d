"""Prompts from a file: ``.jsonl`` (one JSON object per line), ``.parquet``, or a Hugging Face
dataset (``datasets:<name or saved dir>``, needs the ``datasets`` package). Each row becomes a
record with ``prompt`` (from ``data.prompt_key``) and, when the row has it, ``answer`` (from
``data.answer_key``); other fields are kept. Scored by ``data.reward`` (exact match by
default; ``math``, ``final_answer`` and ``code`` are the other generic scorers).

Errors name the file and line: a line that is not JSON, a row without the prompt key, a file
that does not exist.
"""

from __future__ import annotations

import json
import os

from ..config import DataConfig


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _read_rows(cfg: DataConfig) -> list[tuple[str, dict]]:
    """(where, row) pairs: ``where`` is ``file:line`` or ``file: row i`` for error messages."""
    src = cfg.source
    if src.startswith("datasets:"):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"data.source {src!r} needs the `datasets` package") from None
        name = src[len("datasets:") :]
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            ds = ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=cfg.split)
        return [(f"{name}: row {i}", row) for i, row in enumerate(ds)]
    if not os.path.isfile(src):
        raise ValueError(f"data.source {src!r}: no such file")
    if src.endswith(".jsonl"):
        return [(f"{src}:{lineno}", row) for lineno, row in _read_jsonl(src)]
    import pyarrow.parquet as pq

    return [(f"{src}: row {i}", row) for i, row in enumerate(pq.read_table(src).to_pylist())]


def is_prompt_file(source: str) -> bool:
    return source.startswith("datasets:") or source.endswith((".jsonl", ".parquet"))


def load(cfg: DataConfig) -> list[dict]:
    """The first ``cfg.limit`` records of ``cfg.source``, with ``prompt`` / ``answer`` renamed
    from ``cfg.prompt_key`` / ``cfg.answer_key``."""
    rows = _read_rows(cfg)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    out = []
    for where, row in rows:
        if cfg.prompt_key not in row:
            raise ValueError(f"{where}: no prompt field {cfg.prompt_key!r} (fields: {list(row)})")
        rec = {k: v for k, v in row.items() if k not in (cfg.prompt_key, cfg.answer_key)}
        rec["prompt"] = str(row[cfg.prompt_key])
        if cfg.answer_key in row:
            rec["answer"] = str(row[cfg.answer_key])
        out.append(rec)
    return out
