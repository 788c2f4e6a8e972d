"""Does the code reward score right? HumanEval's 164 canonical solutions as a model writes them
(a fenced full function, and a bare body) must score 1; one wrong mutant of each (the first
operator, comparison or constant change that HumanEval's own one-process harness fails) must
score 0; the semantic cases (``SEMANTIC_CASES``: what a call in one process gives) must score 1:

    python -m benchmarks.code_reward_correctness [--workers 2 64]

prints the counts and the scoring time per batch and worker count, with the load average
(the CPUs are shared), and the same for the one-process reference harness (program and tests
in one sandboxed process, as HumanEval's ``check_correctness`` does) for comparison.
"""

from __future__ import annotations

import argparse
import ast
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from oapl.batch import score_all
from oapl.rewards import get_reward_fn
from oapl.sandbox import SANDBOX_PYTHON, Limits, run_program
from oapl.tasks.humaneval import humaneval_records

TIMEOUT_S = 30.0  # generous: the CPUs are shared with other jobs


def fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}```\n"


# name -> (record, completion): correct programs that a call across processes used to fail.
SEMANTIC_CASES = {
    "sorts its argument in place": (
        {"prompt": "def sort_in_place(xs):\n", "entry_point": "sort_in_place",
         "test": "def check(candidate):\n    xs = [3, 1, 2]\n    assert candidate(xs) is None\n"
                 "    assert xs == [1, 2, 3]\n    d = {'a': [2, 1]}\n    candidate(d['a'])\n"
                 "    assert d == {'a': [1, 2]}\n"},
        fenced("def sort_in_place(xs):\n    xs.sort()\n")),
    "takes a lambda": (
        {"prompt": "def apply(f, x):\n", "entry_point": "apply",
         "test": "def check(candidate):\n    assert candidate(lambda v: v * 3, 2) == 6\n"
                 "    assert candidate(len, 'abc') == 3\n"},
        "    return f(x)\n"),
    "returns a generator": (
        {"prompt": "def count_up(n):\n", "entry_point": "count_up",
         "test": "import itertools\n\ndef check(candidate):\n"
                 "    assert list(candidate(3)) == [0, 1, 2]\n"
                 "    g = candidate(10**9)\n    assert next(g) == 0 and next(g) == 1\n"
                 "    assert list(itertools.islice(candidate(10**9), 5)) == [0, 1, 2, 3, 4]\n"},
        fenced("def count_up(n):\n    i = 0\n    while i < n:\n        yield i\n        i += 1\n")),
    "raises the ValueError the test expects": (
        {"prompt": "def parse(s):\n", "entry_point": "parse",
         "test": "def check(candidate):\n    try:\n        candidate('x')\n"
                 "    except ValueError as e:\n        assert 'invalid' in str(e)\n"
                 "    else:\n        assert False\n    assert candidate('3') == 3\n"},
        "    return int(s)\n"),
    "uses a helper of the prompt in a fenced function": (
        {"prompt": "def helper(x):\n    return x * 2\n\n\ndef double_all(xs):\n"
                   '    """Each element doubled, with helper."""\n',
         "entry_point": "double_all",
         "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n"},
        fenced("def double_all(xs):\n    return [helper(x) for x in xs]\n")),
    "returns a Fraction": (
        {"prompt": "from fractions import Fraction\n\n\ndef half(x):\n", "entry_point": "half",
         "test": "from fractions import Fraction\n\ndef check(candidate):\n"
                 "    assert candidate(1) == Fraction(1, 2)\n"
                 "    assert isinstance(candidate(3), Fraction)\n"},
        "    return Fraction(x, 2)\n"),
}


class _Mutator(ast.NodeTransformer):
    """Changes the ``target``-th mutable spot (operator, comparison, boolean operator or
    constant, in source order) of a tree; ``seen`` counts the spots."""

    SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.Div: ast.Mult,
            ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
            ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.And: ast.Or, ast.Or: ast.And}

    def __init__(self, target: int):
        self.target, self.seen = target, 0

    def _spot(self) -> bool:
        self.seen += 1
        return self.seen - 1 == self.target

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if type(node.op) in self.SWAP and self._spot():
            node.op = self.SWAP[type(node.op)]()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        if self._spot():
            node.op = self.SWAP[type(node.op)]()
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        if type(node.ops[0]) in self.SWAP and self._spot():
            node.ops[0] = self.SWAP[type(node.ops[0])]()
        return node

    def visit_Constant(self, node):
        if type(node.value) in (int, bool) and self._spot():
            node.value = (not node.value) if type(node.value) is bool else node.value + 1
        return node


def mutants(record: dict, most: int = 12) -> list[str]:
    """Up to ``most`` full programs (prompt and canonical solution), each with one spot of the
    entry-point function changed, in source order."""
    source = record["prompt"] + record["canonical_solution"]
    out = []
    for target in range(most):
        tree = ast.parse(source)
        fn = next(n for n in ast.walk(tree)
                  if isinstance(n, ast.FunctionDef) and n.name == record["entry_point"])
        mutator = _Mutator(target)
        fn.body = [mutator.visit(stmt) for stmt in fn.body]
        if mutator.seen <= target:
            break
        out.append(ast.unparse(tree) + "\n")
    return out


def reference_passes(record: dict, program: str) -> bool:
    """HumanEval's own harness, sandboxed: the program, the tests and ``check(entry_point)``
    in one process; True when it ran to the end."""
    nonce = secrets.token_hex(8)
    code = (f"{program}\n\n{record['test']}\n\ncheck({record['entry_point']})\n"
            f"print({nonce!r})\n")
    result = run_program([SANDBOX_PYTHON, "-I", "-c", code], b"", Limits(timeout_s=TIMEOUT_S))
    return nonce in result.stdout.decode(errors="replace").splitlines()


def wrong_programs(records: list[dict], workers: int) -> list[str]:
    """For each record, the first mutant that the reference harness fails (else a body that
    returns None), as a fenced full function."""
    def first_wrong(record):
        for program in mutants(record):
            if not reference_passes(record, program):
                return program
        return record["prompt"] + "    return None\n"

    with ThreadPoolExecutor(workers) as pool:
        return [fenced(p) for p in pool.map(first_wrong, records)]


def batches(records: list[dict], workers: int) -> dict[str, tuple[list[dict], list[str]]]:
    """name -> (records, completions) of the correctness benchmark."""
    full = [fenced(r["prompt"] + r["canonical_solution"]) for r in records]
    semantic = list(SEMANTIC_CASES.values())
    return {
        "164 canonical solutions, fenced full functions (expect 1)": (records, full),
        "164 canonical solutions, bare bodies (expect 1)":
            (records, [r["canonical_solution"] for r in records]),
        "164 wrong mutants, fenced (expect 0)": (records, wrong_programs(records, workers)),
        f"{len(semantic)} semantic cases (expect 1)":
            ([r for r, _ in semantic], [c for _, c in semantic]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 64])
    args = parser.parse_args()
    records = humaneval_records()
    named = batches(records, max(args.workers))
    fn = get_reward_fn("code", timeout_s=TIMEOUT_S)
    for workers in args.workers:
        for name, (recs, completions) in named.items():
            start = time.perf_counter()
            rewards, failed = score_all(fn, recs, completions, workers)
            seconds = time.perf_counter() - start
            print(f"{name}: mean reward {sum(rewards) / len(rewards):.3f}, {sum(failed)} failed "
                  f"calls, {seconds:.1f} s (workers {workers}, load {os.getloadavg()[0]:.1f})")
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            passed = list(pool.map(lambda r: reference_passes(r, r["prompt"]
                                                              + r["canonical_solution"]), records))
        print(f"reference one-process harness, 164 canonical solutions: {sum(passed)} pass, "
              f"{time.perf_counter() - start:.1f} s (workers {workers}, "
              f"load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
