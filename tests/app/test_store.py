"""The SQLite store: WAL, migrations, atomic submit (reuse rules), transitions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.schemas import JobStatus
from app.store import NewJob, Reuse, Store, TrialRow
from app.store.migrations import MIGRATIONS, migrate
from probes.spec import Outcome, Precision


def _new(job_id: str, key: str = "k1") -> NewJob:
    return NewJob(
        id=job_id,
        device="simulated",
        queue="cpu",
        model="gpt2",
        spec_json="{}",
        cache_key=key,
        allow_remote_code=False,
        configs_total=2,
    )


def _submit(
    store: Store,
    job_id: str,
    key: str = "k1",
    *,
    idem: str | None = None,
    body: str = "h1",
    cached: bool = True,
    max_queued: int = 10,
) -> tuple[str | None, Reuse]:
    record, reuse = store.submit(
        _new(job_id, key), idempotency_key=idem, request_hash=body, reuse_cached=cached, max_queued=max_queued
    )
    return (record.id if record else None), reuse


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "db.sqlite3")
    yield opened
    opened.close()


def test_wal_and_schema_version(store: Store, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    assert store.version == len(MIGRATIONS)


def test_migrate_is_idempotent_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
    assert migrate(conn) == len(MIGRATIONS)
    assert migrate(conn) == len(MIGRATIONS)
    conn.execute("INSERT INTO schema_version VALUES (999)")
    with pytest.raises(RuntimeError, match="newer"):
        migrate(conn)
    conn.close()


def test_rows_survive_reopening(tmp_path: Path) -> None:
    first = Store(tmp_path / "db.sqlite3")
    _submit(first, "a")
    first.add_event("a", "queued", {"reason": "x"})
    first.close()
    second = Store(tmp_path / "db.sqlite3")
    record = second.get("a")
    assert record is not None
    assert record.status is JobStatus.QUEUED
    assert [e.kind for e in second.events("a")] == ["queued"]
    second.close()


def test_submit_reuse_rules(store: Store) -> None:
    assert _submit(store, "a") == ("a", Reuse.CREATED)
    assert _submit(store, "b") == ("a", Reuse.COALESCED)  # same key while queued
    assert _submit(store, "c", key="k2") == ("c", Reuse.CREATED)
    store.mark_running("a", child_pid=1, workdir="/tmp/x")
    assert _submit(store, "d") == ("a", Reuse.COALESCED)  # same key while running
    store.finish("a", JobStatus.SUCCEEDED, result_json="{}")
    assert _submit(store, "e") == ("a", Reuse.CACHED)
    assert _submit(store, "f", cached=False) == ("f", Reuse.CREATED)


def test_failed_jobs_are_not_cached(store: Store) -> None:
    _submit(store, "a")
    store.finish("a", JobStatus.FAILED, error_json="{}")
    assert _submit(store, "b") == ("b", Reuse.CREATED)


def test_idempotency_keys(store: Store) -> None:
    assert _submit(store, "a", idem="key") == ("a", Reuse.CREATED)
    store.finish("a", JobStatus.FAILED)
    assert _submit(store, "b", idem="key") == ("a", Reuse.REPLAYED)  # even after failure: same job
    assert _submit(store, "c", idem="key", body="h2") == (None, Reuse.KEY_CONFLICT)
    assert store.get("c") is None


def test_queue_limit(store: Store) -> None:
    assert _submit(store, "a", key="1", max_queued=2)[1] is Reuse.CREATED
    assert _submit(store, "b", key="2", max_queued=2)[1] is Reuse.CREATED
    assert _submit(store, "c", key="3", max_queued=2) == (None, Reuse.QUEUE_FULL)
    assert _submit(store, "d", key="1", max_queued=2) == ("a", Reuse.COALESCED)  # reuse needs no room


def test_transitions(store: Store) -> None:
    _submit(store, "a")
    running = store.mark_running("a", child_pid=123, workdir="/w")
    assert running is not None
    assert running.attempts == 1
    assert running.child_pid == 123
    assert store.mark_running("a", child_pid=1, workdir="/w") is None  # not queued any more
    requeued = store.requeue("a")
    assert requeued is not None
    assert requeued.status is JobStatus.QUEUED
    assert requeued.attempts == 1
    store.mark_running("a", child_pid=124, workdir="/w")
    refunded = store.requeue("a", refund_attempt=True)
    assert refunded is not None
    assert refunded.attempts == 1
    store.mark_running("a", child_pid=125, workdir="/w")
    done = store.finish("a", JobStatus.CANCELLED)
    assert done is not None
    assert done.finished_at is not None
    assert done.child_pid is None
    assert store.finish("a", JobStatus.FAILED) is None  # terminal stays terminal


def test_page_newest_first(store: Store) -> None:
    for job_id in ("01", "02", "03", "04"):
        _submit(store, job_id, key=job_id)
    store.finish("02", JobStatus.FAILED)
    assert [r.id for r in store.page(limit=10)] == ["04", "03", "02", "01"]
    assert [r.id for r in store.page(limit=2, after="03")] == ["02", "01"]
    assert [r.id for r in store.page(limit=10, statuses=[JobStatus.FAILED])] == ["02"]
    assert store.count_by_status()[JobStatus.QUEUED] == 3
    assert store.queued_by_queue() == {"cpu": 3}


def _trial(batch_size: int, outcome: Outcome = Outcome.FIT) -> TrialRow:
    return TrialRow(
        config_index=0,
        precision=Precision.FP32,
        gradient_checkpointing=True,
        phase="search",
        batch_size=batch_size,
        outcome=outcome,
        peak_reserved_bytes=None,
        peak_allocated_bytes=1000 * batch_size,
        step_seconds=0.5,
    )


def test_trials_are_read_back_per_attempt_and_after_a_seq(store: Store) -> None:
    _submit(store, "a")
    store.mark_running("a", child_pid=1, workdir="/w")
    store.record_progress("a", current_json=None, trial=_trial(1))
    store.record_progress("a", current_json=None, trial=_trial(2, Outcome.OOM))
    store.requeue("a")
    store.mark_running("a", child_pid=2, workdir="/w")
    store.record_progress("a", current_json=None, trial=_trial(1))
    store.record_progress("a", current_json=None, config_done=True)
    trials = store.trials("a")
    assert [(t.seq, t.attempt, t.trial.batch_size, t.trial.outcome) for t in trials] == [
        (1, 1, 1, Outcome.FIT),
        (2, 1, 2, Outcome.OOM),
        (3, 2, 1, Outcome.FIT),
    ]
    assert trials[0].trial == _trial(1)
    assert [t.seq for t in store.trials("a", after_seq=2)] == [3]
    assert store.trials("nope") == []
    record = store.get("a")
    assert record is not None
    assert (record.trials_done, record.configs_done) == (1, 1)  # counted per attempt


def test_migration_2_drops_the_write_only_configs_table(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute(
        "INSERT INTO jobs (id, status, device, queue, model, spec_json, cache_key, created_at, configs_total)"
        " VALUES ('a', 'succeeded', 'simulated', 'cpu', 'gpt2', '{}', 'k', 0, 1)"
    )
    conn.execute("INSERT INTO configs VALUES ('a', 0, '32-true', 0, 'ok', 4, 8, '{}')")
    conn.close()
    store = Store(path)
    assert store.version == len(MIGRATIONS)
    assert store.get("a") is not None  # the jobs survive
    tables = {row[0] for row in store._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "configs" not in tables
    assert {"jobs", "job_events", "trials", "idempotency_keys"} <= tables
    store.close()


def test_migration_3_adds_queued_reason_and_node(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for script in MIGRATIONS[:2]:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (2)")
    conn.execute(
        "INSERT INTO jobs (id, status, device, queue, model, spec_json, cache_key, created_at, configs_total)"
        " VALUES ('a', 'queued', 'simulated', 'cpu', 'gpt2', '{}', 'k', 0, 1)"
    )
    conn.close()
    store = Store(path)
    record = store.get("a")
    assert record is not None
    assert (record.queued_reason, record.node) == (None, None)
    assert store.set_queued_reason("a", "waiting for a free H100-80GB")
    running = store.mark_running("a", child_pid=1, workdir="/w", node="n1")
    assert running is not None
    assert (running.queued_reason, running.node) == (None, "n1")
    requeued = store.requeue("a", reason="re-queued: the worker died")
    assert requeued is not None
    assert (requeued.queued_reason, requeued.node) == ("re-queued: the worker died", None)
    store.close()


def test_migration_4_gives_earlier_succeeded_jobs_their_answer(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, upto=3) == 3
    insert = (
        "INSERT INTO jobs (id, status, device, queue, model, spec_json, cache_key, created_at, configs_total,"
        " result_json) VALUES (?, ?, 'simulated', 'cpu', 'gpt2', '{}', ?, 0, 1, ?)"
    )
    conn.execute(insert, ("fit", "succeeded", "k1", '{"recommendation": {"precision": "32-true"}}'))
    conn.execute(insert, ("nofit", "succeeded", "k2", '{"recommendation": null}'))
    conn.execute(insert, ("failed", "failed", "k3", None))
    conn.close()
    store = Store(path)
    answers = {job: record.answer for job in ("fit", "nofit", "failed") if (record := store.get(job))}
    assert answers == {"fit": "fit", "nofit": "no_fit", "failed": None}
    store.close()


def test_a_read_row_is_held_until_the_next_write(store: Store) -> None:
    """``cached`` (the pollers' path, no lock) gives the row ``get`` read, and nothing once any
    write has committed: a client never reads a row older than a write it saw answered."""
    _submit(store, "a")
    assert store.cached("a") is None  # never read yet
    first = store.get("a")
    assert first is not None
    assert store.cached("a") is first
    assert store.get("a") is first  # no second query while nothing changed
    assert store.set_queued_reason("a", "waiting for the GPU")
    assert store.cached("a") is None
    again = store.get("a")
    assert again is not None
    assert again.queued_reason == "waiting for the GPU"
    store.add_event("a", "queued", {})  # a write of another table empties it too
    assert store.cached("a") is None
    assert store.get("missing") is None
    assert store.cached("missing") is None


def test_a_failed_write_keeps_nothing_stale(store: Store) -> None:
    _submit(store, "a")
    held = store.get("a")
    with pytest.raises(sqlite3.IntegrityError):
        store.submit(
            _new("a", key="k2"), idempotency_key=None, request_hash="h", reuse_cached=False, max_queued=10
        )
    assert store.cached("a") in (None, held)  # rolled back: the held row is still the stored one
    assert store.get("a") == held
