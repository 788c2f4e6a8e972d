"""Rewards: math-verify equivalences, exact match, toy checkers, failures -> 0 and counted."""

import pytest

from oapl.batch import score_all
from oapl.rewards import exact_match, get_reward_fn, math_answer


@pytest.mark.parametrize(
    "gold, completion, expected",
    [
        ("\\frac{1}{2}", "0.5", 1.0),
        ("0.5", "so the answer is $\\boxed{\\frac{1}{2}}$", 1.0),
        ("1/2", "\\boxed{0.5}", 1.0),
        ("42", "First 6 * 7, which gives 42.", 1.0),
        ("3", "4", 0.0),
        ("12", "I do not know", 0.0),
    ],
)
def test_math_answer(gold, completion, expected):
    assert math_answer({"answer": gold}, completion) == expected


def test_math_unparseable_gold_raises():
    with pytest.raises(ValueError, match="cannot parse the gold answer"):
        math_answer({"answer": "no number here"}, "1")


def test_exact_match():
    assert exact_match({"answer": " 7"}, "7 ") == 1.0
    assert exact_match({"answer": "7"}, "7 7") == 0.0
    rec = {"prompt": "max 3 7 =", "answer": "7", "task": "max"}
    assert exact_match(rec, "7") == 1.0 and exact_match(rec, "3") == 0.0
    assert exact_match(rec, "") == 0.0


def test_score_all_turns_failures_into_zero():
    def flaky(rec, text):
        if text == "boom":
            raise RuntimeError("reward bug")
        return float("nan") if text == "nan" else 1.0

    for workers in (1, 3):  # in order, on a thread pool too
        rewards, failed = score_all(flaky, [{}] * 4, ["ok", "boom", "nan", "ok"], workers)
        assert rewards == [1.0, 0.0, 0.0, 1.0]
        assert failed == [False, True, True, False]


def test_reward_registry():
    assert get_reward_fn("math") is math_answer
    with pytest.raises(ValueError, match="available: \\['code', 'exact_match', 'final_answer', 'math'\\]"):
        get_reward_fn("f1")
