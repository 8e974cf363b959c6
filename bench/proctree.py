"""Watch a process and its descendants through ``/proc``: peak RSS, CPU time, command line, limits.

:class:`TreeWatch` samples the tree every ``interval`` seconds from a thread (``start()`` /
``stop()``, or as a context manager). Per process it keeps the largest ``VmHWM`` seen (the
kernel's own high-water mark of the resident set, so a peak between two samples is not missed
while the process lives), the CPU seconds, the parent, the command line and the soft
``RLIMIT_DATA`` the process runs under (``/proc/<pid>/limits``, "Max data size"). Linux only.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Seen:
    """One process as the watch saw it."""

    pid: int
    parent: int
    name: str
    cmdline: str
    #: the largest VmHWM seen, bytes
    peak_rss: int = 0
    #: the soft RLIMIT_DATA, bytes (``None``: unlimited)
    data_limit: int | None = None
    cpu_seconds: float = 0.0


def data_limit(pid: int) -> int | None:
    """The soft ``RLIMIT_DATA`` of ``pid`` in bytes, ``None`` when unlimited (``OSError`` if gone)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            soft = line[len("Max data size") :].split()[0]
            return None if soft == "unlimited" else int(soft)
    return None


def _parents() -> dict[int, int]:
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            found[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return found


@dataclass
class TreeWatch:
    """Samples a process and its descendants until stopped."""

    root: int
    interval: float = 0.1
    seen: dict[int, Seen] = field(default_factory=dict)
    max_tree_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def peak_rss(self) -> dict[int, int]:
        return {pid: s.peak_rss for pid, s in self.seen.items()}

    @property
    def cpu_seconds(self) -> dict[int, float]:
        return {pid: s.cpu_seconds for pid, s in self.seen.items()}

    @property
    def names(self) -> dict[int, str]:
        return {pid: s.name for pid, s in self.seen.items()}

    def descendants(self) -> list[tuple[int, int]]:
        """``(pid, parent)`` of the root and every process below it, now."""
        parents = _parents()
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        found, todo = [], [(self.root, parents.get(self.root, 0))]
        while todo:
            pid, parent = todo.pop()
            found.append((pid, parent))
            todo.extend((child, pid) for child in children.get(pid, []))
        return found

    def sample(self) -> None:
        total = 0
        for pid, parent in self.descendants():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                limit = data_limit(pid)
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if "VmHWM" not in fields:  # a zombie: nothing left to measure
                continue
            seen = self.seen.get(pid)
            if seen is None:
                seen = self.seen[pid] = Seen(pid, parent, fields.get("Name", "?").strip(), cmdline)
            seen.peak_rss = max(seen.peak_rss, int(fields["VmHWM"].split()[0]) * 1024)
            seen.cpu_seconds = (int(stat[11]) + int(stat[12])) / _TICKS
            seen.data_limit = limit
            seen.cmdline = cmdline or seen.cmdline
            if pid != self.root:
                total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        self.max_tree_rss = max(self.max_tree_rss, total)

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> TreeWatch:
        self._thread = threading.Thread(target=self.run, name="tree-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> TreeWatch:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
