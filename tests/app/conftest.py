"""Fixtures for the service tests: settings that run the fake probe child, a client, helpers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.inventory import GpuInfo, GpuProcessInfo, NvmlState
from app.main import create_app
from app.settings import Settings

FAKE_PROBE = Path(__file__).with_name("fake_probe.py")
GIB = 1024**3


def probe_body(**overrides: Any) -> dict[str, Any]:
    """A valid request for the simulated device; ``fake`` picks the fake child's behaviour."""
    fake = overrides.pop("fake", None)
    config: dict[str, Any] = {"n_layer": 2, "n_embd": 64, "n_head": 2}
    config.update(overrides.pop("config", {}))
    if fake is not None:
        config["fake"] = fake
    body: dict[str, Any] = {
        "model": {"architecture": "gpt2", "config": config},
        "seq_len": 64,
        "precisions": ["32-true"],
        "gradient_checkpointing": [False, True],
        "target_effective_batch_size": 64,
        "device": "simulated",
        "memory_limit_bytes": 64 * 1024**2,
    }
    body.update(overrides)
    return body


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAXBATCH_* from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("MAXBATCH_"):
            monkeypatch.delenv(name)


@pytest.fixture
def run_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each fake child appends ``run <job> <behaviour>`` / ``inspect <model>`` here."""
    path = tmp_path / "runs.log"
    path.touch()
    monkeypatch.setenv("MAXBATCH_FAKE_RUN_LOG", str(path))
    return path


def runs(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("run ")]


def inspections(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("inspect ")]


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "nvml": "off",
        "probe_command": [sys.executable, str(FAKE_PROBE)],
        "inspect_timeout_seconds": 10,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings_factory(tmp_path: Path, run_log: Path) -> Callable[..., Settings]:
    return lambda **overrides: make_settings(tmp_path / "data", **overrides)


@pytest.fixture
def client(settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_factory())) as test_client:
        yield test_client


def wait_done(
    client: TestClient, job_id: str, timeout: float = 30, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The job once it is terminal (long-polls; fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/probes/{job_id}", params={"wait": 5}, headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")


def wait_status(client: TestClient, job_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/probes/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {status}: {job}")


def wait_for_file(path: Path, timeout: float = 20) -> str:
    """The file's text once it has some."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout} s")


def wait_gone(pid: int, timeout: float = 20) -> None:
    """Return once process ``pid`` has exited (gone, or a zombie nobody reaped yet): a SIGKILL sent
    to a process group is delivered asynchronously, so a killed process may still run briefly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs {timeout} s after it was killed")


def assert_problem(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    for member in ("type", "title", "status", "detail", "instance", "code"):
        assert member in problem, problem
    assert problem["status"] == status
    if code is not None:
        assert problem["code"] == code, problem
    return problem


class FakeInventory:
    """An NVML stand-in: the GPUs given, read on every call."""

    state: NvmlState = "ok"
    error: str | None = None

    def __init__(self, gpus: list[GpuInfo] | None = None) -> None:
        self.gpu_list = gpus or []

    def gpus(self) -> list[GpuInfo]:
        return list(self.gpu_list)

    def driver_version(self) -> str | None:
        return "560.35.03"

    def close(self) -> None:
        return None


def fake_gpu(index: int = 0, *, other_bytes: int = 0, total: int = 80 * GIB) -> GpuInfo:
    processes = (GpuProcessInfo(pid=999_999, used_memory_bytes=other_bytes),) if other_bytes else ()
    return GpuInfo(
        index=index,
        nvml_index=index,
        uuid=f"GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd",
        name="NVIDIA H100 80GB HBM3",
        total_memory_bytes=total,
        used_memory_bytes=other_bytes,
        free_memory_bytes=total - other_bytes,
        compute_capability="9.0",
        processes=processes,
    )
