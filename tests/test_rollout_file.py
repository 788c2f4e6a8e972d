"""Rollout files: a parquet / jsonl round trip, and corrupt files rejected with the row and
column named, before anything is trained (no engine needed)."""

import json
import math
import os

import pyarrow.parquet as pq
import pytest

from oapl.config import load_config
from oapl.loop import train
from oapl.sources.rollout_file import RolloutFileError, read_rollouts, write_rollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-cpu.yaml")


def _rows(groups=3, n=2):
    """A valid file's rows: ``groups`` groups of ``n`` samples."""
    rows = []
    for g in range(groups):
        for j in range(n):
            rows.append({
                "group": g, "prompt_id": 10 + g, "sample": j, "prompt": f"max {g} 1 =",
                "prompt_ids": [1, 14, 4 + g, 5, 15], "completion_ids": [4 + j, 2],
                "completion": str(j), "logprobs": [-0.5 - j, -0.01], "finish_reason": "stop",
                "reward": float(j), "value": 0.6 + g, "version": 7,
                "temperature": 1.0, "beta1": 1.0,
            })
    return rows


def _read(path, **kw):
    return read_rollouts(str(path), group_size=2, **{"temperature": 1.0, "beta1": 1.0, **kw})


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_round_trip(tmp_path, ext):
    path = write_rollouts(str(tmp_path / f"r.{ext}"), _rows())
    data = _read(path, vocab_size=16)
    assert data.num_groups == 3 and len(data.rollouts) == 6
    r = data.rollouts[3]
    assert (r.prompt_index, r.prompt_ids, r.completion_ids, r.version) == (11, [1, 14, 5, 5, 15],
                                                                           [5, 2], 7)
    assert r.logprobs == pytest.approx([-1.5, -0.01], rel=1e-6)  # parquet stores float32
    assert data.rewards == [0.0, 1.0] * 3 and data.values == [0.6, 0.6, 1.6, 1.6, 2.6, 2.6]


def _corrupt(rows, row, column, value):
    rows[row] = dict(rows[row])
    if value is KeyError:
        del rows[row][column]
    else:
        rows[row][column] = value
    return rows


BAD = [  # (row, column, new value, expected message)
    (3, "logprobs", [-0.1], r"row 3, column 'logprobs': 1 log-probs for 2 completion tokens"),
    (2, "reward", math.nan, r"row 2, column 'reward': expected a finite number, got nan"),
    (1, "value", math.inf, r"row 1, column 'value': expected a finite number"),
    (4, "logprobs", [-0.1, math.nan], r"row 4, column 'logprobs': non-finite"),
    (5, "completion_ids", [4, 99], r"row 5, column 'completion_ids': bad token id 99"),
    (0, "prompt_ids", [], r"row 0, column 'prompt_ids': empty prompt"),
    (3, "prompt_ids", [1, 2], r"row 3, column 'prompt_ids': differs from the prompt of its group"),
    (1, "value", 0.9, r"row 1, column 'value': 0.9 differs from its group's V\* 0.6"),
    (1, "group", 1, r"row 1, column 'group': group 0 at row 0 has 1 rows, expected 2"),
    (5, "group", 0, r"row 5, column 'group': group 2 at row 4 has 1 rows"),
    (2, "temperature", 0.7, r"row 2, column 'temperature': 0.7 differs from the config's 1.0"),
    (0, "version", -1, r"row 0, column 'version': expected an int >= 0"),
]


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
@pytest.mark.parametrize("row,column,value,message", BAD)
def test_corrupt_file_rejected(tmp_path, ext, row, column, value, message):
    rows = _corrupt(_rows(), row, column, value)
    if ext == "jsonl":
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = write_rollouts(str(tmp_path / "r.parquet"), rows)
    with pytest.raises(RolloutFileError, match=message):
        _read(path, vocab_size=16)


def test_missing_columns_and_groups(tmp_path):
    table = pq.read_table(write_rollouts(str(tmp_path / "r.parquet"), _rows()))
    pq.write_table(table.drop(["logprobs"]), tmp_path / "bad.parquet")
    with pytest.raises(RolloutFileError, match=r"row 0: column 'logprobs' is missing"):
        _read(tmp_path / "bad.parquet")
    rows = _corrupt(_rows(), 4, "reward", KeyError)
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RolloutFileError, match=r"row 4: column 'reward' is missing"):
        _read(tmp_path / "bad.jsonl")
    rows = _rows(groups=3)[:5]
    with pytest.raises(RolloutFileError, match=r"row 4, column 'group': the last group has 1"):
        _read(write_rollouts(str(tmp_path / "short.jsonl"), rows))
    rows = _rows(groups=3)
    for r in rows[4:]:
        r["group"] = 0
    with pytest.raises(RolloutFileError, match=r"row 4, column 'group': group 0 appears again"):
        _read(write_rollouts(str(tmp_path / "again.jsonl"), rows))
    with pytest.raises(RolloutFileError, match=r"row 0, column 'beta1': 1.0 differs"):
        _read(write_rollouts(str(tmp_path / "b.jsonl"), _rows()), beta1=0.5)
    with pytest.raises(RolloutFileError, match=r"must end in .parquet or .jsonl"):
        _read(tmp_path / "r.csv")


def test_train_rejects_a_corrupt_file_before_training(tmp_path, tiny_model_dir):
    """Row 5 of 6 is bad: `oapl train` fails before the run directory exists."""
    rows = _corrupt(_rows(groups=3, n=2), 5, "reward", math.nan)
    path = write_rollouts(str(tmp_path / "r.jsonl"), rows)
    out = tmp_path / "run"
    cfg = load_config(TINY, [f"output_dir={out}", f"model.path={tiny_model_dir}",
                             f"data.rollouts={path}", "generation.n=2", "trainer.steps=2",
                             "data.prompts_per_step=2", "algorithm.sync_every=1",
                             "output.save_every=2"])
    with pytest.raises(ValueError, match=r"row 5, column 'reward'"):
        train(cfg)
    assert not out.exists()
