"""The ``code`` reward: run the program in a completion against a record's tests, sandboxed.

Records come in two forms:

- unit tests, HumanEval style: ``{"prompt", "test", "entry_point"}``. The program is the
  completion's last fenced Python block (after the prompt's import lines), or the prompt
  followed by the completion when there is no fenced block (a bare function body, as
  HumanEval samples are). The test process runs the record's prompt and ``test`` and calls
  ``check(candidate)``; ``candidate`` calls the program's ``entry_point`` in another process
  and gets its result back as plain data (builtin types only, compared in the test process),
  so the program can neither patch the test process nor hand back an object whose ``__eq__``
  always holds. The tests reach the sandbox only through the test process's stdin, never a file.
- stdin/stdout cases, DeepCoder / LiveCodeBench / TACO style: ``{"prompt", "tests": [{"input",
  "output"}, ...]}`` (``tests`` may be a JSON string). The program is the last fenced block, else
  the whole completion. Each case runs it once on ``input``; a case passes when it exits 0 and
  its output equals ``output`` after ``normalize_output``. The expected outputs never enter the
  sandbox: only digests of the program's outputs come out.

Either way the harness proves the tests ran to the end: its reports carry a random nonce that
the program cannot read (it reaches the harness through stdin, and the harness is
non-dumpable, so the program cannot read its memory, environment or descriptors through
/proc), so exiting early, killing the harness or printing fake results all score 0.

Reward: 1.0 when every test passes, else 0.0; with ``partial=True`` the fraction of
stdin/stdout cases passed (a unit-test record is one case). Options (``data.reward_kwargs``):
``partial``, ``allow_unsandboxed`` and any ``oapl.sandbox.Limits`` field (``timeout_s`` of the
whole record, ``memory_mb``, ``max_procs``, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import secrets
from dataclasses import dataclass

from ..sandbox import SANDBOX_PYTHON, Limits, RunResult, check_sandbox, run_program

_FENCE_TAG = re.compile(r"[ \t]*([\w+-]*)")  # anchored at a fence's opening, no backtracking
_PYTHON_TAGS = ("", "python", "py", "python3")
_IMPORT = re.compile(r"^(?:from\s+\S+\s+)?import\s.*$", re.M)

# The program's side of a unit-test run: run it, then serve calls of its entry point over two
# pipes (length-prefixed pickles). Its stdout goes to the run's stderr.
_SERVER = r'''
import os, pickle, struct, sys
path, name = sys.argv[1], sys.argv[2]
calls, replies = os.fdopen(int(sys.argv[3]), "rb"), os.fdopen(int(sys.argv[4]), "wb")
namespace = {"__name__": "solution", "__file__": path}
with open(path) as f:
    exec(compile(f.read(), path, "exec"), namespace)
fn = namespace[name]
while len(head := calls.read(8)) == 8:
    args, kwargs = pickle.loads(calls.read(struct.unpack("<Q", head)[0]))
    try:
        reply = pickle.dumps(("ok", fn(*args, **kwargs)))
    except Exception as exc:
        reply = pickle.dumps(("error", type(exc).__name__, repr(exc)[:500]))
    replies.write(struct.pack("<Q", len(reply)) + reply)
    replies.flush()
'''

# The test process of a unit-test run (trusted code; the job arrives on stdin).
_UNIT_HARNESS = r'''
import ctypes, io, json, os, pickle, struct, subprocess, sys
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no reading this process via /proc
job = json.loads(sys.stdin.buffer.read())
with open("solution.py", "w") as f:
    f.write(job["program"])
call_r, call_w = os.pipe()
reply_r, reply_w = os.pipe()
subprocess.Popen([sys.executable, "-I", "-c", job["server"], "solution.py", job["entry_point"],
                  str(call_r), str(reply_w)], stdin=subprocess.DEVNULL, stdout=2,
                 pass_fds=(call_r, reply_w))
os.close(call_r)
os.close(reply_w)
calls, replies = os.fdopen(call_w, "wb"), os.fdopen(reply_r, "rb")
PLAIN = {("builtins", n) for n in ("complex", "set", "frozenset", "bytearray", "range", "slice")}
PLAIN |= {("collections", n) for n in ("OrderedDict", "Counter", "deque")}

class PlainData(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in PLAIN:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the candidate returned a {module}.{name}, not plain data")

def candidate(*args, **kwargs):
    data = pickle.dumps((args, kwargs))
    calls.write(struct.pack("<Q", len(data)) + data)
    calls.flush()
    head = replies.read(8)
    if len(head) < 8:
        raise RuntimeError("the candidate's process ended")
    reply = PlainData(io.BytesIO(replies.read(struct.unpack("<Q", head)[0]))).load()
    if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok":
        return reply[1]
    raise RuntimeError(f"the candidate failed: {reply!r:.300}")

namespace = {"__name__": "tests"}
try:
    prompt = compile(job["prompt"], "prompt", "exec")
except SyntaxError:
    prompt = None  # a prompt in prose: no helpers to take from it
if prompt is not None:
    exec(prompt, namespace)
namespace[job["entry_point"]] = candidate
exec(compile(job["test"], "test", "exec"), namespace)
if callable(namespace.get("check")):
    namespace["check"](candidate)
print(job["nonce"], flush=True)
'''


def normalize_output(text: str) -> str:
    """Output as compared: trailing whitespace of each line and trailing empty lines dropped."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


# The runner of a stdin/stdout run: each input to a fresh run of the program, whose output
# (a file, so RLIMIT_FSIZE bounds it) is reported as a digest of its normalized text.
_STDIO_HARNESS = "import hashlib\n" + inspect.getsource(normalize_output) + r'''
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no reading this process via /proc
job = json.loads(sys.stdin.buffer.read())
with open("solution.py", "w") as f:
    f.write(job["program"])
for case, text in enumerate(job["inputs"]):
    with open("output.txt", "w+b") as out:
        os.unlink("output.txt")
        proc = subprocess.Popen([sys.executable, "-I", "solution.py"], stdin=subprocess.PIPE,
                                stdout=out, stderr=2, start_new_session=True)
        try:
            proc.communicate(text.encode(), timeout=job["timeout_s"])
            status = proc.returncode
        except subprocess.TimeoutExpired:
            status = None
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        out.seek(0)
        output = normalize_output(out.read().decode(errors="replace"))
    digest = hashlib.sha256(output.encode()).hexdigest()
    print(json.dumps({"nonce": job["nonce"], "case": case, "status": status, "digest": digest}),
          flush=True)
'''


@dataclass(frozen=True)
class TestOutcome:
    """The tests of one record run on one completion."""

    passed: int  # cases passed (a unit-test record is one case)
    total: int  # cases run
    result: RunResult  # the sandbox run (its output, whether it was killed, how long it took)


def extract_program(record: dict, completion: str) -> str:
    """The program to test: the completion's last fenced Python (or untagged) block, for a
    unit-test record after the prompt's import lines; without one, for a unit-test record the
    prompt followed by the completion (a bare function body), else the completion itself."""
    blocks = [code for tag, code in fenced_blocks(completion) if tag.lower() in _PYTHON_TAGS]
    unit = "tests" not in record
    if blocks:
        imports = "\n".join(_IMPORT.findall(record.get("prompt", ""))) if unit else ""
        return f"{imports}\n{blocks[-1]}" if imports else blocks[-1]
    return record["prompt"] + completion if unit else completion


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


def run_tests(record: dict, completion: str, limits: Limits = Limits(), *,
              allow_unsandboxed: bool = False) -> TestOutcome:
    """Run the record's tests on the completion's program in one sandbox run."""
    program, nonce = extract_program(record, completion), secrets.token_hex(16)
    if "tests" in record:
        cases = _stdio_cases(record)
        job = {"program": program, "inputs": [c["input"] for c in cases], "nonce": nonce,
               "timeout_s": limits.timeout_s}
        result = _harness_run(_STDIO_HARNESS, job, limits, allow_unsandboxed)
        expected = [_digest(c["output"]) for c in cases]
        return TestOutcome(_stdio_passed(result, nonce, expected), len(cases), result)
    if "test" not in record or "entry_point" not in record:
        raise ValueError("a code record needs 'tests' (stdin/stdout cases) or 'test' and "
                         f"'entry_point' (unit tests); it has {sorted(record)}")
    job = {"program": program, "prompt": record.get("prompt", ""), "test": record["test"],
           "entry_point": record["entry_point"], "nonce": nonce, "server": _SERVER}
    result = _harness_run(_UNIT_HARNESS, job, limits, allow_unsandboxed)
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


def _stdio_cases(record: dict) -> list[dict]:
    """The record's stdin/stdout cases, as ``{"input": str, "output": str}``."""
    tests = record["tests"]
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not tests:
        raise ValueError("the code record has an empty 'tests' list")
    return [{"input": str(t["input"]), "output": str(t["output"])} for t in tests]


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
