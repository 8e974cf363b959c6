"""NVML inventory (against a stand-in pynvml), /v1/devices, busy GPUs, readiness."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.inventory import NvmlInventory, visible_order
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import GIB, FakeInventory, assert_problem, fake_gpu, probe_body, wait_done


class _NVMLError(Exception):
    pass


def _fake_pynvml(*, fail_init: bool = False) -> types.ModuleType:
    """A pynvml with two GPUs: an A100 with one foreign process, a V100 idle."""
    module = types.ModuleType("pynvml")
    gpus: list[dict[str, Any]] = [
        {
            "name": b"NVIDIA A100-SXM4-40GB",
            "uuid": "GPU-aaaa",
            "total": 40 * GIB,
            "used": 3 * GIB,
            "cc": (8, 0),
            "procs": [types.SimpleNamespace(pid=4242, usedGpuMemory=3 * GIB)],
        },
        {
            "name": "Tesla V100-SXM2-16GB",
            "uuid": "GPU-bbbb",
            "total": 16 * GIB,
            "used": 0,
            "cc": (7, 0),
            "procs": [],
        },
    ]
    calls: dict[str, int] = {"init": 0, "shutdown": 0}

    def init() -> None:
        calls["init"] += 1
        if fail_init:
            raise _NVMLError("NVML Shared Library Not Found")

    def memory(handle: int) -> Any:
        g = gpus[handle]
        return types.SimpleNamespace(total=g["total"], used=g["used"], free=g["total"] - g["used"])

    def graphics(handle: int) -> list[Any]:
        raise _NVMLError("Not Supported")

    module.NVMLError = _NVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)  # type: ignore[attr-defined]
    module.nvmlSystemGetDriverVersion = lambda: "560.35.03"  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda h: gpus[h]["uuid"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: gpus[h]["name"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    module.nvmlDeviceGetCudaComputeCapability = lambda h: gpus[h]["cc"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetComputeRunningProcesses = lambda h: gpus[h]["procs"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetGraphicsRunningProcesses = graphics  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


def test_nvml_inventory_reads_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    inventory = NvmlInventory()
    assert inventory.state == "ok"
    a100, v100 = inventory.gpus()
    assert (a100.device, a100.name, a100.uuid, a100.compute_capability) == (
        "cuda:0",
        "NVIDIA A100-SXM4-40GB",
        "GPU-aaaa",
        "8.0",
    )
    assert a100.total_memory_bytes == 40 * GIB
    assert a100.free_memory_bytes == 37 * GIB
    assert a100.bf16_supported
    assert not v100.bf16_supported
    assert [(p.pid, p.used_memory_bytes) for p in a100.processes] == [(4242, 3 * GIB)]
    assert inventory.driver_version() == "560.35.03"
    inventory.close()
    assert fake.calls == {"init": 1, "shutdown": 1}


def test_nvml_inventory_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpus = NvmlInventory().gpus()
    assert [(g.device, g.nvml_index, g.uuid) for g in gpus] == [("cuda:0", 1, "GPU-bbbb")]


@pytest.mark.parametrize(
    ("visible", "order"),
    [
        (None, [0, 1, 2]),
        ("2,0", [2, 0]),
        ("GPU-b", [1]),
        ("", []),
        ("0,7,1", [0]),
        ("1,1", [1]),
        ("GPU-c,0", [2, 0]),
    ],
)
def test_visible_order(visible: str | None, order: list[int]) -> None:
    assert visible_order([(0, "GPU-a1"), (1, "GPU-b2"), (2, "GPU-c3")], visible) == order


def test_without_nvml_the_inventory_is_empty_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    inventory = NvmlInventory()
    assert inventory.state == "unavailable"
    assert "Shared Library Not Found" in (inventory.error or "")
    assert inventory.gpus() == []
    assert inventory.driver_version() is None


def test_devices_without_gpus_offer_simulated_and_predict(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory(simulated_memory_bytes=2 * GIB))) as client:
        listing = client.get("/v1/devices").json()
    assert [d["device"] for d in listing["devices"]] == ["simulated", "predict"]
    assert listing["devices"][0]["total_memory_bytes"] == 2 * GIB
    assert listing["nvml"] == "off"


def test_devices_list_gpus_from_nvml(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with TestClient(create_app(settings_factory(nvml="on"))) as client:
        listing = client.get("/v1/devices").json()
        assert client.get("/readyz").json()["checks"]["nvml"] == "ok"
    assert listing["nvml"] == "ok"
    assert listing["driver_version"] == "560.35.03"
    a100 = listing["devices"][2]["gpu"]
    assert listing["devices"][2]["device"] == "cuda:0"
    assert a100["busy"] is True
    assert a100["other_processes"] == [{"pid": 4242, "used_memory_bytes": 3 * GIB}]
    assert listing["devices"][3]["gpu"]["busy"] is False


def test_required_nvml_missing_makes_readyz_503(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    with TestClient(create_app(settings_factory(nvml="on"))) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "required" in response.json()["checks"]["nvml"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/devices").json()["nvml_error"]


def test_a_busy_gpu_is_409_unless_allowed(settings_factory: Callable[..., Settings]) -> None:
    inventory = FakeInventory([fake_gpu(0, other_bytes=4 * GIB)])
    with TestClient(create_app(settings_factory(), inventory=inventory)) as client:
        body = probe_body(device="cuda:0", memory_limit_bytes=None)
        problem = assert_problem(client.post("/v1/probes", json=body), 409, "device-busy")
        assert "allow_busy_device" in problem["detail"]
        assert problem["pids"] == [999_999]
        response = client.post("/v1/probes", json=body, params={"allow_busy_device": "true"})
        assert response.status_code == 202
        assert wait_done(client, response.json()["id"])["status"] == "succeeded"


def test_a_little_foreign_memory_is_not_busy(settings_factory: Callable[..., Settings]) -> None:
    inventory = FakeInventory([fake_gpu(0, other_bytes=100 * 1024**2)])
    with TestClient(create_app(settings_factory(), inventory=inventory)) as client:
        body = probe_body(device="cuda:0", memory_limit_bytes=None)
        assert client.post("/v1/probes", json=body).status_code == 202


def test_cuda_memory_limit_beyond_the_gpu_is_422(settings_factory: Callable[..., Settings]) -> None:
    inventory = FakeInventory([fake_gpu(0, total=16 * GIB)])
    with TestClient(create_app(settings_factory(), inventory=inventory)) as client:
        body = probe_body(device="cuda:0", memory_limit_bytes=32 * GIB)
        assert_problem(client.post("/v1/probes", json=body), 422)


def test_cache_key_covers_the_device_identity(settings_factory: Callable[..., Settings]) -> None:
    inventory = FakeInventory([fake_gpu(0)])
    body = probe_body(device="cuda:0", memory_limit_bytes=None)
    with TestClient(create_app(settings_factory(), inventory=inventory)) as client:
        first = client.post("/v1/probes", json=body).json()["id"]
        wait_done(client, first)
        assert client.post("/v1/probes", json=body).json()["cached"] is True
        inventory.gpu_list = [fake_gpu(0, total=40 * GIB)]  # another card in the same slot
        other = client.post("/v1/probes", json=body)
        assert other.status_code == 202
        assert other.json()["id"] != first
