"""Schema migrations: numbered SQL scripts, applied in order, recorded in ``schema_version``.

Add a migration by appending a script; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 1: jobs, their events, trials, per-config results, idempotency keys
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        device TEXT NOT NULL,
        queue TEXT NOT NULL,
        model TEXT NOT NULL,
        spec_json TEXT NOT NULL,
        cache_key TEXT NOT NULL,
        allow_remote_code INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        configs_total INTEGER NOT NULL,
        configs_done INTEGER NOT NULL DEFAULT 0,
        trials_done INTEGER NOT NULL DEFAULT 0,
        current_json TEXT,
        error_json TEXT,
        model_facts_json TEXT,
        result_json TEXT,
        child_pid INTEGER,
        workdir TEXT
    );
    CREATE INDEX jobs_by_cache_key ON jobs (cache_key, status);
    CREATE INDEX jobs_by_status ON jobs (status, id);
    CREATE TABLE job_events (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data_json TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE trials (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        attempt INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        config_index INTEGER NOT NULL,
        precision TEXT NOT NULL,
        gradient_checkpointing INTEGER NOT NULL,
        phase TEXT,
        batch_size INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        peak_reserved_bytes INTEGER,
        peak_allocated_bytes INTEGER,
        step_seconds REAL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE configs (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        config_index INTEGER NOT NULL,
        precision TEXT NOT NULL,
        gradient_checkpointing INTEGER NOT NULL,
        status TEXT NOT NULL,
        max_batch_size INTEGER,
        first_failing_batch_size INTEGER,
        result_json TEXT NOT NULL,
        PRIMARY KEY (job_id, config_index)
    );
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        request_hash TEXT NOT NULL,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        created_at REAL NOT NULL
    );
    """,
    # 2: per-config rows were written and never read: a copy of what the result's ``configs`` and
    # the ``config_done`` events hold, and not kept per attempt (a re-run mixed attempts)
    """
    DROP TABLE configs;
    """,
    # 3: why a queued job waits, and the node a job ran on (the Ray dispatcher's fleet)
    """
    ALTER TABLE jobs ADD COLUMN queued_reason TEXT;
    ALTER TABLE jobs ADD COLUMN node TEXT;
    """,
    # 4: a succeeded job's answer (fit / no_fit, probes.verdict), so lists show it without parsing
    # results (earlier succeeded jobs answered fit when they had a recommendation); one row per
    # probe child run, so that the run counters and durations of /metrics survive a restart
    """
    ALTER TABLE jobs ADD COLUMN answer TEXT;
    UPDATE jobs SET answer = CASE
        WHEN json_extract(result_json, '$.recommendation') IS NOT NULL THEN 'fit' ELSE 'no_fit' END
        WHERE status = 'succeeded' AND result_json IS NOT NULL;
    CREATE TABLE probe_runs (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        status TEXT NOT NULL,
        seconds REAL,
        finished_at REAL NOT NULL
    );
    CREATE INDEX trials_by_outcome ON trials (outcome);
    """,
)


def schema_version(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(conn: sqlite3.Connection, *, upto: int | None = None) -> int:
    """Apply every migration above the recorded version (up to ``upto``, tests), each in its own
    transaction.

    Returns the version the database is at. A database newer than this code is refused.
    """
    current = schema_version(conn)
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"the store is at schema version {current}, newer than this maxbatch ({len(MIGRATIONS)})"
        )
    target = len(MIGRATIONS) if upto is None else upto
    for version, script in enumerate(MIGRATIONS[current:target], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return max(current, target)
