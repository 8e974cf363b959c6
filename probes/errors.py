"""Errors the probe engine raises for bad input (torch-free, so the service can catch them).

::

    ProbeError                     anything the engine reports instead of a result
    ├── ProbeInputError            the request cannot be probed as written (a 4xx for the API)
    │   ├── UnknownArchitecture    model.architecture names no causal-LM architecture
    │   ├── ModelNotFound          name_or_path is neither a local config nor a reachable hub id
    │   ├── RemoteCodeRefused      the config needs trust_remote_code and it was not allowed
    │   ├── SequenceTooLong        seq_len exceeds the model's position limit
    │   ├── TooManyLayers          more decoder layers than a trial can build
    │   ├── UnknownGpu             gpu names no card in the predict table
    │   └── DeviceUnavailable      the device asked for is not on this machine
    └── ProbeFailed                the probe ran and could not finish (child crash, timeout)
"""

from __future__ import annotations


class ProbeError(Exception):
    """Base of every error the engine reports; ``code`` is a stable machine-readable slug."""

    code = "probe-error"

    def __init__(self, message: str, *, known: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the accepted values, where the error is about a name (architectures, GPUs)
        self.known = known or []


class ProbeInputError(ProbeError):
    code = "invalid-probe"


class UnknownArchitecture(ProbeInputError):
    code = "unknown-architecture"


class ModelNotFound(ProbeInputError):
    code = "model-not-found"


class RemoteCodeRefused(ProbeInputError):
    code = "remote-code-refused"


class SequenceTooLong(ProbeInputError):
    code = "sequence-too-long"


class TooManyLayers(ProbeInputError):
    """The config asks for more decoder layers than a trial can build (:data:`probes.models.MAX_LAYERS`)."""

    code = "too-many-layers"


class UnknownGpu(ProbeInputError):
    code = "unknown-gpu"


class DeviceUnavailable(ProbeInputError):
    code = "device-unavailable"


class ProbeFailed(ProbeError):
    code = "probe-failed"


INPUT_ERRORS: dict[str, type[ProbeInputError]] = {
    cls.code: cls
    for cls in (
        ProbeInputError,
        UnknownArchitecture,
        ModelNotFound,
        RemoteCodeRefused,
        SequenceTooLong,
        TooManyLayers,
        UnknownGpu,
        DeviceUnavailable,
    )
}
"""Input errors by code: a child reports the code, the parent raises the same class."""
