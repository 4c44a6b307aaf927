"""Resident memory, open descriptors and threads of a server and its worker processes (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MB), open fds and threads of a process and its children, summed."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(x) for x in children.read_text().split()]
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
