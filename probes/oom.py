"""Which exceptions mean "out of memory", and which leave the CUDA context unusable.

The order of the checks, most trusted first:

1. the typed error: ``torch.OutOfMemoryError`` (raised by the CUDA caching allocator, and by our
   simulated device with the same kind of message);
2. ``torch.AcceleratorError`` whose ``error_code`` is 2, ``cudaErrorMemoryAllocation``: a CUDA
   runtime call outside the caching allocator ran out of memory (torch >= 2.8 raises these as
   ``AcceleratorError`` and sets ``error_code`` on the Python object);
3. message fragments, each sourced below, for errors that reach Python as a plain ``RuntimeError``.

A fragment is matched only against the exception's own message (not its cause chain), so a
``RuntimeError`` that says "memory" in another sense ("memory format", "non-contiguous memory")
is never taken for an OOM.
"""

from __future__ import annotations

import re

import torch

from probes.spec import Outcome

CUDA_ERROR_MEMORY_ALLOCATION = 2
"""``cudaErrorMemoryAllocation``: the CUDA runtime could not allocate enough memory."""

OOM_FRAGMENTS: tuple[str, ...] = (
    # The caching allocator's message ("CUDA out of memory. Tried to allocate …"; older torch raised it as
    # a plain RuntimeError), the CUDA runtime's "CUDA error: out of memory" (cudaErrorMemoryAllocation when
    # it reaches Python untyped), ROCm's "HIP out of memory" and "MPS backend out of memory". Matched by
    # Lightning (utilities/memory.py is_cuda_out_of_memory), Accelerate (utils/memory.py
    # should_reduce_batch_size) and torch-max-mem (api.py ADDITIONAL_OOM_ERROR_INFIXES).
    "out of memory",
    # cuBLAS could not allocate its handle or workspace: "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling
    # `cublasCreate(handle)`" (the first matmul after the allocator has taken nearly all memory; reported in
    # many issue trackers, e.g. QwenLM/Qwen3#873, JDAI-CV/fast-reid#625).
    "CUBLAS_STATUS_ALLOC_FAILED",
    # cuDNN refuses an input too large for its workspace: "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error
    # may appear if you passed in a non-contiguous input." Lightning's is_cudnn_snafu, Accelerate's
    # should_reduce_batch_size and torch-max-mem all treat it as a reason to shrink the batch (pytorch#4107).
    "CUDNN_STATUS_NOT_SUPPORTED",
    # cuSOLVER fails internally when its workspace cannot be allocated (linalg ops on a full device); the
    # PaddlePaddle and CUDA.jl trackers trace it to exhausted GPU memory.
    "CUSOLVER_STATUS_INTERNAL_ERROR",
    # Assertions inside the caching allocator after a failed allocation, e.g. with expandable segments
    # ("INTERNAL ASSERT FAILED at c10/cuda/CUDACachingAllocator.cpp", pytorch#119452, pytorch#188008).
    # Such a process is also discarded: see POISON_FRAGMENTS.
    "CUDACachingAllocator.cpp",
)
"""Substrings of an exception message that mean the device ran out of memory."""

STICKY_CUDA_ERROR_CODES: frozenset[int] = frozenset(
    {
        214,  # cudaErrorECCUncorrectable
        700,  # cudaErrorIllegalAddress
        702,  # cudaErrorLaunchTimeout
        710,  # cudaErrorAssert (device-side assert)
        714,  # cudaErrorHardwareStackError
        715,  # cudaErrorIllegalInstruction
        716,  # cudaErrorMisalignedAddress
        717,  # cudaErrorInvalidAddressSpace
        718,  # cudaErrorInvalidPc
        719,  # cudaErrorLaunchFailure
    }
)
"""CUDA errors that the CUDA documentation calls sticky: every later call in the process fails too."""

POISON_FRAGMENTS: tuple[str, ...] = (
    # The message texts of the sticky errors above (cudaGetErrorString), as torch prints them after
    # "CUDA error: ".
    "an illegal memory access was encountered",
    "CUDA error: an illegal",  # "… an illegal instruction was encountered" as well
    "device-side assert triggered",
    "unspecified launch failure",
    "misaligned address",
    "uncorrectable ECC error",
    "the launch timed out and was terminated",
    "hardware stack error",
    "invalid program counter",
    # The caching allocator's own state may be broken after one of its assertions (pytorch#188008).
    "CUDACachingAllocator.cpp",
)
"""Substrings of a message that mean the CUDA context (or the allocator) can no longer be trusted."""


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else ""


def _accelerator_error_code(exc: BaseException) -> int | None:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is None or not isinstance(exc, accelerator_error):
        return None
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, int) else None


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (see the module docstring for the order)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    code = _accelerator_error_code(exc)
    if code is not None:
        return code == CUDA_ERROR_MEMORY_ALLOCATION
    if not isinstance(exc, RuntimeError):
        return False
    message = _message(exc)
    return any(fragment in message for fragment in OOM_FRAGMENTS)


def poisons_context(exc: BaseException) -> bool:
    """Whether the process that saw ``exc`` must be discarded (its CUDA context is unusable)."""
    code = _accelerator_error_code(exc)
    if code is not None and code in STICKY_CUDA_ERROR_CODES:
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = _message(exc)
    return any(fragment in message for fragment in POISON_FRAGMENTS)


def classify(exc: BaseException) -> Outcome:
    """The trial outcome an exception means: ``OOM`` or ``ERROR``."""
    return Outcome.OOM if is_out_of_memory(exc) else Outcome.ERROR


def one_line(exc: BaseException, *, limit: int = 500) -> str:
    """The exception as one short line: ``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


_TRIED = re.compile(r"Tried to allocate (\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)")
_ALLOCATED = re.compile(
    r"Of the allocated memory (\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB) is allocated by PyTorch"
)
_BINARY = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def needed_at_least(message: str) -> int | None:
    """From the CUDA caching allocator's OOM message: allocated + requested bytes, rounded down.

    The allocator prints both with two decimals; each is read as the smallest value that prints
    so, so the sum is a lower bound of what the step needed. ``None`` when the message lacks them.
    """
    tried, allocated = _TRIED.search(message), _ALLOCATED.search(message)
    if tried is None or allocated is None:
        return None
    total = 0.0
    for match in (tried, allocated):
        unit = _BINARY[match.group(2)]
        total += max(float(match.group(1)) - (0.005 if unit > 1 else 0.0), 0.0) * unit
    return int(total)
