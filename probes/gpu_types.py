"""The names a request may give a kind of GPU (``gpu_type``), one vocabulary for the whole product.

Two forms, matched without regard to case:

- a **sized** name, ``MODEL-MEMORY``: every card of the predict table (``H100-80GB``,
  ``A100-40GB``, ``L4-24GB`` …, :mod:`probes.gpus`) and any other ``MODEL-<N>GB``
  (``H100-94GB``). It asks for that model *with that memory*.
- a **bare** model, Ray's accelerator type (``H100``, ``A100``, ``L4``, ``A10G``): any memory.

Pure data; imports no torch and no Ray, so the spec, the service and the CLI share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from probes.gpus import GPUS

_SEPARATORS = re.compile(r"[\s_]+")
_SIZED = re.compile(r"^(?P<model>[A-Z0-9][A-Z0-9.+-]*?)-(?P<gb>\d{1,4})\s*GB?$", re.IGNORECASE)
_BARE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$")
_TABLE = {gpu.name.upper(): gpu.name for gpu in GPUS}


@dataclass(frozen=True, slots=True)
class GpuType:
    """A parsed ``gpu_type``: the model (Ray's accelerator type) and, when sized, the memory in GB."""

    model: str
    memory_gb: int | None = None

    @property
    def name(self) -> str:
        """The canonical spelling: ``H100-80GB`` when sized, else the model."""
        return f"{self.model}-{self.memory_gb}GB" if self.memory_gb is not None else self.model

    def matches(self, other: GpuType) -> bool:
        """True when a card of kind ``other`` satisfies a request for ``self`` (case-insensitive)."""
        if self.model.upper() != other.model.upper():
            return False
        return self.memory_gb is None or self.memory_gb == other.memory_gb


def parse_gpu_type(value: str) -> GpuType:
    """``value`` read as a sized name or a bare model; ``ValueError`` says what is accepted."""
    text = _SEPARATORS.sub("-", value.strip())
    sized = _SIZED.match(text)
    if sized is not None:
        canonical = _TABLE.get(f"{sized['model']}-{int(sized['gb'])}GB".upper())
        if canonical is not None:
            model, _, memory = canonical.rpartition("-")
            return GpuType(model, int(memory.removesuffix("GB")))
        return GpuType(sized["model"].upper(), int(sized["gb"]))
    if _BARE.match(text) and not text.endswith("-"):
        return GpuType(_canonical_model(text))
    raise ValueError(
        f"gpu_type {value!r} is not a GPU type: write MODEL-MEMORY as in the predict table "
        f"(e.g. H100-80GB, A100-40GB) or a bare model (e.g. H100, A100)"
    )


def _canonical_model(text: str) -> str:
    """Table models in the table's case (``a100`` → ``A100``); others as written."""
    for name in _TABLE.values():
        model = name.rpartition("-")[0]
        if model.upper() == text.upper():
            return model
    return text


def normalise_gpu_type(value: str) -> str:
    """The canonical spelling of ``value`` (``h100_80gb`` → ``H100-80GB``, ``a100`` → ``A100``)."""
    return parse_gpu_type(value).name
