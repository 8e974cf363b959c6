"""What makes two requests the same question: the cache key and the request hash.

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


def request_hash(spec: ProbeSpec) -> str:
    """Identity of the request body alone (for Idempotency-Key checks)."""
    return hashlib.sha256(_canonical(spec.model_dump(mode="json")).encode()).hexdigest()


def device_identity(spec: ProbeSpec, gpu: GpuInfo | None) -> dict[str, Any]:
    if gpu is None:
        return {"kind": spec.device_kind}
    return {
        "kind": "cuda",
        "name": gpu.name,
        "total_memory_bytes": gpu.total_memory_bytes,
        "compute_capability": gpu.compute_capability,
    }


def cache_key(spec: ProbeSpec, gpu: GpuInfo | None, versions: SoftwareVersions) -> str:
    """Two requests with the same key get the same answer (so a finished result can be reused)."""
    payload = {
        "spec": spec.model_dump(mode="json"),
        "device": device_identity(spec, gpu),
        "versions": asdict(versions),
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()
