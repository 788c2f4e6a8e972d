"""The sandbox for model-written code (oapl.sandbox), with the real bubblewrap: what a program
sees, the limits, the wall-clock kill of a whole tree, output caps, and the refusal to run
without isolation unless asked. Hostile programs are bounded by construction (a few hundred
sleeping forks, allocations that are never touched), so a sandbox bug cannot take CI down."""

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from oapl import sandbox
from oapl.sandbox import (
    SANDBOX_PYTHON, Limits, SandboxUnavailable, own_uids, processes_of, run_program,
)

pytestmark = pytest.mark.skipif(sandbox.sandbox_problem() is not None,
                                reason=f"no sandbox here: {sandbox.sandbox_problem()}")
QUICK = Limits(timeout_s=5)


def python(code: str, limits: Limits = QUICK, stdin: bytes = b"",
           args: tuple[str, ...] = ()) -> sandbox.RunResult:
    return run_program([SANDBOX_PYTHON, "-I", "-c", code, *args], stdin, limits)


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    """After the module's runs, no process of a sandbox uid of this process is alive."""
    yield
    if os.geteuid() == 0:
        assert processes_of(own_uids()) == []


def test_what_a_program_sees():
    r = python(
        "import json, os, sys\n"
        "print(json.dumps({'root': sorted(os.listdir('/')), 'pid': os.getpid(),\n"
        "    'uid': os.getuid(), 'cwd': os.getcwd(), 'env': dict(os.environ),\n"
        "    'stdin': sys.stdin.read(),\n"
        "    'pids': sorted(p for p in os.listdir('/proc') if p.isdigit())}))\n",
        stdin=b"hello",
    )
    seen = json.loads(r.stdout)
    assert set(seen["root"]) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sbin",
                                 "tmp", "usr"}
    assert seen["pid"] == 1 and seen["pids"] == ["1"]  # its own pid namespace
    assert seen["uid"] != 0 and seen["cwd"] == "/tmp" and seen["stdin"] == "hello"
    assert seen["env"] == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
                           "PWD": "/tmp"}
    assert r.sandboxed and r.returncode == 0 and not r.timed_out


def test_only_tmp_is_writable_and_it_is_private(tmp_path):
    outside = tmp_path / "visible?"
    outside.write_text("original")
    r = python(
        "import os\n"
        f"for p in ['/tmp/a', '/usr/x', '/x', '/dev/shm/x', '/dev/x', {str(outside)!r}]:\n"
        "    try:\n"
        "        open(p, 'w').write('pwned'); print(p, 'ok')\n"
        "    except OSError as e:\n"
        "        print(p, e.errno)\n"
    )
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "/tmp/a ok" and all(not line.endswith(" ok") for line in lines[1:])
    assert outside.read_text() == "original" and not os.path.exists("/tmp/a")


def test_wall_clock_kills_the_whole_tree():
    start = time.monotonic()
    r = python(
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # a grandchild that leaves the process group
        "    while True: pass\n"
        "print('forked', flush=True)\n"
        "while True: pass\n",
        Limits(timeout_s=1.5),
    )
    assert r.timed_out and r.returncode < 0 and r.stdout == b"forked\n"
    assert 1.5 <= r.duration_s < 5 and time.monotonic() - start < 8
    if os.geteuid() == 0:
        assert processes_of(own_uids()) == []  # the setsid grandchild died with the namespace


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own per run needs root")
def test_fork_flood_is_bounded_and_reaped():
    r = python(
        "import os, time\n"
        "n = 0\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print(n)\n",
        Limits(timeout_s=10, max_procs=16),
    )
    assert 0 < int(r.stdout) < 16  # bwrap's own processes count too
    assert r.duration_s < 10 and not r.timed_out  # the sleepers died with the namespace
    assert processes_of(own_uids()) == []


def test_memory_cpu_and_file_limits():
    r = python("x = bytearray(10 * 2**30)")  # calloc: never touched, so bounded by construction
    assert r.returncode != 0 and b"MemoryError" in r.stderr
    r = python("while True: pass", Limits(timeout_s=20, cpu_s=1))
    assert r.returncode != 0 and not r.timed_out and r.duration_s < 15  # SIGXCPU, not the clock
    r = python("open('/tmp/big', 'wb').write(b'x' * (20 << 20))", Limits(timeout_s=10, file_mb=16))
    assert r.returncode != 0 and not r.timed_out  # SIGXFSZ


HOG = """
import os
for _ in range(7):
    if os.fork() == 0:
        break
try:
    os.setsid()  # each child in a session (and scheduler autogroup) of its own
except OSError:
    pass  # pid 1 leads its session already
while True:
    pass
"""
NEEDS_HALF_A_CPU_SECOND = """
import time
start = time.process_time()
while time.process_time() - start < 0.5:
    pass
print("done")
"""


@pytest.mark.slow
def test_cpu_hogs_do_not_starve_a_correct_neighbour():
    """Two runs of 8 busy-looping setsid() processes each, beside a run that needs 0.5 CPU
    seconds: each run is killed by its own CPU time summed over its processes (cpu_s), so the
    hogs end at their budget and the correct run then gets the CPUs and passes; the wall
    clock (timeout_s) is only the backstop."""
    limits = Limits(cpu_s=2, timeout_s=60)
    with ThreadPoolExecutor(3) as pool:
        hogs = [pool.submit(python, HOG, limits) for _ in range(2)]
        correct = pool.submit(python, NEEDS_HALF_A_CPU_SECOND, limits).result()
        hogs = [h.result() for h in hogs]
    assert correct.returncode == 0 and correct.stdout == b"done\n", correct
    assert 0.4 <= correct.cpu_time_s < 2  # sampled every WATCH_S: a little behind
    for hog in hogs:
        assert hog.cpu_exceeded and not hog.timed_out and hog.returncode < 0
        assert 2 <= hog.cpu_time_s < 4 and hog.duration_s < 50


def test_total_memory_of_a_run_is_capped():
    """Four processes that each touch 200 MB (under their own 512 MB address-space limit):
    the run's summed resident memory passes total_memory_mb, so the watchdog kills it."""
    r = python(
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        break\n"
        "x = bytearray(200 << 20)\n"
        "for i in range(0, len(x), 4096):\n"
        "    x[i] = 1\n"
        "time.sleep(20)\n",
        Limits(timeout_s=30, memory_mb=512, total_memory_mb=400, max_procs=8))
    assert r.memory_exceeded and not r.timed_out and r.returncode < 0 and r.duration_s < 20
    r = python("x = bytearray(200 << 20)\nx[::4096] = b'1' * len(x[::4096])\nprint('ok')",
               Limits(memory_mb=512, total_memory_mb=400))
    assert r.stdout == b"ok\n" and not r.memory_exceeded  # one such process fits


def test_output_is_capped():
    r = python("import sys\nwhile True: sys.stdout.write('x' * 65536)", Limits(timeout_s=30))
    assert r.stdout_truncated and not r.stderr_truncated and r.returncode < 0
    assert len(r.stdout) == Limits().max_output_bytes and r.duration_s < 10
    r = python("import sys\nsys.stderr.write('e' * 100)\nprint('fine')")
    assert r.stdout == b"fine\n" and r.stderr == b"e" * 100 and not r.stdout_truncated
    r = python("import sys\nsys.stderr.write('e' * (2 << 20))\nprint('fine')")  # not killed
    assert r.stdout == b"fine\n" and r.returncode == 0 and r.stderr_truncated
    assert r.stderr == b"e" * Limits().max_output_bytes


SYSCALL_PROBE = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
nr = json.loads(sys.argv[1])
def call(name, *args):
    ret = libc.syscall(nr[name], *args)
    return os.strerror(ctypes.get_errno()) if ret < 0 else ret
session = ctypes.c_long(-3)  # KEY_SPEC_SESSION_KEYRING
print(json.dumps({
    "read the caller's key": call("request_key", b"user", sys.argv[2].encode(), None, 0),
    "add a key": call("add_key", b"user", b"oapl-run", b"planted", 7, session),
    "read a key of an earlier run": call("request_key", b"user", b"oapl-run", None, 0),
    "keyctl": call("keyctl", 0, session, 0),  # KEYCTL_GET_KEYRING_ID
    "io_uring_setup": call("io_uring_setup", 4, None),
    "perf_event_open": call("perf_event_open", None, 0, -1, -1, 0),
    "bpf": call("bpf", 0, None, 0),
    "ptrace": call("ptrace", 16, 1, 0, 0),  # PTRACE_ATTACH to pid 1
    "unshare": call("unshare", 0x40000000),  # CLONE_NEWNET
}))
"""


def test_keyrings_and_risky_syscalls_are_denied():
    """The caller's session keyring (which every child inherits) is out of reach, so one run
    can neither read the caller's keys nor leave one for the next; io_uring, perf_event_open,
    bpf, ptrace and unshare fail too, while threads, fork and subprocesses work."""
    import ctypes

    import pyseccomp

    names = ("request_key", "add_key", "keyctl", "io_uring_setup", "perf_event_open", "bpf",
             "ptrace", "unshare")
    nr = {n: pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, n) for n in names}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    secret = f"oapl-secret-{os.urandom(4).hex()}"
    # A session keyring of the test's own (children inherit it), holding a key.
    assert libc.syscall(nr["keyctl"], 1, f"oapl-test-{os.getpid()}".encode()) > 0
    assert libc.syscall(nr["add_key"], b"user", secret.encode(), b"x", 1, ctypes.c_long(-3)) > 0
    runs = [json.loads(python(SYSCALL_PROBE, args=[json.dumps(nr), secret]).stdout)
            for _ in range(2)]
    for seen in runs:
        assert seen == {name: "Operation not permitted" for name in seen}, seen
    r = python("import os, subprocess, threading\n"
               "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
               "print(subprocess.run(['/bin/echo', 'child'], capture_output=True).stdout)\n"
               "pid = os.fork()\n"
               "os._exit(3) if pid == 0 else print(os.waitpid(pid, 0)[1] >> 8)\n")
    assert r.stdout == b"thread\nb'child\\n'\n3\n", r


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 ABI is x86_64's")
def test_a_foreign_architecture_syscall_kills():
    r = python("import ctypes\nctypes.CDLL(None).syscall(0x40000000 | 39)\nprint('alive')")  # x32
    assert r.returncode == 128 + 31 and r.stdout == b""  # SIGSYS, as bwrap passes it on


def test_no_network():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    with listener:
        r = python(
            "import socket\n"
            f"for host in ('127.0.0.1', 'localhost', {socket.gethostname()!r}, '1.1.1.1'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=1).sendall(b'pwned')\n"
            "        print(host, 'connected')\n"
            "    except OSError as e:\n"
            "        print(host, type(e).__name__)\n"
        )
        assert b"connected" not in r.stdout and r.stdout.count(b"\n") == 4
        with pytest.raises(TimeoutError):
            listener.accept()


def test_environment_is_scrubbed(monkeypatch):
    secret = os.urandom(16).hex()
    monkeypatch.setenv("OAPL_TEST_SECRET", secret)
    r = python(
        "import glob, os\n"
        "print(dict(os.environ))\n"
        "for p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
        "    try:\n"
        "        print(p, open(p, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(p, e)\n"
    )
    assert b"/proc/1/environ" in r.stdout
    assert secret.encode() not in r.stdout + r.stderr and b"OAPL_TEST_SECRET" not in r.stdout


@pytest.fixture
def fresh_probe(monkeypatch):
    """A process in which no trial run has succeeded yet and nothing was warned, for one test."""
    monkeypatch.setattr(sandbox, "_worked", False)
    monkeypatch.setattr(sandbox, "_warned_once", [])


@pytest.fixture
def no_bwrap(monkeypatch, fresh_probe):
    """A machine without bwrap on PATH, for one test."""
    which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which",
                        lambda name, *a, **k: None if name == "bwrap" else which(name, *a, **k))


def test_refuses_without_bwrap_unless_opted_out(no_bwrap):
    with pytest.raises(SandboxUnavailable, match="bwrap not found on PATH.*allow_unsandboxed"):
        python("print(1)")
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        r = run_program([SANDBOX_PYTHON, "-c", "import os; print(os.getcwd())"],
                        allow_unsandboxed=True)
    assert not r.sandboxed and r.stdout.startswith(b"/tmp/oapl-run-")
    assert not os.path.exists(r.stdout.decode().strip())  # its directory is removed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        r = run_program([SANDBOX_PYTHON, "-c", "while True: pass"], b"",
                        Limits(timeout_s=1), allow_unsandboxed=True)
    assert r.timed_out and not r.sandboxed


def test_one_failed_trial_does_not_unsandbox_later_runs(fresh_probe, monkeypatch):
    real_run, calls = sandbox._run, []

    def fails_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise sandbox.SandboxError("bwrap: a transient failure")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(sandbox, "_run", fails_once)
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation.*transient"):
        assert not sandbox.check_sandbox(allow_unsandboxed=True)
    assert sandbox.check_sandbox(allow_unsandboxed=True)  # tried again: it works now
    assert run_program([SANDBOX_PYTHON, "-c", "print(1)"], allow_unsandboxed=True).sandboxed
    trials = len(calls)
    assert sandbox.check_sandbox() and len(calls) == trials  # success is remembered


HOLD_A_UID = """
import os, sys
os.getpid = lambda: 4242  # a process whose pid equals the test's modulo anything
from oapl import sandbox
with sandbox.uid_lease() as uid:
    print(uid, flush=True)
    sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own per run needs root")
def test_run_uids_are_unique_across_processes(monkeypatch):
    """Two scoring processes (here with the same pid as far as either can tell) never share a
    run uid, and a uid that a live process already has is skipped."""
    monkeypatch.setattr(sandbox.os, "getpid", lambda: 4242)
    with subprocess.Popen([sys.executable, "-c", HOLD_A_UID], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as other:
        try:
            theirs = int(other.stdout.readline())
            with sandbox.uid_lease() as mine:
                assert mine != theirs
                sleeper = subprocess.Popen(["setpriv", f"--reuid={mine + 1}", "--regid=0",
                                            "--clear-groups", "sleep", "30"])
                try:
                    time.sleep(0.2)
                    with sandbox.uid_lease() as next_one:
                        assert next_one not in (mine, theirs, mine + 1)
                finally:
                    sleeper.kill()
                    sleeper.wait()
        finally:
            other.communicate("")
    assert other.returncode == 0
