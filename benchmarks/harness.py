"""Process plumbing for the benchmarks: worker process trees, peak RSS, counters, stats.

Linux only: process trees and peak RSS are read from /proc (``VmHWM``, the kernel's own
high-water mark of a process's resident set), so no sampling can miss a peak. A worker
process is a process of the group with no children (a supervisor or master process that
only starts workers is not one). Beside RSS, the PSS (``/proc/<pid>/smaps_rollup``: the
pages a process has alone, plus its share of those it shares with its parent or
siblings) is sampled: what one more worker process really costs.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kib(path: str, field_name: str) -> int:
    """A ``Name:  N kB`` field of a /proc file, in KiB (0 if the process is gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of one process so far, in KiB (0 if it is gone)."""
    return _kib(f"/proc/{pid}/status", "VmHWM:")


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def pss_kib(pid: int) -> int:
    """The proportional set size of one process now, in KiB (0 if it is gone)."""
    return _kib(f"/proc/{pid}/smaps_rollup", "Pss:")


@dataclass
class WorkerGroup:
    """The worker processes of one system for one cell, started together."""

    commands: list[list[str]]
    env: dict[str, str]
    log_path: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started_at: float = 0.0
    peak_rss: dict[int, int] = field(default_factory=dict)
    peak_pss: dict[int, int] = field(default_factory=dict)
    parents: set[int] = field(default_factory=set)  # pids seen with children

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.started_at = time.time()
        for command in self.commands:
            self.procs.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        log.close()

    def sample_rss(self) -> None:
        """Record each process's high-water mark; call now and then, and before stop()."""
        for proc in self.procs:
            tree = [proc.pid, *descendants(proc.pid)]
            for pid in tree[1:]:
                parent = parent_pid(pid)
                if parent:
                    self.parents.add(parent)
            for pid in tree:
                rss = peak_rss_kib(pid)
                if rss:
                    self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), rss)
                pss = pss_kib(pid)
                if pss:
                    self.peak_pss[pid] = max(self.peak_pss.get(pid, 0), pss)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"worker {' '.join(proc.args)} exited with {proc.returncode}; see {self.log_path}"  # type: ignore[arg-type]
                )

    def stop(self, timeout: float = 20.0) -> None:
        self.sample_rss()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A hung worker must not hang the benchmark: kill its whole session.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def _workers(self, sampled: dict[int, int]) -> list[int]:
        return [kib for pid, kib in sampled.items() if pid not in self.parents] or list(sampled.values())

    def max_process_rss_mib(self) -> float:
        """The highest peak RSS among the worker processes."""
        return max(self._workers(self.peak_rss), default=0) / 1024

    def max_process_pss_mib(self) -> float:
        """The highest PSS sampled among the worker processes."""
        return max(self._workers(self.peak_pss), default=0) / 1024


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
