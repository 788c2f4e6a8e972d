"""The CPU time and resident memory of a process tree, read from Linux's /proc; pure stdlib.

``TreeUsage(root).sample()`` walks the tree below ``root`` (every thread's ``children`` file,
so children of any thread count) and sums, over its live processes, CPU time (user + system,
including that of children they reaped) and resident memory. A process that vanished between
two samples keeps its last CPU time in the total unless its parent's reaped-children time grew
by as much (it was waited for, so it is already in there): so children that nobody waits for
(auto-reaped, ``SIGCHLD`` ignored) do not take their CPU time with them. Resident memory
counts shared pages once per process (an over-estimate after ``fork``), never under.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class _Proc:
    """One process as sampled: its own CPU ticks, its reaped children's, its parent."""

    own: int
    reaped: int
    ppid: int


class TreeUsage:
    """Samples of the tree below ``root`` (a pid); ``sample()`` -> (CPU seconds, resident
    bytes) of the whole tree so far."""

    def __init__(self, root: int):
        self.root = root
        self._last: dict[tuple[int, int], _Proc] = {}  # (pid, start time) -> last sample
        self._lost_ticks = 0  # CPU of vanished processes that no parent reaped

    def sample(self) -> tuple[float, int]:
        """CPU seconds (summed over the tree's processes, including those that ended since
        the first sample) and resident bytes (summed over its live processes) now."""
        procs, rss_pages = {}, 0
        stack = [self.root]
        while stack:
            pid = stack.pop()
            stat = _stat(pid)
            if stat is None:
                continue
            key, proc, rss = stat
            if key in procs:
                continue
            procs[key] = proc
            rss_pages += rss
            stack += _children(pid)
        self._account_vanished(procs)
        self._last = procs
        ticks = sum(p.own + p.reaped for p in procs.values()) + self._lost_ticks
        return ticks * _TICK_S, rss_pages * _PAGE

    def _account_vanished(self, procs: dict[tuple[int, int], _Proc]) -> None:
        """Add to the lost time what the vanished processes had, less what their live
        parents' reaped time grew by since the last sample."""
        grown = {}  # pid of a live parent -> reaped ticks not yet matched to a vanished child
        for key, proc in procs.items():
            before = self._last.get(key)
            grown[key[0]] = proc.reaped - (before.reaped if before else 0)
        for key, proc in self._last.items():
            if key in procs:
                continue
            total = proc.own + proc.reaped
            matched = min(total, max(grown.get(proc.ppid, 0), 0))
            if proc.ppid in grown:
                grown[proc.ppid] -= matched
            self._lost_ticks += total - matched


def _stat(pid: int) -> tuple[tuple[int, int], _Proc, int] | None:
    """((pid, start time), its _Proc, resident pages) from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return None
    fields = line[line.rindex(b")") + 2:].split()  # the name may hold spaces and parentheses
    # fields[0] is field 3 (state) of proc(5): ppid 4, utime 14, stime 15, cutime 16,
    # cstime 17, starttime 22, rss 24.
    ppid, utime, stime, cutime, cstime = (int(fields[i]) for i in (1, 11, 12, 13, 14))
    return (pid, int(fields[19])), _Proc(utime + stime, cutime + cstime, ppid), int(fields[21])


def _children(pid: int) -> list[int]:
    """Pids of the children of every thread of ``pid``."""
    kids = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids += map(int, f.read().split())
        except OSError:
            pass
    return kids
