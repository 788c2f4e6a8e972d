"""The ``code`` reward: run the program in a completion against a record's tests, sandboxed.

Records (``check_record`` refuses malformed ones with a one-line error, when the data loads):

- unit tests, HumanEval style: ``{"prompt", "test", "entry_point"}``; ``test`` must call the
  entry point (or ``candidate``). The program is the prompt (when it is Python: its imports and
  helpers) followed by the completion's last fenced Python (or untagged) block, or by the
  completion itself when it has no fenced block (a bare function body, as HumanEval samples
  are). The tests run in a process of their own and call the entry point in the program's
  process (``oapl.rewards.code_harness``): the program can neither patch the test process nor
  hand back an object whose ``__eq__`` always holds, and the tests still see what a call in one
  process gives (arguments changed in place, callbacks, generators, the exception's type).
- stdin/stdout cases, DeepCoder / LiveCodeBench / TACO style: ``{"prompt", "tests": [{"input",
  "output"}, ...]}`` or APPS / TACO's ``{"inputs": [...], "outputs": [...]}`` (under ``tests``
  or ``input_output``; either may be a JSON string). The program is the last fenced block, else
  the whole completion. Each case runs it once on ``input``; a case passes when it exits 0 and
  its output equals ``output`` after ``normalize_output``. The expected outputs never enter the
  sandbox: only digests of the program's outputs come out.
- APPS / TACO call-based cases: the same with ``"fn_name"``: each case calls that function
  (or ``Solution().fn_name``) with ``inputs[i]`` as its arguments, and passes when the result
  (a tuple as a list) equals ``outputs[i]``, or its one element; run as a unit test.

Either way the harness proves the tests ran to the end: its reports carry a random nonce that
the program cannot read (it reaches the harness through stdin, and the harness is
non-dumpable, so the program cannot read its memory, environment or descriptors through
/proc), so exiting early, killing the harness or printing fake results all score 0.

Reward: 1.0 when every test passes, else 0.0; with ``partial=True`` the fraction of
stdin/stdout cases passed (a unit-test or call-based record is one case). Options
(``data.reward_kwargs``): ``partial``, ``allow_unsandboxed`` and any ``oapl.sandbox.Limits``
field (``cpu_s`` and ``timeout_s`` of the whole record, ``memory_mb``, ``max_procs``, ...).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass

from ..sandbox import SANDBOX_PYTHON, Limits, RunResult, check_sandbox, run_program
from .code_harness import SERVER, STDIO_HARNESS, UNIT_HARNESS, normalize_output

_FENCE_TAG = re.compile(r"[ \t]*([\w+-]*)")  # anchored at a fence's opening, no backtracking
_PYTHON_TAGS = ("", "python", "py", "python3")
# The test of a call-based case list: the cases arrive as the global CASES.
_CALL_CASES_TEST = """
def check(candidate):
    for args, expected in CASES:
        got = candidate(*args)
        got = list(got) if isinstance(got, tuple) else got
        assert got == expected or (type(expected) is list and len(expected) == 1
                                   and got == expected[0]), (args, got)
"""


@dataclass(frozen=True)
class TestOutcome:
    """The tests of one record run on one completion."""

    passed: int  # cases passed (a unit-test record is one case)
    total: int  # cases run
    result: RunResult  # the sandbox run (its output, whether it was killed, how long it took)


def extract_program(record: dict, completion: str) -> str:
    """The program to test: the completion's last fenced Python (or untagged) block, else the
    completion itself. For a unit-test record it follows the prompt: always when there is no
    fenced block (a bare function body completes the prompt's function), and for a block when
    the prompt is Python (its imports and helpers) or the two make Python together."""
    blocks = [code for tag, code in fenced_blocks(completion) if tag.lower() in _PYTHON_TAGS]
    program = blocks[-1] if blocks else completion
    if _kind(record) != "unit":
        return program
    prompt = record.get("prompt", "")
    joined = prompt + program if prompt.endswith("\n") or not prompt else f"{prompt}\n{program}"
    if not blocks or _is_python(prompt) or _is_python(joined):
        return joined
    return program


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(tag, code) of each fenced block: three backticks, an optional tag (word characters,
    ``+``, ``-``) and the rest of that line, then the code up to the next three backticks.
    One pass over ``text`` (each character is looked at a bounded number of times), so a long
    unclosed fence costs linear time, unlike a backtracking regex."""
    blocks, pos = [], 0
    while (start := text.find("```", pos)) >= 0:
        line_end = text.find("\n", start + 3)
        if line_end < 0:
            break
        close = text.find("```", line_end + 1)
        if close < 0:
            break
        tag = _FENCE_TAG.match(text, start + 3, line_end).group(1)
        blocks.append((tag, text[line_end + 1:close]))
        pos = close + 3
    return blocks


def check_record(record: dict) -> None:
    """Raise ValueError (one line) unless ``record`` is a code record that can be scored: a
    unit test that calls its entry point, or a non-empty list of cases."""
    kind = _kind(record)
    if kind == "cases":
        _cases(record)
        return
    try:
        tree = ast.parse(record["test"])
    except SyntaxError as exc:
        raise ValueError(f"the code record's 'test' is not Python: {exc}") from None
    called = {node.func.id for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    if not called & {"candidate", record["entry_point"]}:
        raise ValueError(f"the code record's 'test' never calls {record['entry_point']!r} (or "
                         "'candidate'): any program, even an empty one, would pass it")


def run_tests(record: dict, completion: str, limits: Limits = Limits(), *,
              allow_unsandboxed: bool = False) -> TestOutcome:
    """Run the record's tests on the completion's program in one sandbox run."""
    check_record(record)
    program, nonce = extract_program(record, completion), secrets.token_hex(16)
    if _kind(record) == "cases":
        cases, fn_name = _cases(record)
        if fn_name is not None:
            job = {"program": program, "prompt": "", "test": _CALL_CASES_TEST,
                   "globals": {"CASES": cases}, "entry_point": fn_name}
            return _unit_run(job, nonce, limits, allow_unsandboxed)
        job = {"program": program, "inputs": [i for i, _ in cases], "nonce": nonce,
               "timeout_s": limits.timeout_s}
        result = _harness_run(STDIO_HARNESS, job, limits, allow_unsandboxed)
        expected = [_digest(o) for _, o in cases]
        return TestOutcome(_stdio_passed(result, nonce, expected), len(cases), result)
    job = {"program": program, "prompt": record.get("prompt", ""), "test": record["test"],
           "entry_point": record["entry_point"]}
    return _unit_run(job, nonce, limits, allow_unsandboxed)


def _unit_run(job: dict, nonce: str, limits: Limits, allow_unsandboxed: bool) -> TestOutcome:
    """A unit-test run: it passed when the test process printed the nonce."""
    result = _harness_run(UNIT_HARNESS, {**job, "nonce": nonce, "server": SERVER}, limits,
                          allow_unsandboxed)
    passed = nonce in result.stdout.decode(errors="replace").splitlines()
    return TestOutcome(int(passed), 1, result)


def code_reward(record: dict, completion: str, *, partial: bool = False,
                allow_unsandboxed: bool = False, **limits) -> float:
    """1.0 when the completion's program passes every test of the record, else 0.0; with
    ``partial``, the fraction of cases passed. ``limits``: ``oapl.sandbox.Limits`` fields."""
    outcome = run_tests(record, completion, _limits(limits), allow_unsandboxed=allow_unsandboxed)
    if partial:
        return outcome.passed / outcome.total
    return float(outcome.passed == outcome.total)


def configure(**options) -> functools.partial:
    """``code_reward`` with ``options`` (``data.reward_kwargs``) bound, after checking them
    and the sandbox: without one this raises unless ``allow_unsandboxed`` is set."""
    _limits({k: v for k, v in options.items() if k not in ("partial", "allow_unsandboxed")})
    check_sandbox(bool(options.get("allow_unsandboxed", False)))
    if not os.access(SANDBOX_PYTHON, os.X_OK):
        raise ValueError(f"the code reward runs programs on {SANDBOX_PYTHON}, which is missing")
    return functools.partial(code_reward, **options)


def _limits(options: dict) -> Limits:
    """``Limits`` from the reward's options, with one-line errors for unknown or bad ones."""
    defaults = Limits()
    kinds = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(Limits)}
    for name, value in options.items():
        if name not in kinds:
            raise ValueError(f"data.reward_kwargs: unknown option {name!r} of the code reward; "
                             f"valid: {sorted({'partial', 'allow_unsandboxed', *kinds})}")
        kind = kinds[name]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                or kind(value) != value):
            raise ValueError(f"the code reward's {name} must be a positive {kind.__name__}, "
                             f"not {value!r}")
    return dataclasses.replace(defaults, **{k: kinds[k](v) for k, v in options.items()})


def _harness_run(harness: str, job: dict, limits: Limits, allow_unsandboxed: bool) -> RunResult:
    return run_program([SANDBOX_PYTHON, "-I", "-c", harness], json.dumps(job).encode(), limits,
                       allow_unsandboxed=allow_unsandboxed)


def _kind(record: dict) -> str:
    """"cases" (stdin/stdout or call-based) or "unit"; ValueError for anything else."""
    if "tests" in record or "input_output" in record:
        return "cases"
    if "test" in record and "entry_point" in record:
        return "unit"
    raise ValueError("a code record needs 'tests' (or 'input_output': stdin/stdout or "
                     "call-based cases) or 'test' and 'entry_point' (unit tests); it has "
                     f"{sorted(record)}")


def _is_python(text: str) -> bool:
    try:
        compile(text, "prompt", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def _cases(record: dict) -> tuple[list[tuple], str | None]:
    """The record's cases as (input, output) pairs (str, str for stdin/stdout; argument list,
    expected result for call-based ones), and the function name of call-based ones."""
    tests = record["tests"] if "tests" in record else record["input_output"]
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as exc:
            raise ValueError(f"the code record's tests are not JSON: {exc}") from None
    if isinstance(tests, dict):
        if not {"inputs", "outputs"} <= set(tests):
            raise ValueError("the code record's tests need 'inputs' and 'outputs'; they have "
                             f"{sorted(tests)}")
        inputs, outputs = tests["inputs"], tests["outputs"]
        if not (isinstance(inputs, list) and isinstance(outputs, list)
                and len(inputs) == len(outputs)):
            raise ValueError("the code record's 'inputs' and 'outputs' must be lists of one "
                             "length")
        pairs, fn_name = list(zip(inputs, outputs)), tests.get("fn_name")
    elif isinstance(tests, list) and all(isinstance(t, dict) and {"input", "output"} <= set(t)
                                         for t in tests):
        pairs, fn_name = [(t["input"], t["output"]) for t in tests], None
    else:
        raise ValueError("the code record's 'tests' must be a list of {'input', 'output'} or "
                         "a dict of 'inputs' and 'outputs'")
    if not pairs:
        raise ValueError("the code record has an empty 'tests' list")
    if fn_name is not None:
        return [(list(i) if isinstance(i, (list, tuple)) else [i], o) for i, o in pairs], fn_name
    return [(_text(i), _text(o)) for i, o in pairs], None


def _text(value) -> str:
    """A case's input or output as text: a list (APPS keeps some as lines) joined by lines."""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _digest(output: str) -> str:
    return hashlib.sha256(normalize_output(output).encode()).hexdigest()


def _stdio_passed(result: RunResult, nonce: str, expected: list[str]) -> int:
    """Cases that the runner (its reports carry the nonce) saw exit 0 with the expected output."""
    passed = set()
    for line in result.stdout.decode(errors="replace").splitlines():
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(report, dict) and report.get("nonce") == nonce):
            continue
        case = report.get("case")
        if (type(case) is int and 0 <= case < len(expected) and report.get("status") == 0
                and report.get("digest") == expected[case]):
            passed.add(case)
    return len(passed)
