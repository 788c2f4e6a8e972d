"""Running untrusted programs (model-written code) in a sandbox (bubblewrap, libseccomp).

Each run is a fresh bubblewrap (``bwrap``) sandbox: every namespace unshared (network, pid,
ipc, uts, cgroup, user; no nested user namespaces), no capabilities, ``/usr`` (with the
``/bin``, ``/lib*`` links or directories) read-only as the only host files, a fresh ``/proc``,
a minimal read-only ``/dev``, ``/`` read-only, a private size-capped tmpfs ``/tmp`` as the only
writable place and the working directory, and a scrubbed environment. Nothing of the
repository, the home directory or the run directory is visible.

The command runs as the sandbox's pid 1 (``--as-pid-1``): nothing inside can signal it, and
bwrap reaps it (a separate init would outlive bwrap as a zombie for the host's init to reap).
A seccomp filter (compiled by libseccomp, through its ctypes bindings ``pyseccomp``) makes
the system calls that reach past these namespaces or into rarely-audited kernel code fail with
``EPERM``: the kernel keyrings (``add_key``, ``request_key``, ``keyctl``: the caller's session
keyring is otherwise shared with every run), ``io_uring``, ``perf_event_open``, ``bpf``,
``ptrace`` and cross-process memory access, mounts, namespaces, modules and the like; system
calls of another architecture (i386, x32) kill the process.

Limits (``Limits``): ``prlimit`` sets CPU time, address space, file size, open files and the
process count per process, and disables core dumps. As root, each run first drops
(``setpriv``) to a uid of its own, unique on the machine (claimed with a lock file, and never
one that a live process has), so ``RLIMIT_NPROC`` bounds fork bombs (root ignores it) and no
sandboxed process may signal anything outside; the uid is reused only once none of its
processes is alive. A watchdog samples the run's process tree in /proc (``oapl.proctree``) and
kills the whole tree when the CPU time summed over its processes passes ``cpu_s`` (so a run
of many busy processes ends at its own budget instead of starving its neighbours past a wall
clock) or their summed resident memory passes ``total_memory_mb``; the wall clock
(``timeout_s``) is the backstop, for runs that sleep or are starved. Killing the tree: bwrap
dies, ``--die-with-parent`` kills the sandbox's pid 1, and with it goes the pid namespace.
Captured output is capped per stream: a run that writes more stdout is killed; more stderr is
read and dropped.

Where bwrap cannot run (not Linux, not installed, no user namespaces), ``run_program`` raises
``SandboxUnavailable`` unless the caller opts into running without isolation
(``allow_unsandboxed``), which then warns once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache

from .proctree import TreeUsage

log = logging.getLogger(__name__)

# The Python that sandboxed programs run on: it must live under the read-only /usr.
SANDBOX_PYTHON = "/usr/bin/python3"
UID_BASE = 1 << 20  # the first run uid (root only)
UID_COUNT = 1 << 16  # run uids from UID_BASE: concurrent runs on this machine
UID_CLAIMS = os.path.join(tempfile.gettempdir(), "oapl-sandbox-uids")  # one lock file per uid
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # the whole environment of a run
_TOOL_ERRORS = (b"bwrap: ", b"setpriv: ", b"prlimit: ")  # the sandbox failed, not the program
_READ = 1 << 16
WATCH_S = 0.1  # how often a run's CPU time and memory are sampled
# System calls a sandboxed program gets EPERM for (names unknown on this architecture skip).
DENIED_SYSCALLS = (
    "add_key", "request_key", "keyctl",  # kernel keyrings
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "perf_event_open", "bpf", "userfaultfd", "fanotify_init",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "quotactl", "quotactl_fd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "syslog", "vhangup", "uselib", "ustat", "sysfs",
    "_sysctl", "iopl", "ioperm", "personality", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "nfsservctl",
)
# The clone() flags that make new namespaces (clone3 cannot be filtered by its flags, so it
# fails with ENOSYS and libc falls back to clone).
_CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                     0x40000000)  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET


class SandboxUnavailable(RuntimeError):
    """Programs cannot be sandboxed here and the caller did not opt out of isolation."""


class SandboxError(RuntimeError):
    """The sandbox itself failed to run (a tool error), as opposed to the program in it."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run."""

    cpu_s: float = 10.0  # CPU seconds of the whole run, summed over its processes; then killed
    timeout_s: float = 30.0  # wall clock of the whole run (the backstop); then killed
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    total_memory_mb: int = 1536  # resident memory of the whole run, summed; then killed
    file_mb: int = 16  # largest file a process may write (RLIMIT_FSIZE)
    tmpfs_mb: int = 64  # size of the private writable /tmp
    max_procs: int = 32  # processes and threads of the run (RLIMIT_NPROC of its own uid)
    open_files: int = 256  # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # captured per stream; more stdout kills the run


@dataclass(frozen=True)
class RunResult:
    """What one run did."""

    returncode: int  # exit status (bwrap passes its command's on); negative: killed by signal
    stdout: bytes  # the first ``max_output_bytes`` of standard output
    stderr: bytes  # the first ``max_output_bytes`` of standard error (the rest is dropped)
    stdout_truncated: bool  # more stdout than the cap was written: the run was killed
    stderr_truncated: bool  # more stderr than the cap was written (and dropped)
    timed_out: bool  # the wall clock ran out: the run was killed
    cpu_exceeded: bool  # its processes' CPU time passed ``cpu_s``: the run was killed
    memory_exceeded: bool  # its resident memory passed ``total_memory_mb``: the run was killed
    cpu_time_s: float  # CPU seconds of the run's processes, as last sampled
    duration_s: float  # wall-clock seconds from the start until the run was reaped
    sandboxed: bool  # False only when run without isolation (``allow_unsandboxed``)


def sandbox_problem() -> str | None:
    """Why programs cannot run sandboxed here, or None when they can: checks the platform,
    the tools on PATH and the seccomp filter, then makes a trial run (which fails, e.g.,
    without user namespaces). Only success is remembered: after a failure the next call
    checks again, so one failed trial does not send later runs out of the sandbox."""
    global _worked
    if _worked:
        return None
    if not sys.platform.startswith("linux"):
        return f"the sandbox (bubblewrap) needs Linux, this is {sys.platform}"
    tools = ("bwrap", "prlimit", "setpriv") if os.geteuid() == 0 else ("bwrap", "prlimit")
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH (apt-get install bubblewrap util-linux)"
    try:
        seccomp_filter()
    except (ImportError, RuntimeError, OSError) as exc:
        return (f"cannot compile the seccomp filter ({exc}); pip install pyseccomp==0.1.2 and "
                "apt-get install libseccomp2")
    try:
        trial = _run(["/bin/sh", "-c", "echo ok"], b"", Limits(timeout_s=30), sandboxed=True)
    except SandboxError as exc:
        return f"bwrap does not run here: {exc}"
    if trial.stdout != b"ok\n":
        err = trial.stderr.decode(errors="replace").strip()[:300]
        return f"a trial bwrap run failed (exit {trial.returncode}): {err}"
    _worked = True
    return None


_worked = False  # a trial run succeeded in this process


_warned = threading.Lock()
_warned_once: list[str] = []


def check_sandbox(allow_unsandboxed: bool = False) -> bool:
    """True when programs will run sandboxed. Without a usable sandbox: raise
    ``SandboxUnavailable``, or with ``allow_unsandboxed`` warn (once) and return False."""
    problem = sandbox_problem()
    if problem is None:
        return True
    if not allow_unsandboxed:
        raise SandboxUnavailable(
            f"cannot sandbox model-written code: {problem}; install bubblewrap, or set "
            "data.reward_kwargs.allow_unsandboxed=true to run it WITHOUT any isolation"
        )
    with _warned:
        if not _warned_once:
            _warned_once.append(problem)
            warnings.warn(f"running model-written code WITHOUT isolation: {problem}",
                          RuntimeWarning, stacklevel=2)
    return False


def run_program(
    argv: Sequence[str], stdin: bytes = b"", limits: Limits = Limits(), *,
    allow_unsandboxed: bool = False,
) -> RunResult:
    """Run ``argv`` (paths as seen inside: ``SANDBOX_PYTHON``, ``/bin/sh``) in a fresh sandbox,
    fed ``stdin``, under ``limits``; its working directory is its private ``/tmp``. Raises
    ``SandboxUnavailable`` (see ``check_sandbox``) or ``SandboxError`` (the sandbox failed)."""
    return _run(list(argv), stdin, limits, check_sandbox(allow_unsandboxed))


def _run(argv: list[str], stdin: bytes, limits: Limits, sandboxed: bool) -> RunResult:
    """One run, sandboxed or (opted into) only under the rlimits in a temporary directory."""
    lease = uid_lease() if sandboxed and os.geteuid() == 0 else nullcontext(None)
    workdir = nullcontext("/") if sandboxed else tempfile.TemporaryDirectory(prefix="oapl-run-")
    with lease as uid, workdir as cwd, _filter_fd(sandboxed) as seccomp_fd:
        cmd = (_command(argv, limits, uid, seccomp_fd) if sandboxed
               else _prlimit(limits, own_uid=False) + argv)
        start = time.monotonic()
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=ENV, cwd=cwd, start_new_session=True,
                              pass_fds=() if seccomp_fd is None else (seccomp_fd,)) as proc:
            watch = _Watch(proc.pid, limits, start)
            try:
                out, err, killed = _communicate(proc, stdin, limits, watch)
            finally:
                _kill(proc)
        cap = limits.max_output_bytes
        result = RunResult(proc.returncode, bytes(out[:cap]), bytes(err[:cap]), len(out) > cap,
                           len(err) > cap, killed == "timeout", killed == "cpu",
                           killed == "memory", watch.cpu_s, time.monotonic() - start, sandboxed)
    if (sandboxed and result.returncode != 0 and killed is None
            and err.startswith(_TOOL_ERRORS)):
        raise SandboxError(err.decode(errors="replace").splitlines()[0])
    return result


class _Watch:
    """The limits of a run that the kernel does not keep: the wall clock, and the CPU time and
    resident memory summed over the run's process tree (sampled every ``WATCH_S``)."""

    def __init__(self, root: int, limits: Limits, start: float):
        self.usage, self.limits = TreeUsage(root), limits
        self.deadline = start + limits.timeout_s
        self.next_sample = start
        self.cpu_s = 0.0

    def wait_s(self) -> float:
        """Seconds until the next check is due."""
        return max(min(self.deadline, self.next_sample) - time.monotonic(), 0)

    def check(self) -> str | None:
        """Why the run must be killed now (timeout, cpu, memory), or None."""
        now = time.monotonic()
        if now >= self.deadline:
            return "timeout"
        if now < self.next_sample:
            return None
        self.next_sample = now + WATCH_S
        self.cpu_s, rss = self.usage.sample()
        if self.cpu_s > self.limits.cpu_s:
            return "cpu"
        if rss > self.limits.total_memory_mb << 20:
            return "memory"
        return None


def _command(argv: list[str], limits: Limits, uid: int | None, seccomp_fd: int) -> list[str]:
    """prlimit [setpriv to ``uid``] bwrap ... ``argv``, with the seccomp filter read from
    ``seccomp_fd``."""
    drop = ([shutil.which("setpriv"), f"--reuid={uid}", f"--regid={uid}",
             "--clear-groups", "--"] if uid is not None else [])
    bwrap = [
        shutil.which("bwrap"),
        "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
        "--new-session", "--as-pid-1", *_system_mounts(), "--proc", "/proc", "--dev", "/dev",
        "--remount-ro", "/dev", "--size", str(limits.tmpfs_mb << 20), "--tmpfs", "/tmp",
        "--remount-ro", "/", "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", ENV["PATH"],
        "--setenv", "LANG", ENV["LANG"], "--setenv", "HOME", "/tmp",
        "--seccomp", str(seccomp_fd), "--",
    ]
    return _prlimit(limits, own_uid=uid is not None) + drop + bwrap + argv


def _prlimit(limits: Limits, own_uid: bool) -> list[str]:
    """The rlimits of a run as a ``prlimit`` prefix. RLIMIT_NPROC counts every process of the
    real uid: with a uid of its own that is the run's; otherwise the user's, so it is raised
    by what the user already runs (and is then only a loose bound)."""
    nproc = limits.max_procs + (0 if own_uid else _task_count(os.getuid()))
    return [
        shutil.which("prlimit"), f"--cpu={math.ceil(limits.cpu_s)}",
        f"--as={limits.memory_mb << 20}", f"--fsize={limits.file_mb << 20}",
        f"--nproc={nproc}", f"--nofile={limits.open_files}", "--core=0", "--",
    ]


@contextmanager
def _filter_fd(sandboxed: bool) -> Iterator[int | None]:
    """A pipe's read end holding the compiled seccomp filter (bwrap reads it), or None when
    not sandboxed."""
    if not sandboxed:
        yield None
        return
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, seccomp_filter())  # a few hundred bytes: within the pipe's buffer
        os.close(write_fd)
        yield read_fd
    finally:
        os.close(read_fd)


@lru_cache(maxsize=None)
def seccomp_filter() -> bytes:
    """The sandbox's seccomp program (classic BPF, as bwrap's ``--seccomp`` reads it):
    everything allowed but ``DENIED_SYSCALLS`` and namespace-making ``clone`` (EPERM),
    ``clone3`` (ENOSYS); a system call of a foreign architecture kills the process."""
    import pyseccomp as seccomp

    filt = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (ValueError, OSError):  # not a system call of this architecture
            pass
    filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for bit in _CLONE_NAMESPACES:  # rules of one system call hold if any does
        filt.add_rule(seccomp.ERRNO(errno.EPERM), "clone",
                      seccomp.Arg(0, seccomp.MASKED_EQ, bit, bit))
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


@lru_cache(maxsize=None)
def _system_mounts() -> tuple[str, ...]:
    """Read-only /usr, and the top-level /bin, /sbin, /lib* as they are here: symlinks into
    /usr (merged /usr) or read-only directories."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return tuple(args)


def _communicate(proc: subprocess.Popen, stdin: bytes, limits: Limits,
                 watch: _Watch) -> tuple[bytearray, bytearray, str | None]:
    """Feed ``stdin`` and collect stdout and stderr (each up to one byte over the cap; more
    stderr is read and dropped) until the run ends, its stdout passes the cap ("stdout") or
    ``watch`` says to kill it ("timeout", "cpu", "memory"); return (stdout, stderr, why it was
    killed or None). The caller kills the run afterwards."""
    cap = limits.max_output_bytes
    out, err = bytearray(), bytearray()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    pending = memoryview(stdin)
    in_fd = proc.stdin.fileno()
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
        while True:
            if (why := watch.check()) is not None:
                return out, err, why
            if not sel.get_map():
                try:
                    proc.wait(watch.wait_s())
                    return out, err, None
                except subprocess.TimeoutExpired:
                    continue
            for key, _ in sel.select(watch.wait_s()):
                if key.fd == in_fd:
                    pending = _write_some(in_fd, pending)
                    if not pending:
                        sel.unregister(in_fd)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, _READ)
                if not data:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += data[: cap + 1 - len(buf)]
                if len(out) > cap:
                    return out, err, "stdout"


def _write_some(fd: int, pending: memoryview) -> memoryview:
    """Write what the pipe takes of ``pending``; the rest (nothing once the reader is gone)."""
    try:
        return pending[os.write(fd, pending[:_READ]):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        return pending[:0]


def _kill(proc: subprocess.Popen) -> None:
    """Kill the run's process group (bwrap; its pid namespace dies with it) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def processes_of(uids: Container[int]) -> list[int]:
    """Pids of the live (not zombie) processes whose real uid is in ``uids``."""
    return [pid for pid, uid in _live_processes() if uid in uids]


def _live_processes() -> Iterator[tuple[int, int]]:
    """(pid, real uid) of every live (not zombie) process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("State", "Uid")))
        except (OSError, ValueError):
            continue
        if fields["State"].split()[0] not in "ZX":
            yield int(entry), int(fields["Uid"].split()[0])


def own_uids() -> frozenset[int]:
    """The uids that this process's sandboxed runs have used (as root)."""
    with _UIDS_LOCK:
        return frozenset(_USED_UIDS)


def _task_count(uid: int) -> int:
    """Processes and threads whose real uid is ``uid`` (what RLIMIT_NPROC counts)."""
    count = 0
    for pid in processes_of((uid,)):
        try:
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


_UIDS_LOCK = threading.Lock()
_USED_UIDS: set[int] = set()


@contextmanager
def uid_lease(gone_timeout_s: float = 10.0) -> Iterator[int]:
    """A uid of its own for one run (root only), unique on this machine: the lowest uid from
    ``UID_BASE`` whose claim file (under ``UID_CLAIMS``) no other run holds locked (an
    ``flock``, which the kernel drops when its holder dies) and that no live process has. It
    is given back once none of its processes is alive; one whose processes outlive
    ``gone_timeout_s`` stays claimed for this process's lifetime."""
    claims = _claims_dir()
    busy = _uids_alive(since=time.monotonic() - 0.1)  # a scan just made by another run will do
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        if uid in busy:
            continue
        fd = os.open(os.path.join(claims, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            os.close(fd)
    else:
        raise SandboxError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")
    with _UIDS_LOCK:
        _USED_UIDS.add(uid)
    try:
        yield uid
    finally:
        deadline = time.monotonic() + gone_timeout_s
        while uid in _uids_alive(since=time.monotonic()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if processes_of((uid,)):
            log.error("sandbox uid %d still has processes %s; not reusing it",
                      uid, processes_of((uid,)))
        else:
            os.close(fd)


_SCAN_LOCK = threading.Lock()
_scan: tuple[float, frozenset[int]] = (-math.inf, frozenset())  # (when taken, uids alive)


def _uids_alive(since: float) -> frozenset[int]:
    """The uids of the live processes, from a scan of /proc begun at ``since`` or later: the
    threads of a scoring pool share one scan instead of each making its own."""
    global _scan
    with _SCAN_LOCK:
        if _scan[0] < since:
            start = time.monotonic()
            _scan = (start, frozenset(uid for _, uid in _live_processes()))
        return _scan[1]


def _claims_dir() -> str:
    """``UID_CLAIMS``, made (root's, mode 0700) when missing; refused when anyone else could
    write to it."""
    try:
        os.mkdir(UID_CLAIMS, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(UID_CLAIMS)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise SandboxError(f"{UID_CLAIMS} must be a directory of root's that only root writes")
    return UID_CLAIMS
