"""OOM classification: every class, every fragment, and the near misses that must stay errors."""

from __future__ import annotations

import pytest
import torch

from probes.devices.counting import out_of_memory_message
from probes.oom import (
    CUDA_ERROR_MEMORY_ALLOCATION,
    OOM_FRAGMENTS,
    POISON_FRAGMENTS,
    STICKY_CUDA_ERROR_CODES,
    classify,
    is_out_of_memory,
    one_line,
    poisons_context,
)
from probes.spec import Outcome


def accelerator_error(message: str, code: int) -> BaseException:
    exc = torch.AcceleratorError(message)
    exc.error_code = code  # type: ignore[attr-defined]  # torch sets this attribute on raised errors
    return exc


def test_typed_out_of_memory_error_is_oom() -> None:
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert is_out_of_memory(exc)
    assert classify(exc) is Outcome.OOM
    assert not poisons_context(exc)


def test_typed_error_counts_whatever_its_message() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("no words about memory at all"))


def test_cuda_alias_of_the_typed_error() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))


def test_accelerator_error_with_memory_allocation_code_is_oom() -> None:
    exc = accelerator_error("CUDA error: out of memory", CUDA_ERROR_MEMORY_ALLOCATION)
    assert is_out_of_memory(exc)
    assert classify(exc) is Outcome.OOM
    assert not poisons_context(exc)


def test_accelerator_error_with_another_code_is_not_oom_even_if_the_text_says_so() -> None:
    # The code is trusted over the words: code 1 is cudaErrorInvalidValue.
    exc = accelerator_error("CUDA error: out of memory (misreported)", 1)
    assert not is_out_of_memory(exc)
    assert classify(exc) is Outcome.ERROR


@pytest.mark.parametrize(
    "message",
    [
        # the caching allocator's wording (pre-typed torch raised it as RuntimeError)
        "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)",
        # the CUDA runtime's wording for cudaErrorMemoryAllocation
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
        "HIP out of memory. Tried to allocate 1.00 GiB",
        "MPS backend out of memory (MPS allocated: 1.00 GB)",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous "
        "input.",
        "cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR, when calling `cusolverDnCreate(handle)`",
        'block->expandable_segment_ INTERNAL ASSERT FAILED at "../c10/cuda/CUDACachingAllocator.cpp":2814',
    ],
)
def test_runtime_error_fragments_are_oom(message: str) -> None:
    exc = RuntimeError(message)
    assert is_out_of_memory(exc)
    assert classify(exc) is Outcome.OOM


def test_every_fragment_is_exercised_by_a_message() -> None:
    # Each fragment on its own, embedded in other words, is recognised.
    for fragment in OOM_FRAGMENTS:
        assert is_out_of_memory(RuntimeError(f"something failed: {fragment} (details)")), fragment


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("Expected a tensor with contiguous memory format, got channels_last"),
        RuntimeError("unsupported memory format option: torch.preserve_format"),
        RuntimeError("non-contiguous memory is not supported for this operation"),
        RuntimeError("shape '[4, -1]' is invalid for input of size 10"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes"),
        ValueError("out of memory"),  # a ValueError is no device error, whatever it says
        MemoryError(),
        KeyError("CUDA out of memory."),
        RuntimeError(),
    ],
)
def test_other_errors_are_not_oom(exc: BaseException) -> None:
    assert not is_out_of_memory(exc)
    assert classify(exc) is Outcome.ERROR


def test_cause_chain_is_not_consulted() -> None:
    # A wrapper that merely mentions an OOM in its cause is not itself an OOM.
    outer = RuntimeError("the data loader failed")
    outer.__cause__ = torch.OutOfMemoryError("CUDA out of memory.")
    assert not is_out_of_memory(outer)


def test_simulated_message_is_recognised_by_accelerate_style_matchers() -> None:
    message = out_of_memory_message(2 * 2**20, 300 * 2**20, 320 * 2**20)
    exc = torch.OutOfMemoryError(message)
    # Accelerate's should_reduce_batch_size: a RuntimeError with one argument containing this phrase.
    assert isinstance(exc, RuntimeError)
    assert len(exc.args) == 1
    assert "CUDA out of memory." in exc.args[0]
    # Lightning's is_cuda_out_of_memory: "CUDA" and "out of memory" in the only argument.
    assert "CUDA" in exc.args[0]
    assert "out of memory" in exc.args[0]
    assert is_out_of_memory(RuntimeError(message))


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: an illegal instruction was encountered",
        "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`",
        "CUDA error: unspecified launch failure",
        "CUDA error: misaligned address",
        "CUDA error: uncorrectable ECC error encountered",
        "CUDA error: the launch timed out and was terminated",
        "CUDA error: hardware stack error",
        "CUDA error: invalid program counter",
    ],
)
def test_sticky_cuda_errors_poison_and_are_errors(message: str) -> None:
    exc = RuntimeError(message)
    assert poisons_context(exc)
    assert classify(exc) is Outcome.ERROR


def test_every_poison_fragment_poisons() -> None:
    for fragment in POISON_FRAGMENTS:
        assert poisons_context(RuntimeError(f"x {fragment} y")), fragment


@pytest.mark.parametrize("code", sorted(STICKY_CUDA_ERROR_CODES))
def test_sticky_accelerator_error_codes_poison(code: int) -> None:
    exc = accelerator_error("CUDA error: something", code)
    assert poisons_context(exc)
    assert classify(exc) is Outcome.ERROR


def test_allocator_assertion_is_oom_and_poisons() -> None:
    exc = RuntimeError('!handles_.at(i) INTERNAL ASSERT FAILED at "c10/cuda/CUDACachingAllocator.cpp":487')
    assert is_out_of_memory(exc)
    assert poisons_context(exc)


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"),
        ValueError("an illegal memory access was encountered"),
    ],
)
def test_ordinary_errors_do_not_poison(exc: BaseException) -> None:
    assert not poisons_context(exc)


def test_one_line_keeps_the_type_and_first_line() -> None:
    exc = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    assert one_line(exc) == "RuntimeError: CUDA error: out of memory"
    assert one_line(ValueError()) == "ValueError"
    long = one_line(RuntimeError("x" * 1000), limit=50)
    assert len(long) == 50
    assert long.endswith("…")
