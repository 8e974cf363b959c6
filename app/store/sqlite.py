"""The job store: one SQLite file in WAL mode, one connection guarded by a lock.

Every method is one transaction, so a SIGKILL leaves either the state before or after it. The
store knows rows, not HTTP: it returns :class:`JobRecord` values and small outcome enums.

Job rows read by :meth:`Store.get` are kept in memory until the next write of any kind, so that
pollers of an unchanged job are answered from :meth:`Store.cached` (a dictionary lookup: no SQL, no
lock, nothing that blocks) instead of queueing behind the lock and its writers. One service process
owns the database (the data directory's lock file), so every write passes through here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from app.schemas import ACTIVE_STATUSES, JobStatus
from app.store.migrations import migrate
from probes.spec import Outcome, Phase, Precision


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One row of ``jobs``, JSON columns still as text (the service parses what it shows)."""

    id: str
    status: JobStatus
    device: str
    queue: str
    model: str
    spec_json: str
    cache_key: str
    allow_remote_code: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    configs_total: int
    configs_done: int
    trials_done: int
    current_json: str | None
    error_json: str | None
    model_facts_json: str | None
    result_json: str | None
    child_pid: int | None
    workdir: str | None
    queued_reason: str | None
    node: str | None
    #: ``fit`` or ``no_fit`` once the job succeeded (:class:`probes.verdict.Answer`)
    answer: str | None


@dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    device: str
    queue: str
    model: str
    spec_json: str
    cache_key: str
    allow_remote_code: bool
    configs_total: int
    model_facts_json: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    kind: str
    data: dict[str, Any]


class Reuse(StrEnum):
    """How :meth:`Store.submit` answered."""

    #: a new queued job was inserted
    CREATED = "created"
    #: a succeeded job with the same cache key answers it
    CACHED = "cached"
    #: a queued or running job with the same cache key answers it
    COALESCED = "coalesced"
    #: the idempotency key was seen with the same request; its job answers it
    REPLAYED = "replayed"
    #: the idempotency key was seen with another request (nothing inserted)
    KEY_CONFLICT = "key_conflict"
    #: too many queued jobs (nothing inserted)
    QUEUE_FULL = "queue_full"


@dataclass(frozen=True, slots=True)
class TrialRow:
    """One trial a probe reported, as ``trials`` stores it."""

    config_index: int
    precision: Precision
    gradient_checkpointing: bool
    phase: Phase | None
    batch_size: int
    outcome: Outcome
    peak_reserved_bytes: int | None
    peak_allocated_bytes: int | None
    step_seconds: float | None


@dataclass(frozen=True, slots=True)
class StoredTrial:
    """A stored trial and where it stands: ``seq`` counts the job's trials (1, 2, ...) across attempts."""

    seq: int
    attempt: int
    trial: TrialRow


@dataclass(frozen=True, slots=True)
class RunDurations:
    """Probe run wall times as a Prometheus histogram: cumulative counts per bucket bound."""

    count: int
    total_seconds: float
    cumulative: tuple[int, ...]


_JOB_COLUMNS = ", ".join(JobRecord.__dataclass_fields__)

MAX_CACHED_ROWS = 4096
"""Job rows kept between two writes at most (a service writes every few seconds while it probes)."""


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["status"] = JobStatus(values["status"])
    values["allow_remote_code"] = bool(values["allow_remote_code"])
    return JobRecord(**values)


class Store:
    """SQLite-backed persistence for jobs, their events, trials and idempotency keys."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        #: job rows as last read, emptied by every write (filled and emptied under ``_lock``)
        self._rows: dict[str, JobRecord] = {}
        with self._lock:
            self.version = migrate(self._conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            # Before the lock is released: a reader that takes the lock next reads the new rows,
            # and no copy read before this write can be put back.
            self._rows = {}

    def ping(self) -> None:
        """Raise when the database cannot answer a query."""
        with self._lock:
            self._conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    # --- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            known = self._rows.get(job_id)
            if known is not None:
                return known
            row = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            return self._hold(_record(row))

    def _hold(self, record: JobRecord) -> JobRecord:
        """Keep ``record``, just read under the lock, for :meth:`cached` until the next write."""
        if len(self._rows) >= MAX_CACHED_ROWS:
            self._rows = {}
        self._rows[record.id] = record
        return record

    def cached(self, job_id: str) -> JobRecord | None:
        """The job's row if :meth:`get` read it since the last write, else ``None`` (then ask
        :meth:`get`). Takes no lock and runs no SQL: safe on the event loop. A write empties the
        cache before it returns, so a client that saw its write answered never reads an older row."""
        return self._rows.get(job_id)

    def page(
        self, *, limit: int, after: str | None = None, statuses: list[JobStatus] | None = None
    ) -> list[JobRecord]:
        """Jobs newest first (ids sort by creation time), strictly older than ``after``."""
        where, params = [], []
        if after is not None:
            where.append("id < ?")
            params.append(after)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(s.value for s in statuses)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*params, limit)).fetchall()
        return [_record(r) for r in rows]

    def with_status(self, *statuses: JobStatus) -> list[JobRecord]:
        """Jobs in any of ``statuses``, oldest first."""
        marks = ", ".join("?" * len(statuses))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ({marks}) ORDER BY id",
                tuple(s.value for s in statuses),
            ).fetchall()
        return [_record(r) for r in rows]

    def count_by_status(self) -> dict[JobStatus, int]:
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(JobStatus, 0)
        for status, count in rows:
            counts[JobStatus(status)] = int(count)
        return counts

    def queued_by_queue(self) -> dict[str, int]:
        """Queued jobs per dispatcher queue."""
        return self._queued_by("queue")

    def queued_by_device(self) -> dict[str, int]:
        """Queued jobs per requested device."""
        return self._queued_by("device")

    def _queued_by(self, column: Literal["queue", "device"]) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {column}, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY {column}"
            ).fetchall()
        return {str(key): int(count) for key, count in rows}

    def events(self, job_id: str, after_seq: int = 0) -> list[StoredEvent]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, kind, data_json FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after_seq),
            ).fetchall()
        return [StoredEvent(int(r[0]), str(r[1]), json.loads(r[2])) for r in rows]

    def trials(self, job_id: str, after_seq: int = 0) -> list[StoredTrial]:
        """The job's trials after ``after_seq``, in the order they were stored."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, attempt, config_index, precision, gradient_checkpointing, phase, batch_size,"
                " outcome, peak_reserved_bytes, peak_allocated_bytes, step_seconds FROM trials"
                " WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after_seq),
            ).fetchall()
        return [
            StoredTrial(
                seq=int(r["seq"]),
                attempt=int(r["attempt"]),
                trial=TrialRow(
                    config_index=int(r["config_index"]),
                    precision=Precision(r["precision"]),
                    gradient_checkpointing=bool(r["gradient_checkpointing"]),
                    phase=r["phase"],
                    batch_size=int(r["batch_size"]),
                    outcome=Outcome(r["outcome"]),
                    peak_reserved_bytes=r["peak_reserved_bytes"],
                    peak_allocated_bytes=r["peak_allocated_bytes"],
                    step_seconds=r["step_seconds"],
                ),
            )
            for r in rows
        ]

    # --- counters (/metrics): derived from rows that are never deleted, so they survive restarts ---

    def trials_by_outcome(self) -> dict[str, int]:
        """Every trial ever stored, by outcome."""
        with self._lock:
            rows = self._conn.execute("SELECT outcome, COUNT(*) FROM trials GROUP BY outcome").fetchall()
        return {str(outcome): int(count) for outcome, count in rows}

    def runs_by_status(self) -> dict[str, int]:
        """Every probe child run recorded with :meth:`record_run`, by how it ended."""
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM probe_runs GROUP BY status").fetchall()
        return {str(status): int(count) for status, count in rows}

    def run_durations(self, bounds: tuple[float, ...]) -> RunDurations:
        """The runs' wall times as a cumulative histogram over ``bounds`` (runs that never started
        have none)."""
        buckets = ", ".join("SUM(seconds <= ?)" for _ in bounds)
        with self._lock:
            row = self._conn.execute(
                f"SELECT COUNT(seconds), COALESCE(SUM(seconds), 0){', ' if bounds else ''}{buckets}"
                " FROM probe_runs WHERE seconds IS NOT NULL",
                bounds,
            ).fetchone()
        return RunDurations(
            count=int(row[0]), total_seconds=float(row[1]), cumulative=tuple(int(v or 0) for v in row[2:])
        )

    def find_reusable(
        self, cache_key: str, *, idempotency_key: str | None, request_hash: str, reuse_cached: bool
    ) -> tuple[JobRecord | None, Reuse] | None:
        """The job that would answer this request without a new probe, if any (read only). The row
        found is held for :meth:`cached` as :meth:`get` holds it."""
        with self._lock:
            found = self._reusable(self._conn, cache_key, idempotency_key, request_hash, reuse_cached)
            if found is not None and found[0] is not None:
                self._hold(found[0])
            return found

    # --- writes --------------------------------------------------------------------------------

    def submit(
        self,
        new: NewJob,
        *,
        idempotency_key: str | None,
        request_hash: str,
        reuse_cached: bool,
        max_queued: int,
    ) -> tuple[JobRecord | None, Reuse]:
        """Insert ``new`` unless a key, a cached result or an active twin answers it: atomically."""
        with self._tx() as conn:
            found = self._reusable(conn, new.cache_key, idempotency_key, request_hash, reuse_cached)
            if found is not None:
                return found
            queued = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= max_queued:
                return None, Reuse.QUEUE_FULL
            now = time.time()
            conn.execute(
                "INSERT INTO jobs (id, status, device, queue, model, spec_json, cache_key,"
                " allow_remote_code, created_at, configs_total, model_facts_json)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.id,
                    new.device,
                    new.queue,
                    new.model,
                    new.spec_json,
                    new.cache_key,
                    int(new.allow_remote_code),
                    now,
                    new.configs_total,
                    new.model_facts_json,
                ),
            )
            if idempotency_key is not None:
                conn.execute(
                    "INSERT INTO idempotency_keys (key, request_hash, job_id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (idempotency_key, request_hash, new.id, now),
                )
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (new.id,)).fetchone()
        return _record(row), Reuse.CREATED

    def _reusable(
        self,
        conn: sqlite3.Connection,
        cache_key: str,
        idempotency_key: str | None,
        request_hash: str,
        reuse_cached: bool,
    ) -> tuple[JobRecord | None, Reuse] | None:
        if idempotency_key is not None:
            seen = conn.execute(
                "SELECT request_hash, job_id FROM idempotency_keys WHERE key = ?", (idempotency_key,)
            ).fetchone()
            if seen is not None:
                if seen[0] != request_hash:
                    return None, Reuse.KEY_CONFLICT
                row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (seen[1],)).fetchone()
                return _record(row), Reuse.REPLAYED
        active = conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE cache_key = ? AND status IN ('queued', 'running')"
            " ORDER BY id LIMIT 1",
            (cache_key,),
        ).fetchone()
        if active is not None:
            return _record(active), Reuse.COALESCED
        if reuse_cached:
            done = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE cache_key = ? AND status = 'succeeded'"
                " ORDER BY id DESC LIMIT 1",
                (cache_key,),
            ).fetchone()
            if done is not None:
                return _record(done), Reuse.CACHED
        return None

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> int:
        """Append an event to the job's history; returns its sequence number (1, 2, ...)."""
        with self._tx() as conn:
            return self._append_event(conn, job_id, kind, data)

    @staticmethod
    def _append_event(conn: sqlite3.Connection, job_id: str, kind: str, data: dict[str, Any]) -> int:
        row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM job_events WHERE job_id = ?", (job_id,))
        seq = int(row.fetchone()[0]) + 1
        conn.execute(
            "INSERT INTO job_events (job_id, seq, kind, data_json, created_at) VALUES (?, ?, ?, ?, ?)",
            (job_id, seq, kind, json.dumps(data), time.time()),
        )
        return seq

    def set_queued_reason(self, job_id: str, reason: str) -> bool:
        """Why a queued job waits; False when it is no longer queued."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET queued_reason = ? WHERE id = ? AND status = 'queued'", (reason, job_id)
            )
            return cur.rowcount > 0

    def record_run(self, job_id: str, status: str, seconds: float | None) -> None:
        """A probe child run of ``job_id`` ended as ``status`` after ``seconds`` (``None``: never started)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO probe_runs (job_id, status, seconds, finished_at) VALUES (?, ?, ?, ?)",
                (job_id, status, seconds, time.time()),
            )

    def mark_running(
        self, job_id: str, *, child_pid: int, workdir: str, node: str | None = None
    ) -> JobRecord | None:
        """queued → running; counts the attempt. ``None`` when the job is no longer queued."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, finished_at = NULL,"
                " attempts = attempts + 1, child_pid = ?, workdir = ?, node = ?, queued_reason = NULL,"
                " configs_done = 0, trials_done = 0, current_json = NULL WHERE id = ? AND status = 'queued'",
                (time.time(), child_pid, workdir, node, job_id),
            )
            if cur.rowcount == 0:
                return None
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row)

    def record_progress(
        self,
        job_id: str,
        *,
        current_json: str | None,
        trial: TrialRow | None = None,
        config_done: bool = False,
    ) -> None:
        """Store a trial or count a finished config, and the job's current config, in one transaction."""
        with self._tx() as conn:
            attempts = conn.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if attempts is None:
                return
            if trial is not None:
                seq = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM trials WHERE job_id = ?", (job_id,)
                ).fetchone()[0]
                conn.execute(
                    "INSERT INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        attempts[0],
                        seq,
                        trial.config_index,
                        trial.precision.value,
                        int(trial.gradient_checkpointing),
                        trial.phase,
                        trial.batch_size,
                        trial.outcome.value,
                        trial.peak_reserved_bytes,
                        trial.peak_allocated_bytes,
                        trial.step_seconds,
                    ),
                )
                conn.execute("UPDATE jobs SET trials_done = trials_done + 1 WHERE id = ?", (job_id,))
            if config_done:
                conn.execute("UPDATE jobs SET configs_done = configs_done + 1 WHERE id = ?", (job_id,))
            conn.execute("UPDATE jobs SET current_json = ? WHERE id = ?", (current_json, job_id))

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error_json: str | None = None,
        result_json: str | None = None,
        answer: str | None = None,
        only_if: frozenset[JobStatus] = ACTIVE_STATUSES,
    ) -> JobRecord | None:
        """Move an active job to a terminal status. ``None`` when it was not in ``only_if``."""
        marks = ", ".join("?" * len(only_if))
        with self._tx() as conn:
            cur = conn.execute(
                f"UPDATE jobs SET status = ?, finished_at = ?, error_json = ?, result_json = ?, answer = ?,"
                f" current_json = NULL, child_pid = NULL, queued_reason = NULL"
                f" WHERE id = ? AND status IN ({marks})",
                (
                    status.value,
                    time.time(),
                    error_json,
                    result_json,
                    answer,
                    job_id,
                    *(s.value for s in only_if),
                ),
            )
            if cur.rowcount == 0:
                return None
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row)

    def requeue(
        self, job_id: str, *, refund_attempt: bool = False, reason: str | None = None
    ) -> JobRecord | None:
        """running → queued (restart, a lost worker, or a graceful shutdown that refunds the attempt)."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, child_pid = NULL, node = NULL,"
                " current_json = NULL, queued_reason = ?, attempts = attempts - ?"
                " WHERE id = ? AND status = 'running'",
                (reason, int(refund_attempt), job_id),
            )
            if cur.rowcount == 0:
                return None
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row)
