"""maxbatch's probe engine: measure the largest batch size that trains, per precision and checkpointing.

Public API (torch-free to import; trials run in child processes)::

    from probes import ModelSpec, ProbeSpec, run_probe
    result = run_probe(ProbeSpec(model=ModelSpec(architecture="gpt2", config={"n_layer": 2}),
                                 seq_len=128, target_effective_batch_size=256,
                                 device="simulated", memory_limit_bytes=320 << 20))

``run_request`` takes any request, one that compares cards on ``predict`` (``gpu`` a list) too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from probes.errors import ProbeError, ProbeFailed, ProbeInputError
from probes.notices import drop_optional_kernel_notices
from probes.spec import (
    ConfigResult,
    ConfigStatus,
    DeviceInfo,
    ModelSpec,
    Outcome,
    Plan,
    Precision,
    ProbeEvent,
    ProbeResult,
    ProbeSpec,
    Recommendation,
    TrialRecord,
)

if TYPE_CHECKING:
    from probes.cards import run_request
    from probes.engine import run_probe

drop_optional_kernel_notices()  # before anything here imports transformers (and through it bitsandbytes)

__all__ = [
    "ConfigResult",
    "ConfigStatus",
    "DeviceInfo",
    "ModelSpec",
    "Outcome",
    "Plan",
    "Precision",
    "ProbeError",
    "ProbeEvent",
    "ProbeFailed",
    "ProbeInputError",
    "ProbeResult",
    "ProbeSpec",
    "Recommendation",
    "TrialRecord",
    "run_probe",
    "run_request",
]


def __getattr__(name: str) -> Any:
    # The engine pulls in the search and the process machinery: load it on first use.
    if name == "run_probe":
        from probes.engine import run_probe

        return run_probe
    if name == "run_request":
        from probes.cards import run_request

        return run_request
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
