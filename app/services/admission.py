"""The checks a request passes before it may queue, all without a child process.

The operator's policy (remote code, the model root), the device (is it here, is it busy, is the
simulated cap within the service's) — the checks that need transformers run later, in the
model inspector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from app.errors import DeviceBusy, InvalidRequest, ModelPathForbidden, RemoteCodeForbidden
from app.inventory import GpuInfo
from app.settings import Settings
from probes.errors import DeviceUnavailable, ModelNotFound
from probes.gpus import check_card_request
from probes.spec import ProbeSpec
from probes.units import format_bytes


@dataclass(frozen=True, slots=True)
class Admitted:
    """The request as it will run (local paths resolved) and the GPU it names, if any."""

    spec: ProbeSpec
    gpu: GpuInfo | None


def looks_like_path(value: str, model_root: Path | None) -> bool:
    """Local path or hub id? Hub ids are ``name`` or ``org/name``; anything else is a path."""
    if value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or "\\" in value:
        return True
    if value.count("/") > 1:
        return True
    return model_root is not None and (model_root / value).exists()


def resolve_model_path(value: str, model_root: Path | None) -> Path:
    """The directory a local ``name_or_path`` names; it must lie inside the model root."""
    if model_root is None:
        raise ModelPathForbidden(
            f"{value!r} is a local path and local models are off: the operator sets MAXBATCH_MODEL_ROOT "
            "to the directory that holds them"
        )
    root = model_root.expanduser().resolve()
    candidate = Path(value).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise ModelPathForbidden(f"{value!r} is outside the model root; give a path under {root}")
    if not (resolved / "config.json").is_file():
        raise ModelNotFound(f"no config.json in {value!r} under the model root {root}")
    return resolved


def pids_in_groups(pids: list[int], groups: set[int]) -> set[int]:
    """The pids among ``pids`` whose process group is one of ``groups`` (our probes' groups)."""
    own: set[int] = set()
    for pid in pids if groups else ():
        try:
            if os.getpgid(pid) in groups:
                own.add(pid)
        except OSError:
            continue
    return own


def other_processes_memory(gpu: GpuInfo, own_pids: set[int]) -> int:
    """Bytes held on ``gpu`` by processes that are not this service's probes."""
    return sum(p.used_memory_bytes or 0 for p in gpu.processes if p.pid not in own_pids)


def admit(
    spec: ProbeSpec,
    settings: Settings,
    gpus: list[GpuInfo],
    *,
    own_pids: set[int],
    allow_busy_device: bool,
) -> Admitted:
    """Check ``spec`` against the operator's policy and this machine; raise the reason it cannot run."""
    model = spec.model
    if model.trust_remote_code and not settings.allow_remote_code:
        raise RemoteCodeForbidden(
            "model.trust_remote_code is set and this service does not run remote code "
            "(the operator can allow it with MAXBATCH_ALLOW_REMOTE_CODE=true)"
        )
    if model.name_or_path is not None and looks_like_path(model.name_or_path, settings.model_root):
        resolved = resolve_model_path(model.name_or_path, settings.model_root)
        spec = spec.model_copy(update={"model": model.model_copy(update={"name_or_path": str(resolved)})})
    gpu: GpuInfo | None = None
    if spec.device_kind == "cuda":
        gpu = next((g for g in gpus if g.device == spec.device), None)
        if gpu is None:
            known = ["simulated", "predict", *(g.device for g in gpus)]
            raise DeviceUnavailable(
                f"device {spec.device!r} is not on this machine; it offers {', '.join(known)}", known=known
            )
        if spec.memory_limit_bytes is not None and spec.memory_limit_bytes > gpu.total_memory_bytes:
            raise InvalidRequest(
                f"memory_limit_bytes ({format_bytes(spec.memory_limit_bytes)}) is more than {gpu.name} has "
                f"({format_bytes(gpu.total_memory_bytes)})"
            )
        busy = other_processes_memory(gpu, own_pids)
        if busy > settings.busy_memory_bytes and not allow_busy_device:
            raise DeviceBusy(
                f"{spec.device} ({gpu.name}) is in use: other processes hold {format_bytes(busy)}, so a "
                "probe would measure less than the GPU offers. Retry later, or pass "
                "allow_busy_device=true to probe what is left",
                pids=[p.pid for p in gpu.processes if p.pid not in own_pids],
            )
    if spec.device_kind == "predict":
        for card in spec.cards or ([spec.card] if spec.card is not None else []):
            check_card_request(card, spec.memory_limit_bytes)  # an unknown card: 422 listing the known ones
    if spec.device_kind == "simulated":
        limit = spec.memory_limit_bytes or 0
        if limit > settings.simulated_memory_bytes:
            raise InvalidRequest(
                f"memory_limit_bytes ({format_bytes(limit)}) is more than the simulated device offers "
                f"({format_bytes(settings.simulated_memory_bytes)}, MAXBATCH_SIMULATED_MEMORY_BYTES); "
                "use device 'predict' to plan for larger memory"
            )
    return Admitted(spec, gpu)
