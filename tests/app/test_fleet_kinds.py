"""GPU kinds without a cluster: NVML names, Ray node resources, matching, local placement and deadline."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from app.dispatch import DispatchJob, LocalDispatcher, RunOutcome, RunStatus, require_dispatcher
from app.dispatch.fleet import GpuKind, fleet_spelling, known_names, matching, nvml_gpu_type
from app.dispatch.ray_dispatcher import RayUnavailable, import_ray, kinds_of, read_node
from app.errors import GpuTypeUnavailable
from app.settings import Settings
from probes.gpu_types import GpuType
from probes.spec import ProbeEvent, ProbeSpec
from tests.app.conftest import FAKE_PROBE, FakeInventory, probe_body
from tests.app.fleets import LOCAL_GPUS

GIB = 1024**3


@pytest.mark.parametrize(
    ("name", "total", "kind"),
    [
        ("NVIDIA H100 80GB HBM3", 80 * GIB, "H100-80GB"),
        ("NVIDIA A100-SXM4-40GB", 40 * GIB, "A100-40GB"),
        ("NVIDIA A100-PCIE-80GB", 80 * GIB, "A100-80GB"),
        ("Tesla T4", 15 * GIB, "T4-16GB"),  # memory from the predict table's nearest card
        ("NVIDIA L4", 22 * GIB, "L4-24GB"),
        ("NVIDIA H200", 141 * GIB, "H200-141GB"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 96 * GIB, "RTX-PRO-6000-96GB"),
    ],
)
def test_nvml_names_read_as_gpu_types(name: str, total: int, kind: str) -> None:
    assert nvml_gpu_type(name, total).name == kind


def _node(
    node_id: str, gpus: int, free: int | None, *labels: str
) -> tuple[str, dict[str, float], dict[str, float] | None]:
    resources = {"CPU": 8.0, "GPU": float(gpus), **{f"accelerator_type:{label}": 1.0 for label in labels}}
    return node_id, resources, ({"GPU": float(free)} if free is not None else None)


def test_ray_nodes_group_into_kinds_by_their_accelerator_resources() -> None:
    nodes = [
        read_node(*_node("a", 8, 3, "A100", "A100-80G")),
        read_node(*_node("b", 8, 8, "A100-80G", "A100")),
        read_node(*_node("c", 4, 0, "A100")),  # memory not labelled
        read_node(*_node("d", 2, 1, "H100")),
        read_node(*_node("e", 0, None)),  # a CPU node
    ]
    assert nodes[0].resource == "accelerator_type:A100-80G"
    kinds = {k.name: k for k in kinds_of(nodes)}
    assert set(kinds) == {"A100-80GB", "A100", "H100"}
    assert (kinds["A100-80GB"].total, kinds["A100-80GB"].free, kinds["A100-80GB"].nodes) == (16, 11, 2)
    assert kinds["A100-80GB"].memory_bytes is not None  # from the predict table
    assert kinds["A100"].memory_bytes is None
    unknown_free = kinds_of([read_node(*_node("f", 2, None, "L4"))])
    assert unknown_free[0].free is None


def _kinds(*names: str) -> list[GpuKind]:
    kinds = []
    for name in names:
        model, _, memory = name.partition("-")
        kind = GpuType(model, int(memory.removesuffix("GB")) if memory else None)
        kinds.append(GpuKind(type=kind, total=1, free=1, nodes=1))
    return kinds


def test_matching_finds_kinds_and_the_422_lists_what_there_is() -> None:
    kinds = _kinds("A100-40GB", "A100", "H100-80GB")
    assert [k.name for k in matching("a100", kinds)] == ["A100-40GB", "A100"]
    assert [k.name for k in matching("A100-40GB", kinds)] == ["A100-40GB"]
    assert fleet_spelling("h100", kinds) == "H100"
    assert known_names(kinds) == ["A100", "A100-40GB", "H100", "H100-80GB"]
    with pytest.raises(GpuTypeUnavailable) as refused:
        matching("A100-80GB", kinds)
    assert refused.value.extensions["known"] == ["A100", "A100-40GB", "H100", "H100-80GB"]
    assert "A100 nodes do not say their memory" in refused.value.detail
    with pytest.raises(GpuTypeUnavailable, match="no GPU to place it on"):
        matching("H100", [])


def _spec(**overrides: object) -> ProbeSpec:
    return ProbeSpec.model_validate(probe_body(**overrides))


def test_local_placement_picks_the_least_busy_card_of_the_kind(tmp_path: Path) -> None:
    dispatcher = LocalDispatcher(
        [sys.executable, str(FAKE_PROBE)], tmp_path, timeout_seconds=60, inventory=FakeInventory(LOCAL_GPUS)
    )
    gpu = {"device": "gpu", "memory_limit_bytes": None}
    assert dispatcher.place(_spec(gpu_type="a100", **gpu)).queue == "cuda:2"
    first = dispatcher.place(_spec(gpu_type="H100-80GB", **gpu))
    assert (first.queue, first.spec.gpu_type) == ("cuda:0", "H100-80GB")
    assert dispatcher.place(_spec(gpu_type="h100")).queue == "cpu"  # simulated, on this machine's kind
    with pytest.raises(GpuTypeUnavailable):
        dispatcher.place(_spec(gpu_type="L4-24GB"))


class _Sink:
    def __init__(self) -> None:
        self.waiting: dict[str, str] = {}
        self.finished: dict[str, RunOutcome] = {}
        self.done = threading.Event()

    def job_waiting(self, job_id: str, reason: str) -> None:
        self.waiting[job_id] = reason

    def job_started(self, job_id: str, *, pid: int, workdir: Path, node: str | None = None) -> bool:
        return True

    def job_event(self, job_id: str, event: ProbeEvent) -> None:
        return None

    def job_finished(self, job_id: str, outcome: RunOutcome) -> None:
        self.finished[job_id] = outcome
        if job_id == "late":
            self.done.set()


def test_local_jobs_waiting_past_the_deadline_expire_with_their_reason(tmp_path: Path) -> None:
    dispatcher = LocalDispatcher(
        [sys.executable, str(FAKE_PROBE)], tmp_path, timeout_seconds=60, queue_deadline_seconds=0.5
    )
    sink = _Sink()
    dispatcher.start(sink)
    try:
        spec = _spec(fake="sleep").model_dump_json()
        dispatcher.submit(DispatchJob("holder", "cpu", spec))
        deadline = time.monotonic() + 30
        while dispatcher.running() != {"cpu": "holder"}:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        dispatcher.submit(DispatchJob("late", "cpu", _spec().model_dump_json()))
        assert sink.done.wait(30)
        assert "job holder is running there" in sink.waiting["late"]
        outcome = sink.finished["late"]
        assert (outcome.status, outcome.code) == (RunStatus.EXPIRED, "queue-timeout")
        assert "0.5 s" in (outcome.message or "")
    finally:
        dispatcher.stop()
    assert sink.finished["holder"].status is RunStatus.SHUTDOWN


def test_asking_for_ray_without_ray_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailable, match=r"pip install 'maxbatch\[ray\]'"):
        import_ray()
    with pytest.raises(RuntimeError, match=r"pip install 'maxbatch\[ray\]'"):
        require_dispatcher(Settings(_env_file=None, dispatcher="ray"))
    require_dispatcher(Settings(_env_file=None))


@pytest.mark.parametrize("spelling", ["", "0", "none", "OFF", "null"])
def test_the_queue_deadline_is_off_by_default_and_can_be_switched_off(
    spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().queue_deadline_seconds is None
    monkeypatch.setenv("MAXBATCH_QUEUE_DEADLINE_SECONDS", spelling)
    assert Settings().queue_deadline_seconds is None
    monkeypatch.setenv("MAXBATCH_QUEUE_DEADLINE_SECONDS", "900")
    assert Settings().queue_deadline_seconds == 900


@pytest.mark.parametrize("value", ["-5", "soon"])
def test_a_queue_deadline_that_is_no_duration_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAXBATCH_QUEUE_DEADLINE_SECONDS", value)
    with pytest.raises(ValueError, match="queue_deadline_seconds"):
        Settings()
