"""Probe children: how each kind of end fails (or finishes) the job, and that the next job still runs."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.dispatch import DispatchJob, LocalDispatcher, RunOutcome, RunStatus
from app.main import create_app
from app.settings import Settings
from probes.spec import ProbeEvent
from tests.app.conftest import (
    FAKE_PROBE,
    FakeInventory,
    fake_gpu,
    probe_body,
    wait_done,
    wait_for_file,
    wait_status,
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_child_killed_by_sigkill_fails_the_job_as_crash_and_the_next_job_runs(client: TestClient) -> None:
    crashed = client.post("/v1/probes", json=probe_body(fake="sigkill")).json()["id"]
    job = wait_done(client, crashed)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "crash"
    assert "SIGKILL" in job["error"]["detail"]
    assert job["progress"]["trials_done"] == 1  # the trial it reported before dying was kept
    assert client.get("/readyz").json()["status"] == "ok"
    following = client.post("/v1/probes", json=probe_body(seq_len=32)).json()["id"]
    assert wait_done(client, following)["status"] == "succeeded"


def test_a_child_past_the_job_timeout_is_killed(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    # The timeout is the subject, so it bounds every run here, the quick follow-up job's too: 5 s
    # leaves that one (a fake child that answers at once) room on a loaded machine. wait_done's
    # deadline (30 s, far below the fake's hour-long sleep) is what proves the kill.
    with TestClient(create_app(settings_factory(job_timeout_seconds=5.0))) as client:
        job_id = client.post(
            "/v1/probes", json=probe_body(fake="sleep", config={"fake_pidfile": str(pidfile)})
        )
        job = wait_done(client, job_id.json()["id"])
        assert job["status"] == "failed"
        assert job["error"]["code"] == "timeout"
        assert "5 s" in job["error"]["detail"]
        assert not _alive(int(pidfile.read_text()))
        following = client.post("/v1/probes", json=probe_body(seq_len=32)).json()["id"]
        assert wait_done(client, following)["status"] == "succeeded"


@pytest.mark.parametrize(
    ("fake", "code", "detail"),
    [
        ("exit3", "probe-failed", "every trial crashed"),
        ("exit2", "sequence-too-long", "exceeds"),
        ("exit1", "crash", "boom from the fake probe"),
        ("noresult", "crash", "no readable result"),
    ],
)
def test_exit_codes_become_job_errors(client: TestClient, fake: str, code: str, detail: str) -> None:
    job = wait_done(client, client.post("/v1/probes", json=probe_body(fake=fake)).json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == code
    assert detail in job["error"]["detail"]
    assert job["result"] is None


def test_lines_that_are_not_events_are_tolerated(client: TestClient) -> None:
    job = wait_done(client, client.post("/v1/probes", json=probe_body(fake="garbage")).json()["id"])
    assert job["status"] == "succeeded"
    assert job["progress"]["trials_done"] == 8


def test_a_missing_probe_command_fails_the_job_not_the_service(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(probe_command=["/nonexistent/probe-engine"], inspect_models=False)
    with TestClient(create_app(settings)) as client:
        job = wait_done(client, client.post("/v1/probes", json=probe_body()).json()["id"])
        assert job["status"] == "failed"
        assert job["error"]["code"] == "crash"
        assert "could not start" in job["error"]["detail"]
        assert client.get("/readyz").status_code == 200


def test_different_gpus_run_side_by_side_and_one_gpu_runs_one_at_a_time(
    settings_factory: Callable[..., Settings],
) -> None:
    inventory = FakeInventory([fake_gpu(0), fake_gpu(1)])
    slow = {"fake_delay": 0.08}
    with TestClient(create_app(settings_factory(), inventory=inventory)) as client:
        ids = [
            client.post("/v1/probes", json=probe_body(device=d, seq_len=s, config=slow)).json()["id"]
            for d, s in (("cuda:0", 64), ("cuda:1", 64), ("cuda:0", 32))
        ]
        gpu0_first, gpu1, gpu0_second = (wait_done(client, job_id) for job_id in ids)
    assert all(j["status"] == "succeeded" for j in (gpu0_first, gpu1, gpu0_second))
    assert gpu1["started_at"] < gpu0_first["finished_at"]  # overlapped
    assert gpu0_second["started_at"] >= gpu0_first["finished_at"]  # waited


class _Sink:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.events: list[ProbeEvent] = []
        self.finished: dict[str, RunOutcome] = {}
        self.done = threading.Event()
        self.waiting: dict[str, str] = {}

    def job_waiting(self, job_id: str, reason: str) -> None:
        self.waiting[job_id] = reason

    def job_started(self, job_id: str, *, pid: int, workdir: Path, node: str | None = None) -> bool:
        self.started.append(job_id)
        return True

    def job_event(self, job_id: str, event: ProbeEvent) -> None:
        self.events.append(event)

    def job_finished(self, job_id: str, outcome: RunOutcome) -> None:
        self.finished[job_id] = outcome
        self.done.set()


def _spec_json(**overrides: object) -> str:
    from probes.spec import ProbeSpec

    return ProbeSpec.model_validate(probe_body(**overrides)).model_dump_json()


def test_stopping_the_dispatcher_kills_the_running_child_as_shutdown(tmp_path: Path) -> None:
    import sys

    pidfile = tmp_path / "pid"
    dispatcher = LocalDispatcher([sys.executable, str(FAKE_PROBE)], tmp_path / "jobs", timeout_seconds=60)
    sink = _Sink()
    dispatcher.start(sink)
    assert dispatcher.alive()
    dispatcher.submit(
        DispatchJob("job-a", "cpu", _spec_json(fake="sleep", config={"fake_pidfile": str(pidfile)}))
    )
    dispatcher.submit(DispatchJob("job-b", "cpu", _spec_json()))
    pid = int(wait_for_file(pidfile))
    assert dispatcher.running() == {"cpu": "job-a"}
    assert dispatcher.own_process_groups() == {pid}
    dispatcher.stop()
    assert sink.finished["job-a"].status is RunStatus.SHUTDOWN
    assert "job-b" not in sink.started  # left queued for the next start
    assert not _alive(pid)
    assert not dispatcher.alive()


def test_cancel_in_the_dispatcher(tmp_path: Path) -> None:
    import sys

    dispatcher = LocalDispatcher([sys.executable, str(FAKE_PROBE)], tmp_path / "jobs", timeout_seconds=60)
    sink = _Sink()
    dispatcher.start(sink)
    dispatcher.submit(DispatchJob("job-a", "cpu", _spec_json(fake="sleep")))
    dispatcher.submit(DispatchJob("job-b", "cpu", _spec_json()))
    assert dispatcher.cancel("job-b").value == "dequeued"
    assert dispatcher.cancel("nope").value == "unknown"
    deadline = time.monotonic() + 20
    while dispatcher.running() != {"cpu": "job-a"} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dispatcher.cancel("job-a").value == "signalled"
    assert sink.done.wait(20)
    assert sink.finished["job-a"].status is RunStatus.CANCELLED
    dispatcher.stop()
    assert "job-b" not in sink.started


def test_job_status_while_running_shows_progress(client: TestClient) -> None:
    job_id = client.post("/v1/probes", json=probe_body(fake="sleep")).json()["id"]
    job = wait_status(client, job_id, "running")
    assert job["attempts"] == 1
    deadline = time.monotonic() + 20
    while client.get(f"/v1/probes/{job_id}").json()["progress"]["current"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    current = client.get(f"/v1/probes/{job_id}").json()["progress"]["current"]
    assert current == {
        "precision": "32-true",
        "gradient_checkpointing": False,
        "strategy": "single",
        "config_index": 0,
        "phase": "search",
    }
    client.post(f"/v1/probes/{job_id}/cancel")


def _niceness(pid: int) -> int:
    """The process's nice value (field 19 of ``/proc/<pid>/stat``)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@contextmanager
def _spawning_probe(settings: Settings, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A running probe child that has started a grandchild: their pids; cancelled afterwards."""
    pidfile, grandchild = tmp_path / "child.pid", tmp_path / "grandchild.pid"
    body = probe_body(
        fake="spawn", config={"fake_pidfile": str(pidfile), "fake_grandchild_pidfile": str(grandchild)}
    )
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/probes", json=body).json()["id"]
        wait_status(client, job_id, "running")
        wait_for_file(grandchild)
        yield int(pidfile.read_text()), int(grandchild.read_text())
        client.post(f"/v1/probes/{job_id}/cancel")
        wait_done(client, job_id)


@pytest.mark.parametrize("probe_nice", [0, 10])
def test_probe_children_run_at_the_configured_cpu_priority(
    settings_factory: Callable[..., Settings], tmp_path: Path, probe_nice: int
) -> None:
    own = _niceness(os.getpid())
    with _spawning_probe(settings_factory(probe_nice=probe_nice), tmp_path) as (child, grandchild):
        expected = min(19, own + probe_nice)
        assert _niceness(child) == expected
        assert _niceness(grandchild) == expected  # started after: inherited
        assert _niceness(os.getpid()) == own  # the service itself keeps its priority


def _autogroup_nice(pid: int) -> int | None:
    """The nice value of the process's scheduler autogroup (``/autogroup-<n> nice <v>``); ``None``
    where the process's session has no autogroup of its own (the file is empty; seen in CI)."""
    fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    return int(fields[-1]) if fields else None


def _in_an_autogroup() -> bool:
    try:
        return _autogroup_nice(os.getpid()) is not None
    except OSError:
        return False


needs_autogroups = pytest.mark.skipif(
    not _in_an_autogroup(),
    reason="this process's session has no scheduler autogroup of its own",
)


@needs_autogroups
@pytest.mark.parametrize("probe_nice", [0, 10])
def test_a_probe_session_ranks_below_the_service_as_a_scheduler_group(
    settings_factory: Callable[..., Settings], tmp_path: Path, probe_nice: int
) -> None:
    """With autogroups a nice value weighs only inside its session: the probe's own session
    (its process group) carries the nice value as a whole."""
    own = _autogroup_nice(os.getpid())
    with _spawning_probe(settings_factory(probe_nice=probe_nice), tmp_path) as (child, grandchild):
        assert _autogroup_nice(child) == probe_nice
        assert _autogroup_nice(grandchild) == probe_nice  # one session, one group
        assert _autogroup_nice(os.getpid()) == own


_TWO_SESSIONS_AS_AN_UNPRIVILEGED_USER = """
import os, subprocess, sys
from app.dispatch.child import lower_session_priority
os.setgroups([])
os.setgid(int(sys.argv[1]))
os.setuid(int(sys.argv[1]))
sessions = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(2)]
try:
    for session in sessions:
        lower_session_priority(session.pid, 10)
    for session in sessions:
        print(open(f"/proc/{session.pid}/autogroup").read().split()[-1])
finally:
    for session in sessions:
        session.kill()
"""


@needs_autogroups
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an unprivileged user")
def test_two_probe_sessions_started_together_both_get_their_priority_without_privileges() -> None:
    """Without CAP_SYS_ADMIN the kernel takes one autogroup write per 100 ms on the machine and
    answers the next EAGAIN: the second of two probes started back to back still gets its value."""
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user 'nobody' to run as")
    done = subprocess.run(
        [sys.executable, "-c", _TWO_SESSIONS_AS_AN_UNPRIVILEGED_USER, str(nobody)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10", "10"]
