"""What makes two requests the same question: the cache key and the request hash (:func:`identify`).

The cache key covers everything that changes the answer: the whole normalised request, the
device's identity (name, total memory, compute capability) and the versions of maxbatch, torch,
transformers and the GPU driver. Versions come from package metadata, never from importing torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from app.inventory import GpuInfo
from probes.environment import package_version
from probes.spec import ProbeSpec


@dataclass(frozen=True, slots=True)
class SoftwareVersions:
    maxbatch: str | None
    torch: str | None
    transformers: str | None
    driver: str | None

    @classmethod
    def detect(cls, driver: str | None) -> SoftwareVersions:
        return cls(
            maxbatch=package_version("maxbatch"),
            torch=package_version("torch"),
            transformers=package_version("transformers"),
            driver=driver,
        )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """What a request is: ``request_hash`` for Idempotency-Key checks, ``cache_key`` for reuse."""

    request_hash: str
    cache_key: str


def identify(spec: ProbeSpec, gpu: GpuInfo | None, versions: SoftwareVersions) -> RequestIdentity:
    """Both identities of ``spec``, from one canonical rendering of it (keys sorted, so that two
    spellings of one ``model.config`` are one question)."""
    request = hashlib.sha256(_canonical(spec.model_dump(mode="json")).encode()).hexdigest()
    payload = {"request": request, "device": device_identity(spec, gpu), "versions": asdict(versions)}
    return RequestIdentity(
        request_hash=request, cache_key=hashlib.sha256(_canonical(payload).encode()).hexdigest()
    )


def device_identity(spec: ProbeSpec, gpu: GpuInfo | None) -> dict[str, Any]:
    if gpu is None:
        return {"kind": spec.device_kind}
    return {
        "kind": "cuda",
        "name": gpu.name,
        "total_memory_bytes": gpu.total_memory_bytes,
        "compute_capability": gpu.compute_capability,
    }
