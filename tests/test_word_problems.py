"""The word-problem task (reasoning-gym) and its math-verify checker."""

import threading

import pytest

from oapl.rewards.math import extract_answer, last_boxed, score
from oapl.tasks.word_problems import BOXED_INSTRUCTION, DEFAULT_TASK, EVAL_POOL, TaskSpec, make_split


def test_splits_are_deterministic():
    assert make_split("train", 200) == make_split("train", 200)
    assert make_split("eval", 50) == make_split("eval", 50)
    # A longer split starts with the shorter one.
    assert make_split("eval", 80)[:50] == make_split("eval", 50)
    assert make_split("train", 300)[:200] == make_split("train", 200)


def test_splits_do_not_overlap():
    train = {r["prompt"] for r in make_split("train", 2000)}
    held_out = make_split("eval", EVAL_POOL)
    assert len({r["prompt"] for r in held_out}) == EVAL_POOL
    assert not train & {r["prompt"] for r in held_out}


def test_records():
    for rec in make_split("eval", 20):
        assert set(rec) == {"prompt", "answer", "task", "index"}
        assert rec["prompt"].endswith(BOXED_INSTRUCTION)
        assert rec["task"] == DEFAULT_TASK.dataset
        int(rec["answer"])  # integer answers
    plain = TaskSpec(DEFAULT_TASK.dataset, DEFAULT_TASK.options, instruction="")
    assert BOXED_INSTRUCTION not in make_split("eval", 1, plain)[0]["prompt"]


def test_other_generators_and_errors():
    gsm = make_split("eval", 3, TaskSpec("gsm_symbolic"))
    assert all(r["task"] == "gsm_symbolic" and r["answer"].lstrip("-").isdigit() for r in gsm)
    with pytest.raises(ValueError, match="split"):
        make_split("test", 3)
    with pytest.raises(ValueError, match="at most"):
        make_split("eval", EVAL_POOL + 1)
    tiny = TaskSpec("chain_sum", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1))
    with pytest.raises(ValueError, match="too small"):
        make_split("train", 10, tiny)  # 1-digit sums: 200 questions, fewer than the pool


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("So the answer is \\boxed{5}.", "5", 1.0),
        ("First I thought \\boxed{4}, but it is \\boxed{5}.", "5", 1.0),
        ("\\boxed{5} is wrong, 7", "5", 1.0),  # a boxed answer beats a later number
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The result is 0.5", "\\frac{1}{2}", 1.0),
        ("it is 1/2", "0.5", 1.0),
        ("32 + 59 = 91", "91", 1.0),  # trailing number
        ("32 + 59 = 91.", "91", 1.0),
        ("The difference 10-4 is 6", "6", 1.0),
        ("We get -28.", "-28", 1.0),
        ("That makes 1,000 apples", "1000", 1.0),
        ("\\boxed{x = 5}", "5", 1.0),
        ("32 + 59 = 121", "91", 0.0),
        ("\\boxed{6}", "5", 0.0),
        ("5 apples? No: 6", "5", 0.0),
        ("", "5", 0.0),
        ("I do not know.", "5", 0.0),
        ("asdf \\boxed{ qwerty", "5", 0.0),
        ("\\boxed{9^{9^{9^9}}}", "5", 0.0),  # refused unparsed: sympy could run forever
    ],
)
def test_score(completion, gold, expected):
    assert score(completion, gold) == expected


def test_score_in_a_thread():
    """math-verify's SIGALRM time limits are off, so scoring works outside the main thread."""
    results = []
    thread = threading.Thread(target=lambda: results.append(score("\\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{3}") == "3"
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1") is None and last_boxed("none") is None
    assert extract_answer("x5 and 7y") is None
    assert extract_answer("between 3 and 4.") == "4"
    with pytest.raises(ValueError, match="gold"):
        score("5", "not a number at all")
