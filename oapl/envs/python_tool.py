"""The ``python`` environment: a calculator-like Python tool for math word problems.

Each model turn is either a tool call or the final answer:

- a turn with a ``\\boxed{}`` answer, or with no fenced code block, is the answer: the rollout
  ends, scored by ``final_answer`` (``oapl.rewards.math``: the last ``\\boxed{}``, else the
  last number, against the record's ``answer``);
- otherwise the turn's last fenced block tagged ``python``/``py`` (or untagged) is run in a
  fresh sandbox (``oapl.sandbox``: no network, no host files, CPU/memory/output limits) as a
  REPL cell: its standard output, then the value of its last line when that is an expression
  (``17 * 23`` answers ``391``), then the last line of an error; that text (capped at
  ``max_output_chars``, the driver caps it again in tokens) returns as a message of role
  ``reply_role`` (``tool``), and the model takes another turn.

A program that fails, runs past its time or memory, or floods its output is an ordinary tool
result (the model sees the error). The sandbox itself failing (``SandboxError``,
``SandboxUnavailable``) raises: that rollout is failed. The instruction to use the tool belongs
in the task's prompt (``data.system_prompt``; see ``examples/smollm2-tool-cpu.yaml``).
"""

from __future__ import annotations

from ..rewards.code import fenced_blocks
from ..rewards.math import final_answer, last_boxed
from ..sandbox import SANDBOX_PYTHON, Limits, RunResult, run_program
from .base import Message, Step

# Runs the cell read from stdin; the value of a last expression line is printed (repr).
RUNNER = """\
import ast, sys
tree = ast.parse(sys.stdin.read(), "<cell>")
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
scope = {"__name__": "__main__"}
exec(compile(tree, "<cell>", "exec"), scope)
if last is not None:
    value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), scope)
    if value is not None:
        print(repr(value))
"""
CODE_TAGS = ("python", "py", "python3", "")
# Exit statuses of a run that the kernel's CPU rlimit ended (SIGKILL, SIGXCPU; bwrap reports
# 128 + signal) before the watchdog's sample saw it.
CPU_KILLS = (128 + 9, 128 + 24, -9, -24)


def tool_code(text: str) -> str | None:
    """The code of the tool call in a model turn ``text``: its last fenced block tagged
    python/py/python3 or untagged, or None when the turn is an answer (it has a
    ``\\boxed{}`` or no such block)."""
    if last_boxed(text) is not None:
        return None
    blocks = [code for tag, code in fenced_blocks(text) if tag.lower() in CODE_TAGS]
    return blocks[-1] if blocks else None


def tool_output(result: RunResult, limits: Limits, max_chars: int) -> str:
    """What the model is shown of one run: its stdout, a note when it was cut or killed, and
    the last line of stderr when it failed; stdout kept to ``max_chars`` characters."""
    out = result.stdout.decode(errors="replace").rstrip()
    notes = ["(output cut)"] if result.stdout_truncated or len(out) > max_chars else []
    out = out[:max_chars]
    if result.memory_exceeded:
        notes.append(f"error: memory limit ({limits.total_memory_mb} MB) exceeded")
    elif result.timed_out:
        notes.append(f"error: time limit ({limits.timeout_s:g} s) exceeded")
    elif result.cpu_exceeded or (result.returncode in CPU_KILLS
                                 and not result.stdout_truncated):
        notes.append(f"error: CPU time limit ({limits.cpu_s:g} s) exceeded")
    elif result.returncode != 0 and not result.stdout_truncated:
        err = result.stderr.decode(errors="replace").strip().splitlines()
        notes.append(err[-1] if err else f"error: exit status {result.returncode}")
    text = "\n".join(x for x in (out, *notes) if x)
    return text or "(no output)"


class PythonToolEnv:
    """One rollout of a word problem with the Python tool. Keywords (``env.kwargs``):
    ``cpu_s``, ``timeout_s``, ``memory_mb`` (per process) and ``max_output_bytes`` of each
    run (``oapl.sandbox.Limits``), ``max_output_chars`` shown to the model, ``reply_role``
    of the tool's message, ``allow_unsandboxed`` (run WITHOUT isolation where bwrap cannot
    run), ``python`` (the interpreter's path inside the sandbox)."""

    def __init__(self, cpu_s: float = 2.0, timeout_s: float = 5.0, memory_mb: int = 512,
                 max_output_bytes: int = 1 << 16, max_output_chars: int = 1000,
                 reply_role: str = "tool", allow_unsandboxed: bool = False,
                 python: str = SANDBOX_PYTHON):
        self.limits = Limits(cpu_s=cpu_s, timeout_s=timeout_s, memory_mb=memory_mb,
                             total_memory_mb=max(memory_mb, 256), max_procs=8,
                             max_output_bytes=max_output_bytes)
        self.max_chars, self.role = max_output_chars, reply_role
        self.allow_unsandboxed, self.python = allow_unsandboxed, python
        self.calls = 0

    def reset(self, record: dict) -> list[Message]:
        self.record = record
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, messages: list[Message]) -> Step:
        said = messages[-1]["content"]
        code = tool_code(said)
        if code is None:
            return Step(None, final_answer(self.record, said), True)
        self.calls += 1
        result = run_program([self.python, "-I", "-c", RUNNER], code.encode(), self.limits,
                             allow_unsandboxed=self.allow_unsandboxed)
        return Step({"role": self.role,
                     "content": tool_output(result, self.limits, self.max_chars)}, 0.0, False)
