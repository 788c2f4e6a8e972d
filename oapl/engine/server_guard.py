"""The process between the trainer and a vLLM server it starts: ``python -m
oapl.engine.server_guard PARENT_PID -- COMMAND...``.

The trainer starts it in a session (so a process group) of its own; it runs ``COMMAND`` in that
group and stops the whole group - the server and every process the server started - when the
trainer asks (SIGTERM, SIGINT), when the trainer dies, however it dies (Linux
``PR_SET_PDEATHSIG`` turns the trainer's death, even by SIGKILL, into a SIGTERM here; a parent
check every second covers the case without it), or when the server exits. Stopping is SIGTERM to
the group, then SIGKILL after ``GRACE_S``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _others(group: int) -> list[int]:
    """The other live processes of process group ``group``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if os.getpgid(int(name)) == group:
                    out.append(int(name))
            except OSError:  # gone meanwhile
                pass
    return out


def _stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the rest of this process group, then SIGKILL to what is left after
    GRACE_S."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while _others(group) and time.monotonic() < deadline:
        child.poll()  # reap the server
        time.sleep(0.1)
    for pid in _others(group):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    child.wait()


def main(argv: list[str]) -> None:
    parent, sep, *command = argv
    if sep != "--" or not command:
        raise SystemExit("usage: python -m oapl.engine.server_guard PARENT_PID -- COMMAND...")
    parent_pid = int(parent)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(True))
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        sys.exit(1)
    child = subprocess.Popen(command)
    while not stop and child.poll() is None and os.getppid() == parent_pid:
        time.sleep(1.0)
    code = child.poll()
    if code is not None:
        print(f"oapl: the server exited with code {code}", file=sys.stderr, flush=True)
    _stop_group(child)
    sys.exit(code if code is not None else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
