"""Resident memory, descriptors, threads, CPU time and listening sockets of a server and its workers (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path


def tree(pid: int) -> list[int]:
    """A process and its direct children (uvicorn's workers, multiprocessing's resource tracker)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(x) for x in children.read_text().split()]
    return pids


def cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds used so far by a process and each of its children."""
    out = {}
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MB), open fds and threads of a process and its children, summed."""
    pids = tree(pid)
    rss = fds = threads = 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return {"rss_mb": rss, "fds": fds, "threads": threads}


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN state on ``port``: one per socket, not per process (SO_REUSEPORT workers each have one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                count += 1
    return count
