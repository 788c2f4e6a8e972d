"""The code reward (oapl.rewards.code) with the real sandbox: every HumanEval canonical solution
scores 1, wrong or empty bodies 0, stdin/stdout cases, and hostile programs. Each hostile
program would pass if its attack worked (it returns the right answer only then, or the attack
itself is a way past the tests), so its 0 shows the defence held; the test also checks that the
caller lives on and nothing outside the sandbox changed."""

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from oapl import sandbox
from benchmarks import code_reward_correctness
from oapl.rewards.code import (
    check_record, extract_program, fenced_blocks, normalize_output, run_tests,
)
from oapl.config import DataConfig, config_from_dict
from oapl.batch import score_all
from oapl.rewards import get_reward_fn
from oapl.tasks import load_reward, read_records
from oapl.sandbox import Limits, own_uids, processes_of

pytestmark = pytest.mark.skipif(sandbox.sandbox_problem() is not None,
                                reason=f"no sandbox here: {sandbox.sandbox_problem()}")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADD = {
    "prompt": 'def add(a: int, b: int) -> int:\n    """a + b"""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
SUM = {"prompt": "Print the sum of two integers.",
       "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"},
                 {"input": "-4 1", "output": "-3"}]}
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
LEGIT_TIMEOUT_S = 30  # honest programs: generous, as the CPUs are shared with other jobs


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}```\n"


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    yield
    if os.geteuid() == 0:
        assert processes_of(own_uids()) == []


@pytest.fixture(scope="module")
def humaneval():
    records = read_records(DataConfig(source="humaneval", reward="code"))
    start = time.monotonic()
    rewards, failed = score_all(get_reward_fn("code", timeout_s=LEGIT_TIMEOUT_S), records,
                                [r["canonical_solution"] for r in records], workers=16)
    return records, rewards, failed, time.monotonic() - start


def test_every_humaneval_canonical_solution_scores_1(humaneval):
    records, rewards, failed, seconds = humaneval
    assert len(records) == 164 and not any(failed)
    assert [r["task_id"] for r, x in zip(records, rewards) if x != 1.0] == []
    print(f"164 HumanEval canonical solutions scored in {seconds:.1f} s")


def test_wrong_and_empty_bodies_score_0(humaneval):
    records = humaneval[0][:20]
    bodies = ["", "    pass\n", "    return None\n", "    return 0\n",
              "    raise NotImplementedError\n"]
    pairs = [(r, b) for r in records for b in bodies]
    rewards, failed = score_all(get_reward_fn("code"), *zip(*pairs), workers=16)
    assert rewards == [0.0] * len(pairs) and not any(failed)


def test_program_extraction():
    assert extract_program(ADD, "    return a + b\n") == ADD["prompt"] + "    return a + b\n"
    two = ("```python\nx = 1\n```\ntext\n```py\ndef add(a, b):\n    return a + b\n```\n"
           "```text\nout\n```")
    assert extract_program(ADD, two) == ADD["prompt"] + "def add(a, b):\n    return a + b\n"
    prose = {**ADD, "prompt": "Write add(a, b)."}
    assert extract_program(prose, two) == "def add(a, b):\n    return a + b\n"
    typed = {**ADD, "prompt": "from typing import List\nimport math\n\n" + ADD["prompt"]}
    assert extract_program(typed, two).startswith("from typing import List\nimport math\n")
    assert extract_program(SUM, SUM_PROGRAM) == SUM_PROGRAM
    assert extract_program(SUM, fenced(SUM_PROGRAM)) == SUM_PROGRAM
    assert normalize_output("1  \n2\t\n\n\n") == "1\n2" and normalize_output(" 1\r\n") == " 1"


def test_fence_parser_agrees_with_a_regex_on_short_texts():
    """The linear parser finds what the backtracking regex it replaced found (fine on short
    texts), on every arrangement of fence pieces a random walk makes."""
    regex = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)
    pieces = ["`", "```", "\n", " ", "\t", "py", "python", "x", "-", "+", "é", "```python\n"]
    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert fenced_blocks(text) == regex.findall(text), text


FENCE_ATTACKS = r"""
from oapl.rewards.code import extract_program
n = 128 * 1024
for text in ["```" + "a" * n, ("```" + "a" * 64 + " ") * (n // 68), "```\n" + "`" * n,
             "``" * (n // 2), ("```py\n" + "x" * 64) * (n // 70), "```python" + " " * n]:
    extract_program({"prompt": "def f():\n", "test": "", "entry_point": "f"}, text)
    extract_program({"prompt": "", "tests": []}, text)
print("done")
"""


def test_program_extraction_is_linear_on_long_unclosed_fences():
    """128 KB completions shaped to make a backtracking fence regex quadratic (a long word
    glued to an unclosed fence took seconds at 30 KB): linear work takes milliseconds, so a
    generous timeout only catches a quadratic parser."""
    r = subprocess.run([sys.executable, "-c", FENCE_ATTACKS], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.stdout == "done\n", r.stderr


def test_unit_test_records():
    fn = get_reward_fn("code", timeout_s=LEGIT_TIMEOUT_S)
    assert fn(ADD, "    return a + b\n") == 1.0
    assert fn(ADD, fenced("def add(a, b):\n    return b + a\n")) == 1.0
    assert fn(ADD, "    return a - b\n") == 0.0
    assert fn(ADD, fenced("def plus(a, b):\n    return a + b\n")) == 0.0  # no entry point
    assert fn(ADD, "    return a +\n") == 0.0  # syntax error


@pytest.mark.slow
def test_correctness_benchmark(humaneval):
    """benchmarks/code_reward_correctness.py: the canonical solutions as fenced full functions
    score 1, a wrong mutant of each (one that HumanEval's own harness fails) 0, and the
    semantic cases (in-place changes, callbacks, generators, exception types, prompt helpers,
    Fractions) 1. (The bare bodies are the humaneval fixture's.)"""
    named = code_reward_correctness.batches(humaneval[0], workers=16)
    fn = get_reward_fn("code", timeout_s=LEGIT_TIMEOUT_S)
    for name, (records, completions) in named.items():
        if "bare bodies" in name:
            continue
        rewards, failed = score_all(fn, records, completions, workers=16)
        expected = 0.0 if "expect 0" in name else 1.0
        wrong = [i for i, x in enumerate(rewards) if x != expected]
        assert not any(failed) and wrong == [], (name, wrong, [completions[i] for i in wrong[:2]])


def test_more_correct_programs_score_1():
    fn = get_reward_fn("code", timeout_s=LEGIT_TIMEOUT_S)
    noisy = "    import sys\n    sys.stderr.write('e' * (2 << 20))\n    print('o' * (2 << 20))\n"
    assert fn(ADD, noisy + "    return a + b\n") == 1.0  # 2 MB on stderr and stdout
    adder = {"prompt": "def adder(n):\n", "entry_point": "adder",
             "test": "def check(candidate):\n    assert candidate(2)(3) == 5\n"}
    assert fn(adder, "    return lambda x: x + n\n") == 1.0  # a returned function
    assert fn(adder, "    return lambda x: x - n\n") == 0.0
    own_error = {"prompt": "class Invalid(Exception):\n    pass\n\n\ndef f(x):\n    'x'\n",
                 "entry_point": "f", "test": "def check(candidate):\n    try:\n"
                 "        candidate(-1)\n    except Invalid:\n        return\n    assert False\n"}
    assert fn(own_error, "    raise Invalid(x)\n") == 1.0  # the prompt's exception type
    assert fn(own_error, "    raise ValueError(x)\n") == 0.0


def test_apps_and_taco_records():
    fn = get_reward_fn("code", timeout_s=LEGIT_TIMEOUT_S)
    part = get_reward_fn("code", partial=True, timeout_s=LEGIT_TIMEOUT_S)
    io = {"inputs": ["1 2\n", "5 5\n", "-4 1\n"], "outputs": ["3\n", "10\n", "-3\n"]}
    assert fn({"prompt": "sum", "tests": io}, SUM_PROGRAM) == 1.0
    assert fn({"prompt": "sum", "input_output": json.dumps(io)}, fenced(SUM_PROGRAM)) == 1.0
    wrong_on_one = SUM_PROGRAM.replace("print(a + b)", "print(a + b if a < 5 else 0)")
    assert part({"prompt": "sum", "tests": io}, wrong_on_one) == pytest.approx(2 / 3)
    calls = {"prompt": "add", "input_output": json.dumps(
        {"fn_name": "add", "inputs": [[1, 2], [5, 5]], "outputs": [[3], [10]]})}
    assert fn(calls, fenced("def add(a, b):\n    return a + b\n")) == 1.0
    assert fn(calls, fenced("class Solution:\n    def add(self, a, b):\n"
                            "        return a + b\n")) == 1.0
    assert fn(calls, fenced("def add(a, b):\n    return a * b\n")) == 0.0
    pairs = {"prompt": "pairs", "tests": {"fn_name": "pair", "inputs": [[1]],
                                          "outputs": [[1, 2]]}}
    assert fn(pairs, fenced("def pair(a):\n    return (a, a + 1)\n")) == 1.0  # tuple as list


def test_bad_records_fail_clearly(tmp_path):
    fn = get_reward_fn("code")
    with pytest.raises(ValueError, match=r"needs 'tests'.*it has \[\]"):
        fn({}, "x")
    with pytest.raises(ValueError, match="need 'inputs' and 'outputs'"):
        fn({"prompt": "", "tests": {"inputs": []}}, "x")
    with pytest.raises(ValueError, match="one length"):
        fn({"prompt": "", "tests": {"inputs": ["1"], "outputs": []}}, "x")
    no_call = {**ADD, "test": "def check(candidate):\n    assert True\n"}
    with pytest.raises(ValueError, match="never calls 'add'"):
        check_record(no_call)
    path = tmp_path / "no_call.jsonl"
    path.write_text(json.dumps(ADD) + "\n" + json.dumps(no_call) + "\n")
    with pytest.raises(ValueError, match="record 1: the code record's 'test' never calls"):
        read_records(DataConfig(source=str(path), reward="code"))
    # A call the tests never make: the harness counts the calls, so an empty body scores 0.
    dead = {**ADD, "test": "def check(candidate):\n    if False:\n        candidate(1, 2)\n"}
    assert fn(dead, "") == 0.0 and fn(dead, "    return a + b\n") == 0.0


def test_stdin_stdout_records():
    fn = get_reward_fn("code", timeout_s=LEGIT_TIMEOUT_S)
    part = get_reward_fn("code", partial=True, timeout_s=LEGIT_TIMEOUT_S)
    assert fn(SUM, fenced(SUM_PROGRAM)) == 1.0
    assert fn(SUM, SUM_PROGRAM.replace("print(a + b)", "print(a + b, ' ')\nprint()")) == 1.0
    assert fn({**SUM, "tests": '[{"input": "2 2", "output": "4"}]'}, SUM_PROGRAM) == 1.0
    wrong_on_one = SUM_PROGRAM.replace("print(a + b)", "print(a + b if a < 5 else 0)")
    assert fn(SUM, wrong_on_one) == 0.0 and part(SUM, wrong_on_one) == pytest.approx(2 / 3)
    crash_after = SUM_PROGRAM + "raise SystemExit(1)\n"  # right output, nonzero exit
    assert part(SUM, crash_after) == 0.0
    with pytest.raises(ValueError, match="empty 'tests'"):
        fn({**SUM, "tests": []}, SUM_PROGRAM)
    with pytest.raises(ValueError, match="needs 'tests'"):
        fn({"prompt": "x"}, SUM_PROGRAM)


def test_config_keys_and_records(tmp_path):
    assert load_reward(DataConfig(reward="code"))[1] == 64
    assert load_reward(DataConfig(source="humaneval"))[1] == 64  # the task's own reward: code
    assert load_reward(DataConfig())[1] == 1
    assert load_reward(DataConfig(reward="code", reward_workers=3))[1] == 3
    with pytest.raises(ValueError, match="math needs data.reward_workers=1"):
        load_reward(DataConfig(reward="math", reward_workers=4))
    cfg = config_from_dict({"data": {"reward": "code", "reward_kwargs": {"partial": True}}})
    assert cfg.data.reward_kwargs == {"partial": True}
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(SUM) + "\n")
    (rec,) = read_records(DataConfig(source=str(path), reward="code"))
    assert rec["tests"] == SUM["tests"] and "answer" not in rec
    with pytest.raises(ValueError, match="has no field 'answer'"):
        read_records(DataConfig(source=str(path), reward="exact_match"))
    two = read_records(DataConfig(source="humaneval", limit=2))
    assert [r["task_id"] for r in two] == ["HumanEval/0", "HumanEval/1"]
    assert set(two[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


def test_bad_options_fail_at_once():
    with pytest.raises(ValueError, match="unknown option 'timeout'"):
        get_reward_fn("code", timeout=3)
    with pytest.raises(ValueError, match="memory_mb must be a positive int, not 0"):
        get_reward_fn("code", memory_mb=0)
    with pytest.raises(ValueError, match="max_procs must be a positive int, not 2.5"):
        get_reward_fn("code", max_procs=2.5)
    float_mb = get_reward_fn("code", timeout_s=LEGIT_TIMEOUT_S, memory_mb=512.0)
    assert float_mb(ADD, "    return a + b") == 1.0
    with pytest.raises(ValueError, match="takes no options"):
        get_reward_fn("exact_match", partial=True)


def test_score_all_pool_keeps_order_and_failures():
    def flaky(rec, text):
        time.sleep(0.05)
        if text == "boom":
            raise RuntimeError("reward bug")
        return float(text)

    texts = ["1", "boom", "0", "nan", "1"] * 4
    assert score_all(flaky, [{}] * 20, texts, workers=8) == score_all(flaky, [{}] * 20, texts)
    rewards, failed = score_all(flaky, [{}] * 20, texts, workers=8)
    assert rewards[:5] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert failed[:5] == [False, True, False, True, False]


def test_a_batch_of_hung_programs_costs_about_one_timeout():
    start = time.monotonic()
    rewards, failed = score_all(get_reward_fn("code", timeout_s=2), [ADD] * 16,
                                ["    while True:\n        pass\n"] * 16, workers=16)
    assert rewards == [0.0] * 16 and not any(failed)
    assert time.monotonic() - start < 8  # 16 timeouts of 2 s in a row would be 32 s


# ---- hostile programs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Every hostile program run once, in parallel (so the lot costs about one timeout), with
    a secret in the environment, canary files in the repository, the home directory and /tmp,
    and a listener on 127.0.0.1. Yields ({name: TestOutcome}, the canaries, the listener)."""
    git_status = _git_status()
    tag = os.urandom(6).hex()
    canaries = [f"/tmp/oapl-canary-{tag}", os.path.expanduser(f"~/.oapl-canary-{tag}"),
                os.path.join(REPO, f".oapl-canary-{tag}")]
    for path in canaries:
        with open(path, "w") as f:
            f.write("original")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    secret = os.urandom(16).hex()
    os.environ["OAPL_TEST_SECRET"] = secret
    cases = _hostile_cases(canaries, listener.getsockname()[1], secret)
    limits = Limits(timeout_s=4, cpu_s=4)
    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            outcomes = dict(zip(cases, pool.map(
                lambda case: run_tests(case[0], case[1], limits), cases.values())))
        yield outcomes, canaries, listener, secret
    finally:
        del os.environ["OAPL_TEST_SECRET"]
        listener.close()
        for path in canaries:
            os.remove(path)
    assert _git_status() == git_status


def _git_status() -> str:
    return subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True, check=True).stdout


def _hostile_cases(canaries: list[str], port: int, secret: str) -> dict[str, tuple[dict, str]]:
    """name -> (record, completion): each completion would score 1 if its attack worked."""
    answer = {"prompt": "def answer():\n", "entry_point": "answer",
              "test": f"def check(candidate):\n    assert candidate() == {secret!r}\n"}
    unit = {
        "infinite loop": "def add(a, b):\n    while True:\n        pass\n",
        "fork flood": (
            "import os, time\n"
            "def add(a, b):\n"
            "    for _ in range(300):\n"
            "        try:\n"
            "            pid = os.fork()\n"
            "        except OSError:\n"
            "            return None\n"
            "        if pid == 0:\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "    return a + b\n"),
        "allocate 10 GB": "def add(a, b):\n    x = bytearray(10 * 2**30)\n    return a + b\n",
        "print forever": (
            "def add(a, b):\n    chunk = 'x' * 2**20\n"
            "    while True:\n        print(chunk)\n"),
        "write outside": (
            f"import os\nPATHS = {canaries!r}\n"
            "def add(a, b):\n"
            "    for p in PATHS:\n"
            "        with open(p, 'w') as f:\n"
            "            f.write('pwned')\n"
            "    return a + b\n"),
        "delete what it sees": (
            f"import os, shutil\nPATHS = {canaries!r}\n"
            "def add(a, b):\n"
            "    for p in PATHS + ['/usr/bin/python3', '/usr/lib/python3.11/os.py', '/tmp']:\n"
            "        try:\n"
            "            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)\n"
            "        except OSError:\n"
            "            pass\n"
            "    return a + b if not os.path.exists('/usr/bin/python3') else None\n"),
        "read the environment": (
            "import glob, os\n"
            "def add(a, b):\n"
            "    blob = repr(dict(os.environ))\n"
            "    for p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
            "        try:\n"
            "            blob += open(p, 'rb').read().decode(errors='replace')\n"
            "        except OSError:\n"
            "            pass\n"
            "    print(blob)\n"
            "    return a + b if 'OAPL_TEST_SECRET' in blob else None\n"),
        "connect to 127.0.0.1": (
            "import socket\n"
            "def add(a, b):\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'pwned')\n"
            "    return a + b\n"),
        "kill the parent": (  # then a wrong answer: a harness that took a dead parent for a
            "import os, signal\n"  # pass would score it
            "def add(a, b):\n"
            f"    for pid in (os.getppid(), 1, {os.getpid()}, -1):\n"
            "        try:\n"
            "            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n"
            "            pass\n"
            "    return None\n"),
        "sys.exit(0) before the tests": (
            "def add(a, b):\n    return a + b\n\nimport sys\nsys.exit(0)\n"),
        "os._exit(0) in the call": "import os\ndef add(a, b):\n    os._exit(0)\n",
        "forge a reply that runs code in the tests": (  # exec would print the tests' nonce
            "import pickle, sys\n"
            "class Evil:\n"
            "    def __reduce__(self):\n"
            "        return (exec, (\"import sys; m = sys.modules['__main__']; \"\n"
            "                       \"print(m.job['nonce'], flush=True); m.os._exit(0)\",))\n"
            "def add(a, b):\n"
            "    server = sys.modules['__main__']\n"
            "    evil = pickle.dumps(('ok', pickle.dumps(Evil()), pickle.dumps(((a, b), {}))))\n"
            "    server.send(server.replies, evil)\n"
            "    return a + b\n"),
        "__eq__ always true": (  # made picklable: importable as solution.Anything
            "import sys, types\n"
            "class Anything:\n    def __eq__(self, other):\n        return True\n"
            "sys.modules['solution'] = types.SimpleNamespace(Anything=Anything)\n"
            "def add(a, b):\n    return Anything()\n"),
    }
    cases = {name: (ADD, fenced(code)) for name, code in unit.items()}
    cases["read the tests"] = (answer, fenced(
        "import glob, os, re\n"
        "def answer():\n"
        "    blob = b''\n"
        "    paths = glob.glob('/tmp/**', recursive=True) + glob.glob('/proc/*/cmdline')\n"
        "    paths += glob.glob('/proc/*/fd/*') + glob.glob('/proc/*/environ')\n"
        "    for p in paths + [f'/proc/{os.getppid()}/mem']:\n"
        "        try:\n"
        "            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)\n"
        "            blob += os.read(fd, 1 << 20)\n"
        "        except OSError:\n"
        "            pass\n"
        "    found = re.search(rb'candidate\\(\\) == .([0-9a-f]{32})', blob)\n"
        "    return found and found.group(1).decode()\n"))
    cases["stdin/stdout: kill the runner, fake its reports"] = (SUM, fenced(
        "import json, os\n"
        "for pid in (os.getppid(), 1, -1):\n"
        "    try:\n"
        "        os.kill(pid, 9)\n"
        "    except OSError:\n"
        "        pass\n"
        "fake = [json.dumps({'nonce': '0' * 32, 'case': i, 'status': 0, 'digest': ''})\n"
        "        for i in range(3)]\n"
        "for fd in ('/proc/1/fd/1', '/dev/stdout'):\n"
        "    try:\n"
        "        open(fd, 'w').write('\\n'.join(fake) + '\\n')\n"
        "    except OSError:\n"
        "        pass\n"))
    cases["stdin/stdout: print 1 GB"] = (SUM, fenced(
        SUM_PROGRAM + "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n"))
    cases["stdin/stdout: infinite loop"] = (SUM, fenced("while True:\n    pass\n"))
    return cases


def test_an_honest_program_passes_in_the_same_setting(hostile):
    assert run_tests(ADD, "    return a + b\n", Limits(timeout_s=LEGIT_TIMEOUT_S)).passed == 1


@pytest.mark.parametrize("name", [
    "infinite loop", "fork flood", "allocate 10 GB", "print forever", "write outside",
    "delete what it sees", "read the environment", "connect to 127.0.0.1", "kill the parent",
    "sys.exit(0) before the tests", "os._exit(0) in the call", "__eq__ always true",
    "forge a reply that runs code in the tests",
    "read the tests", "stdin/stdout: kill the runner, fake its reports", "stdin/stdout: print 1 GB",
    "stdin/stdout: infinite loop",
])
def test_hostile_program_scores_0(hostile, name):
    outcomes, canaries, listener, secret = hostile
    outcome = outcomes[name]
    assert outcome.passed == 0, outcome.result
    assert os.path.exists("/usr/bin/python3")
    for path in canaries:
        with open(path) as f:
            assert f.read() == "original"
    out = outcome.result.stdout + outcome.result.stderr
    assert secret.encode() not in out
    assert outcome.result.duration_s < 10


def test_hostile_side_effects(hostile):
    outcomes, _, listener, _ = hostile
    with pytest.raises(TimeoutError):
        listener.accept()  # no connection reached the host's loopback
    assert outcomes["infinite loop"].result.timed_out
    assert outcomes["print forever"].result.stderr_truncated  # the program's stdout is on stderr
    assert b"MemoryError" in outcomes["allocate 10 GB"].result.stderr
    assert b"not plain data" in outcomes["__eq__ always true"].result.stderr
    assert b"builtins.exec, not plain data" in outcomes[
        "forge a reply that runs code in the tests"].result.stderr
