"""Rollout files: sampled groups on disk, for offline training (``oapl generate`` writes them,
``oapl train ... data.rollouts=PATH`` reads them).

One row per completion, a ``.parquet`` (pyarrow) or ``.jsonl`` file by extension. Rows of a
group (the ``n`` completions of one prompt) are consecutive and share ``group``.

Required columns:

- ``group`` (int): the group's index; a group's rows are consecutive;
- ``prompt_ids`` (list[int]): the prompt's token ids, the same in all rows of a group;
- ``completion_ids`` (list[int]): the completion's token ids;
- ``logprobs`` (list[float]): the sampler's log pi_lag of each completion token, at ``temperature``;
- ``reward`` (float): finite.

Optional columns:

- ``value`` (float): V* of the group (``optimal_values`` with ``beta1``), equal within a
  group; without the column, training computes V* from the rewards;
- ``version`` (int): the policy version (trainer step) that sampled the row (default 0);
- ``temperature``, ``beta1`` (float): the sampling temperature and V*'s beta1; when present
  they must equal the training config's ``generation.temperature`` / ``algorithm.beta1``;
- ``prompt_id`` (int, the prompt's index in the data source), ``sample`` (int, the index in
  the group), ``prompt`` and ``completion`` (text), ``finish_reason`` (vLLM's; ``length`` =
  cut at ``max_tokens``);
- ``file_version`` (int): the format's version, ``FILE_VERSION`` (2) in every row
  ``write_rollouts`` writes; a file without it is version 1 (single-turn); another version is
  refused with the versions this reader knows;
- version 2, multi-turn rollouts (``oapl.batch.Rollout``): ``segments`` (list of
  ``[start, stop, version]``: the model's segments of ``completion_ids``, sorted, disjoint; the
  other tokens are the environment's, outside the loss; absent or null: one model segment) and
  ``status`` (``done``, ``truncated`` or ``failed``).

``read_rollouts`` validates the whole file before returning anything, and raises
``RolloutFileError`` (a ``ValueError``) naming the first bad row and column.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..batch import ROLLOUT_STATUSES, Rollout

FILE_VERSION = 2  # 1: single-turn rollouts; 2: adds segments and status (multi-turn)
REQUIRED = ("group", "prompt_ids", "completion_ids", "logprobs", "reward")
_INT_COLUMNS = ("group", "version", "prompt_id", "sample", "file_version")
_FLOAT_COLUMNS = ("reward", "value", "temperature", "beta1")
_STR_COLUMNS = ("prompt", "completion", "finish_reason", "status")
_V2_COLUMNS = ("segments", "status")


class RolloutFileError(ValueError):
    """A rollout file that cannot be trained on; the message names the row and column."""


@dataclass
class RolloutData:
    """A validated rollout file: ``rollouts`` in group order (``group_size`` rows per group),
    each row's ``rewards``, and the stored V* per row (``values``; None without the column)."""

    rollouts: list[Rollout]
    rewards: list[float]
    values: list[float] | None
    group_size: int

    @property
    def num_groups(self) -> int:
        return len(self.rollouts) // self.group_size


def _check_format(path: str) -> str:
    ext = os.path.splitext(path)[1]
    if ext not in (".parquet", ".jsonl"):
        raise RolloutFileError(f"{path}: a rollout file must end in .parquet or .jsonl")
    return ext


def write_rollouts(path: str, rows: Sequence[dict]) -> str:
    """Write ``rows`` (dicts with the columns above) to ``path`` (.parquet or .jsonl),
    atomically: a temporary file renamed into place, each row tagged with ``file_version``.
    Returns ``path``."""
    ext = _check_format(path)
    if not rows:
        raise RolloutFileError(f"{path}: no rows to write")
    rows = [{**row, "file_version": FILE_VERSION} for row in rows]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if ext == ".jsonl":
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"prompt_ids": pa.list_(pa.int64()), "completion_ids": pa.list_(pa.int64()),
                 "logprobs": pa.list_(pa.float32()), "segments": pa.list_(pa.list_(pa.int64()))}
        types.update({c: pa.int64() for c in _INT_COLUMNS})
        types.update({c: pa.float64() for c in _FLOAT_COLUMNS})
        types.update({c: pa.string() for c in _STR_COLUMNS})
        names = list(rows[0])
        unknown = [n for n in names if n not in types]
        if unknown:
            raise RolloutFileError(f"{path}: unknown columns {unknown}")
        schema = pa.schema([(n, types[n]) for n in names])
        pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), tmp)
    os.replace(tmp, path)
    return path


def _load_columns(path: str) -> tuple[dict[str, list], int]:
    """The file as ``{column: values}`` and its row count; a jsonl column must be present in
    every row or in none."""
    if _check_format(path) == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return {name: table.column(name).to_pylist() for name in table.column_names}, table.num_rows
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RolloutFileError(f"{path}: line {i + 1} is not JSON: {e}") from None
    if not rows:
        return {}, 0
    columns = {name: [] for name in rows[0]}
    for i, row in enumerate(rows):
        for name in columns:
            if name not in row:
                raise RolloutFileError(f"{path}: row {i}: column {name!r} is missing")
            columns[name].append(row[name])
    return columns, len(rows)


def _check_segments(segments, length: int, fail) -> None:
    """``segments``: ``[start, stop, version]`` ranges of a completion of ``length`` tokens,
    sorted and disjoint, each non-empty; ``fail(what)`` otherwise."""
    if not isinstance(segments, list):
        fail(f"expected a list of [start, stop, version], got {type(segments).__name__}")
    end = 0
    for seg in segments:
        if not (isinstance(seg, (list, tuple)) and len(seg) == 3 and all(map(_is_int, seg))):
            fail(f"expected [start, stop, version] ints, got {seg!r}")
        start, stop, version = seg
        if not end <= start < stop <= length or version < 0:
            fail(f"segment {list(seg)} is not a sorted, disjoint, non-empty range of the "
                 f"{length} completion tokens with a version >= 0")
        end = stop


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_rollouts(
    path: str,
    *,
    group_size: int,
    temperature: float | None = None,
    beta1: float | None = None,
    vocab_size: int | None = None,
) -> RolloutData:
    """Read and validate the rollout file ``path``; nothing is returned unless every row is
    valid. Checks: the required columns; ids are non-negative ints (below ``vocab_size`` when
    given), a non-empty prompt; one finite log-prob per completion token; finite rewards and
    values; groups of exactly ``group_size`` consecutive rows with one prompt and one value;
    ``temperature`` / ``beta1`` columns equal to the given ones."""
    columns, num_rows = _load_columns(path)
    if num_rows == 0:
        raise RolloutFileError(f"{path}: the file has no rows")
    for name in REQUIRED:
        if name not in columns:
            raise RolloutFileError(
                f"{path}: row 0: column {name!r} is missing (columns: {sorted(columns)})"
            )

    def fail(row: int, column: str, what: str) -> None:
        raise RolloutFileError(f"{path}: row {row}, column {column!r}: {what}")

    def check_ids(row: int, column: str, ids) -> None:
        if not isinstance(ids, list):
            fail(row, column, f"expected a list of token ids, got {type(ids).__name__}")
        for t in ids:
            if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                fail(row, column, f"bad token id {t!r} (vocabulary size {vocab_size})")

    for name in _INT_COLUMNS:
        for i, x in enumerate(columns.get(name, ())):
            if not _is_int(x) or x < 0:
                fail(i, name, f"expected an int >= 0, got {x!r}")
    for name in _FLOAT_COLUMNS:
        for i, x in enumerate(columns.get(name, ())):
            if not _is_number(x) or not math.isfinite(x):
                fail(i, name, f"expected a finite number, got {x!r}")
    for i, v in enumerate(columns.get("file_version", ())):
        if v not in (1, FILE_VERSION):
            fail(i, "file_version", f"version {v}: this oapl reads rollout files of versions 1 "
                 f"to {FILE_VERSION} (write it again with this oapl's `oapl generate`)")
    versions = columns.get("file_version", [1] * num_rows)
    for name in _V2_COLUMNS:
        for i, x in enumerate(columns.get(name, ())):
            if x is not None and versions[i] < 2:
                fail(i, name, f"needs file_version 2 (multi-turn rollouts), the row has "
                     f"{versions[i]}")
    for i, x in enumerate(columns.get("status", ())):
        if x is not None and x not in ROLLOUT_STATUSES:
            fail(i, "status", f"expected one of {list(ROLLOUT_STATUSES)}, got {x!r}")
    for i, segs in enumerate(columns.get("segments", ())):
        if segs is not None:
            _check_segments(segs, len(columns["completion_ids"][i]),
                            lambda what, i=i: fail(i, "segments", what))
    for name, expected in (("temperature", temperature), ("beta1", beta1)):
        for i, x in enumerate(columns.get(name, ()) if expected is not None else ()):
            if not math.isclose(x, expected, rel_tol=1e-9):
                fail(i, name, f"{x} differs from the config's {expected} (generation.temperature"
                     " / algorithm.beta1)")
    for i, (p, c, lp) in enumerate(
        zip(columns["prompt_ids"], columns["completion_ids"], columns["logprobs"])
    ):
        check_ids(i, "prompt_ids", p)
        if not p:
            fail(i, "prompt_ids", "empty prompt")
        check_ids(i, "completion_ids", c)
        if not isinstance(lp, list) or len(lp) != len(c):
            n = len(lp) if isinstance(lp, list) else type(lp).__name__
            fail(i, "logprobs", f"{n} log-probs for {len(c)} completion tokens (completion_ids)")
        for x in lp:
            if not _is_number(x) or not math.isfinite(x):
                fail(i, "logprobs", f"non-finite log-prob {x!r}")

    groups, values = columns["group"], columns.get("value")
    seen: set[int] = set()
    for start in range(0, num_rows, group_size):
        g = groups[start]
        if g in seen:
            if groups[start - 1] == g:
                fail(start, "group", f"group {g} has more than {group_size} rows (generation.n)")
            fail(start, "group", f"group {g} appears again after other groups")
        seen.add(g)
        for i in range(start, min(start + group_size, num_rows)):
            if groups[i] != g:
                fail(i, "group", f"group {g} at row {start} has {i - start} rows, expected "
                     f"{group_size} (generation.n)")
            if columns["prompt_ids"][i] != columns["prompt_ids"][start]:
                fail(i, "prompt_ids", f"differs from the prompt of its group (row {start})")
            if values is not None and not math.isclose(values[i], values[start], abs_tol=1e-6):
                fail(i, "value", f"{values[i]} differs from its group's V* {values[start]}")
    if num_rows % group_size:
        last = num_rows - num_rows % group_size
        fail(last, "group", f"the last group has {num_rows - last} rows, expected {group_size} "
             "(generation.n)")

    def get(name: str, i: int, default):
        return columns[name][i] if name in columns else default

    rollouts = [
        Rollout(
            prompt_index=get("prompt_id", i, groups[i]),
            prompt_ids=columns["prompt_ids"][i],
            completion_ids=columns["completion_ids"][i],
            logprobs=[float(x) for x in columns["logprobs"][i]],
            finish_reason=get("finish_reason", i, ""),
            version=get("version", i, 0),
            segments=None if get("segments", i, None) is None
            else [tuple(seg) for seg in columns["segments"][i]],
            status=get("status", i, None) or "done",
        )
        for i in range(num_rows)
    ]
    rewards = [float(r) for r in columns["reward"]]
    return RolloutData(rollouts, rewards, [float(v) for v in values] if values else None,
                       group_size)
