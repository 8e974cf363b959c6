"""The kinds of GPU a dispatcher can place probes on, and how a request's ``gpu_type`` finds one.

Both dispatchers describe what they have as :class:`GpuKind` values: the local one from NVML
(this machine's cards), the Ray one from the cluster's nodes. A request's ``gpu_type``
(:mod:`probes.gpu_types`) matches a kind by model and, when sized, by memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from app.errors import GpuTypeUnavailable
from app.inventory import GpuInfo
from probes.gpu_types import GpuType, parse_gpu_type
from probes.gpus import GPUS

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuKind:
    """One kind of GPU in the fleet, with how many there are and how many no probe or job holds."""

    type: GpuType
    total: int
    free: int | None
    nodes: int
    memory_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.type.name


def known_names(kinds: Iterable[GpuKind]) -> list[str]:
    """Every ``gpu_type`` the fleet answers to: its sized names and their bare models."""
    names: set[str] = set()
    for kind in kinds:
        names.add(kind.name)
        names.add(kind.type.model)
    return sorted(names, key=str.upper)


def matching(requested: str, kinds: Iterable[GpuKind]) -> list[GpuKind]:
    """The kinds that satisfy a request for ``requested``; 422 listing the fleet's types if none."""
    wanted = parse_gpu_type(requested)
    kinds = list(kinds)
    found = [kind for kind in kinds if wanted.matches(kind.type)]
    if found:
        return found
    known = known_names(kinds)
    have = f"it has {', '.join(known)}" if known else "there is no GPU to place it on"
    unsized = [
        k.name for k in kinds if k.type.memory_gb is None and k.type.model.upper() == wanted.model.upper()
    ]
    hint = (
        f"; {', '.join(unsized)} nodes do not say their memory (see docs/fleet.md, node labels), "
        f"ask for {wanted.model} to take any"
        if unsized
        else ""
    )
    raise GpuTypeUnavailable(f"no node has a {wanted.name}: {have}{hint}", known=known)


def fleet_spelling(requested: str, kinds: Iterable[GpuKind]) -> str:
    """``requested`` as the fleet spells it (the first matching kind's model, with the memory asked)."""
    wanted = parse_gpu_type(requested)
    model = matching(requested, kinds)[0].type.model
    return GpuType(model, wanted.memory_gb).name


# --- this machine's cards, as NVML names them ------------------------------------------------

_NVML_MODEL = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")
_NVML_MEMORY = re.compile(r"(\d+)\s*GB", re.IGNORECASE)


def nvml_gpu_type(name: str, total_memory_bytes: int) -> GpuType:
    """The kind an NVML card is: ``NVIDIA H100 80GB HBM3`` with 80 GiB → ``H100-80GB``.

    The model is read as Ray reads it (the first capitalised token with a digit: ``A100`` from
    ``NVIDIA A100-SXM4-40GB``); the memory from the name when it says it, else the predict
    table's card of that model nearest in memory, else the memory rounded to whole GiB.
    """
    found = _NVML_MODEL.match(name)
    model = (found.group(1) if found else name.removeprefix("NVIDIA ").strip()).replace(" ", "-")
    said = _NVML_MEMORY.search(name)
    if said is not None:
        return GpuType(model, int(said.group(1)))
    same_model = [g for g in GPUS if g.name.rpartition("-")[0].upper() == model.upper()]
    if same_model:
        nearest = min(same_model, key=lambda g: abs(g.memory_bytes - total_memory_bytes))
        return parse_gpu_type(nearest.name)
    return GpuType(model, round(total_memory_bytes / GIB))


def local_kinds(gpus: list[GpuInfo], busy_devices: set[str]) -> list[GpuKind]:
    """This machine's GPUs grouped by kind; a GPU running a probe (``busy_devices``) is not free."""
    groups: dict[str, list[GpuInfo]] = {}
    types: dict[str, GpuType] = {}
    for gpu in gpus:
        kind = nvml_gpu_type(gpu.name, gpu.total_memory_bytes)
        groups.setdefault(kind.name, []).append(gpu)
        types[kind.name] = kind
    return [
        GpuKind(
            type=types[name],
            total=len(members),
            free=sum(1 for g in members if g.device not in busy_devices),
            nodes=1,
            memory_bytes=min(g.total_memory_bytes for g in members),
        )
        for name, members in sorted(groups.items())
    ]


def local_gpus_of(requested: str, gpus: list[GpuInfo]) -> list[GpuInfo]:
    """This machine's GPUs that satisfy ``requested`` (in index order)."""
    wanted = parse_gpu_type(requested)
    return [g for g in gpus if wanted.matches(nvml_gpu_type(g.name, g.total_memory_bytes))]
