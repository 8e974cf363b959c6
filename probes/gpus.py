"""The cards the ``predict`` device can stand for: memory and compute capability by name.

Pure data and a lookup; imports no torch, so the service can validate a request's ``gpu`` before it
queues anything (``lookup_gpu(name)`` raises :class:`~probes.errors.UnknownGpu`, whose ``known``
lists the names).

Names are written ``MODEL-MEMORY`` (``H100-80GB``, ``A100-40GB``, ``T4-16GB``) and matched without
regard to case; spaces and underscores count as dashes (``h100_80gb`` finds ``H100-80GB``).

``memory_bytes`` is the card's memory as the CUDA runtime reports it to torch
(``torch.cuda.get_device_properties(i).total_memory``, the "total capacity" in torch's
out-of-memory message), not the marketing figure: ECC and the driver keep a few hundred MiB
to a few GiB away from every process. The figures come from published printouts of
``get_device_properties`` and from the "total capacity" of published OOM messages; none was
measured on our hardware. Where variants of one card report different totals (SXM / PCIe,
driver versions), the table keeps the smallest seen, so a prediction errs towards a smaller
batch. The CUDA context and the allocator's own overhead come off this figure separately
(``probes.overhead``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from probes.errors import ProbeInputError, UnknownGpu

MiB = 1024**2

BF16_MIN_CAPABILITY = (8, 0)
"""Native bf16 arrives with compute capability 8.0 (Ampere)."""


@dataclass(frozen=True)
class Gpu:
    """One card in the table."""

    #: the canonical name, e.g. ``H100-80GB``
    name: str
    #: memory the CUDA runtime reports for the card (``total_memory``), in bytes
    memory_bytes: int
    #: ``(major, minor)``
    compute_capability: tuple[int, int]
    #: what the figure was read from
    source: str

    @property
    def capability_label(self) -> str:
        major, minor = self.compute_capability
        return f"{major}.{minor}"

    @property
    def bf16_supported(self) -> bool:
        return self.compute_capability >= BF16_MIN_CAPABILITY


def _mib(value: int) -> int:
    return value * MiB


_PRINTOUT = "torch get_device_properties printout"
_OOM = "total capacity in published torch OOM messages"

GPUS: tuple[Gpu, ...] = (
    Gpu("A100-40GB", _mib(40326), (8, 0), f"{_PRINTOUT}, A100-PCIE-40GB (SXM4 shows 40536 MiB)"),
    Gpu("A100-80GB", _mib(81049), (8, 0), f"{_OOM}: 79.15 GiB, A100 80GB"),
    Gpu("H100-80GB", _mib(81082), (9, 0), f"{_PRINTOUT}, H100 80GB HBM3 (81082-81090 MiB seen)"),
    Gpu("H200-141GB", _mib(143156), (9, 0), f"{_PRINTOUT}, NVIDIA H200"),
    Gpu("L4-24GB", _mib(22558), (8, 9), f"{_OOM}: 22.03 GiB"),
    Gpu("A10G-24GB", _mib(22587), (8, 6), f"{_PRINTOUT}, NVIDIA A10G"),
    Gpu("L40S-48GB", _mib(45589), (8, 9), f"{_PRINTOUT}, NVIDIA L40S"),
    Gpu("RTX4090-24GB", _mib(24207), (8, 9), f"{_OOM}: 23.64 GiB (printouts show up to 24563 MiB)"),
    Gpu("T4-16GB", _mib(15095), (7, 5), f"{_PRINTOUT}, Tesla T4 (15095-15109 MiB seen)"),
    Gpu("V100-16GB", _mib(16130), (7, 0), f"{_PRINTOUT}, Tesla V100-SXM2-16GB (16130-16160 MiB seen)"),
    Gpu("V100-32GB", _mib(32510), (7, 0), f"{_PRINTOUT}, Tesla V100-PCIE-32GB"),
)
"""Every card ``predict`` knows, in the order the error message lists them."""

_SEPARATORS = re.compile(r"[\s_]+")


def _key(name: str) -> str:
    return _SEPARATORS.sub("-", name.strip()).upper()


_BY_KEY: dict[str, Gpu] = {_key(gpu.name): gpu for gpu in GPUS}


def card_key(name: str) -> str:
    """What two spellings of one card share (``h100_80gb`` and ``H100-80GB``)."""
    return _key(name)


def canonical_gpu_name(name: str) -> str:
    """The table's spelling of ``name`` where the table knows it; else ``name`` without the
    surrounding spaces (left for :func:`lookup_gpu` to refuse with the known names)."""
    gpu = _BY_KEY.get(_key(name))
    return gpu.name if gpu is not None else name.strip()


def known_gpu_names() -> list[str]:
    """The canonical names, as the table lists them."""
    return [gpu.name for gpu in GPUS]


def lookup_gpu(name: str) -> Gpu:
    """The card ``name`` names (case-insensitive); :class:`UnknownGpu` if none (its ``known`` lists them all).

    The message gives two examples only: the CLI and the API print ``known`` after it.
    """
    gpu = _BY_KEY.get(_key(name))
    if gpu is None:
        known = known_gpu_names()
        raise UnknownGpu(
            f"unknown GPU {name!r}; write a card from the predict table as MODEL-MEMORY, "
            f"e.g. {known[2]} or {known[0]}",
            known=known,
        )
    return gpu


def check_card_request(name: str, memory_limit_bytes: int | None) -> Gpu:
    """The card a predict request names, checked against its memory limit (for the CLI and the API,
    so that a bad card is refused before anything runs)."""
    gpu = lookup_gpu(name)
    check_limit_fits(gpu, memory_limit_bytes)
    return gpu


def check_limit_fits(gpu: Gpu, memory_limit_bytes: int | None) -> None:
    """:class:`ProbeInputError` when the memory for tensors is more than the card has."""
    if memory_limit_bytes is not None and memory_limit_bytes > gpu.memory_bytes:
        raise ProbeInputError(
            f"memory_limit_bytes {memory_limit_bytes} exceeds the {gpu.name}'s memory "
            f"of {gpu.memory_bytes} bytes"
        )
