"""Prompt sources (toy, jsonl, parquet) and the resumable sampler."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oapl.config import DataConfig
from oapl.prompts import PromptSampler, load_prompts
from oapl.tasks import read_records
from oapl.tasks.toy import toy_task
from oapl.tiny import VOCAB, build_tokenizer


def test_toy_max_task():
    task = toy_task("max")
    assert len(task.records) == 100
    assert task.records[37] == {"prompt": "max 3 7 =", "answer": "7", "task": "max"}
    assert all(a in VOCAB for a in task.answers)
    with pytest.raises(ValueError, match="available: \\['ask', 'cmp', 'max', 'thr'\\]"):
        toy_task("sum")


def test_toy_prompts_tokenize_with_bos():
    tok = build_tokenizer()
    prompts = load_prompts(DataConfig(source="toy:max", limit=3), tok)
    assert [p.index for p in prompts] == [0, 1, 2]
    assert tok.convert_ids_to_tokens(prompts[2].token_ids) == ["<bos>", "max", "0", "2", "="]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_file_sources_rename_keys(tmp_path, fmt):
    rows = [{"question": "max 1 2 =", "solution": 2, "id": "a"},
            {"question": "max 9 9 9 9 9 9 =", "solution": 9, "id": "b"}]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = DataConfig(source=str(path), prompt_key="question", answer_key="solution",
                     max_prompt_tokens=6)
    assert read_records(cfg)[0] == {"id": "a", "prompt": "max 1 2 =", "answer": "2"}
    prompts = load_prompts(cfg, build_tokenizer())  # the 9-token prompt is dropped
    assert len(prompts) == 1 and prompts[0].record["id"] == "a"


def test_missing_field_and_unknown_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="record 0 has no field 'answer', which reward "
                                         "'exact_match' needs"):
        read_records(DataConfig(source=str(path)))
    with pytest.raises(ValueError, match="expected one of .*toy:<task>"):
        read_records(DataConfig(source="data.csv"))
    with pytest.raises(ValueError, match="no such file"):
        read_records(DataConfig(source=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="unknown toy task 'sum'"):
        read_records(DataConfig(source="toy:sum"))


@pytest.mark.parametrize("text, error", [
    ('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": 2\n',
     r"d.jsonl:3: not JSON \(Expecting ',' delimiter\)"),
    ('{"prompt": "a", "answer": "1"}\n["b", 2]\n', r"d.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n',
     r"d.jsonl:2: no prompt field 'prompt' \(fields: \['question', 'answer'\]\)"),
])
def test_bad_prompt_file_lines_name_file_and_line(tmp_path, text, error):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        read_records(DataConfig(source=str(path)))


def test_reward_defaults_to_the_tasks_own(tmp_path):
    from oapl.tasks import reward_name

    assert reward_name(DataConfig(source="toy:max")) == "exact_match"
    assert reward_name(DataConfig(source="word_problems")) == "final_answer"
    assert reward_name(DataConfig(source="toy:max", reward="math")) == "math"
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n')  # no answer: fine for a reward that reads none
    assert reward_name(DataConfig(source=str(path))) == "exact_match"


def test_sampler_epochs_and_resume():
    s = PromptSampler(10, 4, seed=1)
    batches = [s.next_batch() for _ in range(5)]  # 20 draws = 2 epochs exactly
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    s2 = PromptSampler(10, 4, seed=1)
    s2.next_batch(), s2.next_batch()
    state = s2.state_dict()
    s3 = PromptSampler(10, 4, seed=1)
    s3.load_state_dict(state)
    assert [s3.next_batch() for _ in range(3)] == batches[2:]
