"""Memory and CPU time of a process and its descendants, from /proc (Linux): a server's figures
include its engine core process, a child of it."""

from __future__ import annotations

import os
from pathlib import Path


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += tree(int(child))
    return out


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of `pid` and its descendants, MiB."""
    total = 0.0
    for p in tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def cpu_s(pid: int, *, children: bool = True) -> float:
    """User + system CPU seconds of `pid` (and its descendants) so far."""
    ticks = 0
    for p in tree(pid) if children else [pid]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return ticks / os.sysconf("SC_CLK_TCK")
