"""The unbiased pass@k estimator against brute-force enumeration, its stability at large n, and
the eval table and labels (no engine needed)."""

import itertools
import math
from fractions import Fraction

import pytest

from oapl.evaluate import format_table, model_labels, pass_at_k, pass_at_k_curve


def _brute(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12), (n, c, k)


def test_large_n_is_stable_and_exact():
    for n, c, k in [(1000, 10, 500), (2000, 1, 1), (2000, 3, 1999), (5000, 4990, 5)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-15)


def test_curve_averages_prompts():
    curve = pass_at_k_curve([0, 2, 4], n=4)
    assert len(curve) == 4
    assert curve[0] == pytest.approx((0 + 0.5 + 1) / 3)
    assert curve[-1] == pytest.approx(2 / 3)
    assert curve == sorted(curve)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_labels_and_table():
    labels = model_labels(["runs/a/final_model", "runs/b/checkpoints/step_00000020", "tiny",
                           "x/m", "y/m"])
    assert labels == ["a-final_model", "b-step_00000020", "tiny", "m-3", "m-4"]
    table = format_table({"base": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "rl": [0.9] * 6})
    assert [line.split()[0] for line in table.splitlines()] == ["k", "1", "2", "4", "6"]
    assert table.splitlines()[-1].split() == ["6", "0.600", "0.900"]


def _pass_at_k_entropy():
    """experiments/pass_at_k_entropy.py, loaded as a module."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "pass_at_k_entropy.py")
    spec = importlib.util.spec_from_file_location("pass_at_k_entropy", path)
    pke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pke)
    return pke


def test_exact_curve_is_the_estimators_expectation():
    """experiments/pass_at_k_entropy.py plots 1 - (1 - p)^k from the policy's exact success
    probability p: the expectation of the unbiased estimator over c ~ Binomial(n, p)."""
    pke = _pass_at_k_entropy()
    n, ps, ks = 12, [0.0, 0.03, 0.4, 1.0], [1, 2, 5, 12]
    expected = [sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * pass_at_k(n, c, k)
                    for c in range(n + 1) for p in ps) / len(ps) for k in ks]
    assert pke.exact_pass_at_k(ps, ks) == pytest.approx(expected, abs=1e-12)


def test_rerun_reuses_only_measurements_made_the_same_way(tmp_path):
    """A rerun of experiments/pass_at_k_entropy.py keeps the models measured before, by run
    name, only when the task, samples and eval prompts match."""
    import json

    pke = _pass_at_k_entropy()
    settings = {"task": "thr", "samples": 8, "eval_prompts": 200}
    run = {"name": "oapl_beta2=0.1_L1_s0", "expected_reward": 0.5}
    (tmp_path / "summary.json").write_text(json.dumps(
        {"settings": settings, "base": {"expected_reward": 0.01},
         "methods": {"oapl": {"1": [run]}}}))
    assert pke.previous(str(tmp_path), settings) == {"base": {"expected_reward": 0.01},
                                                     run["name"]: run}
    assert pke.previous(str(tmp_path), dict(settings, samples=4)) == {}
    assert pke.previous(str(tmp_path / "elsewhere"), settings) == {}
