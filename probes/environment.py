"""Versions that a result records: maxbatch, Python, torch, transformers, CUDA and the NVIDIA driver.

Nothing here initialises CUDA: the driver version comes from NVML (``pynvml``), which talks to the
driver directly, and ``torch.version.cuda`` is the toolkit torch was built with.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import tomllib
from pathlib import Path

from probes.spec import Versions

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def package_version(name: str) -> str | None:
    """An installed distribution's version from its metadata (nothing is imported), else ``None``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def maxbatch_version() -> str:
    """The installed distribution's version, else the source tree's ``pyproject.toml``, else ``unknown``."""
    installed = package_version("maxbatch")
    if installed is not None:
        return installed
    try:
        with _PYPROJECT.open("rb") as handle:
            version = tomllib.load(handle).get("project", {}).get("version")
    except (OSError, tomllib.TOMLDecodeError):
        return "unknown"
    return version if isinstance(version, str) else "unknown"


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version through NVML, or ``None`` where there is no driver or no pynvml."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):  # no library, no driver loaded: no NVIDIA GPU here
        return None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
    except pynvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return version.decode() if isinstance(version, bytes) else str(version)


def collect_versions() -> Versions:
    """What this process runs with (torch and transformers from their modules where importable)."""
    torch_version: str | None
    cuda_version: str | None
    try:
        import torch

        torch_version = str(torch.__version__)
        cuda_version = torch.version.cuda
    except ImportError:
        torch_version = package_version("torch")
        cuda_version = None
    try:
        import transformers

        transformers_version: str | None = str(transformers.__version__)
    except ImportError:
        transformers_version = package_version("transformers")
    return Versions(
        maxbatch=maxbatch_version(),
        python=platform.python_version(),
        torch=torch_version,
        transformers=transformers_version,
        cuda=cuda_version,
        driver=nvidia_driver_version(),
    )
