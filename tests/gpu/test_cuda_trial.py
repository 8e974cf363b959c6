"""Trials on a real GPU (cuda:0) with a tiny GPT-2: peaks, the memory-limit emulation, bf16 gating.

Skipped where CUDA is absent (the ``gpu`` marker, see ``tests/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from probes.devices.cuda import CudaDevice
from probes.errors import ProbeInputError
from probes.oom import is_out_of_memory
from probes.spec import ConfigTask, ModelSpec, Outcome, Precision
from probes.trial import TrialSession

pytestmark = pytest.mark.gpu

MiB = 2**20
TINY_GPT2 = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "vocab_size": 1000,
    "n_positions": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def task(
    precision: Precision = Precision.FP32,
    checkpointing: bool = False,
    *,
    device: str = "cuda:0",
    limit: int | None = None,
    headroom: int = 0,
) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture="gpt2", config=TINY_GPT2),
        seq_len=128,
        precision=precision,
        gradient_checkpointing=checkpointing,
        device=device,
        memory_limit_bytes=limit,
        headroom_bytes=headroom,
    )


def capability() -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(0)
    return int(major), int(minor)


def test_device_info_describes_the_gpu() -> None:
    with TrialSession(task()) as session:
        info = session.device_info()
    properties = torch.cuda.get_device_properties(0)
    major, minor = capability()
    assert info.kind == "cuda"
    assert info.name == properties.name
    assert info.total_memory_bytes == properties.total_memory
    assert info.compute_capability == f"{major}.{minor}"
    assert info.bf16_supported == ((major, minor) >= (8, 0))
    assert info.timings_are_gpu_times
    assert info.memory_limit_bytes is None
    if info.uuid is not None:
        assert info.uuid.startswith(("GPU-", "MIG-"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_model_fits_with_allocator_peaks(checkpointing: bool) -> None:
    with TrialSession(task(checkpointing=checkpointing)) as session:
        record = session.run(4, accumulation_steps=2, optimizer_steps=2)
        weights = sum(p.nbytes for p in session.model.parameters()) if session.model else 0
    assert record.outcome is Outcome.FIT, record.message
    assert record.peak_allocated_bytes is not None
    assert record.peak_reserved_bytes is not None
    assert record.peak_reserved_bytes >= record.peak_allocated_bytes > 3 * weights
    assert record.step_seconds is not None
    assert record.step_seconds > 0


def test_trials_start_clean_and_repeat_their_peak() -> None:
    with TrialSession(task()) as session:
        first = session.run(4, accumulation_steps=1, optimizer_steps=2)
        second = session.run(4, accumulation_steps=1, optimizer_steps=2)
    assert first.outcome is second.outcome is Outcome.FIT
    assert first.peak_allocated_bytes == second.peak_allocated_bytes


def test_memory_limit_emulation_gives_a_typed_oom_then_a_clean_fit() -> None:
    limit = 256 * MiB  # room for cuBLAS workspaces (32 MiB and more on Hopper) besides a tiny model
    with TrialSession(task(limit=limit)) as session:
        info = session.device_info()
        big = session.run(4096, accumulation_steps=1, optimizer_steps=2)  # logits alone need 2 GB
        small = session.run(1, accumulation_steps=1, optimizer_steps=2)
    assert info.memory_limit_bytes == limit
    assert big.outcome is Outcome.OOM, big.message
    assert big.message is not None
    assert "out of memory" in big.message
    assert small.outcome is Outcome.FIT, small.message
    assert small.peak_reserved_bytes is not None
    assert small.peak_reserved_bytes <= limit


def test_the_memory_fraction_is_given_back_on_close() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    device = CudaDevice(0, memory_limit_bytes=32 * MiB)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:0")
    assert is_out_of_memory(caught.value)
    device.close()
    block = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:0")  # fits again: the limit is gone
    del block
    torch.cuda.empty_cache()
    assert total > 64 * MiB


def test_limit_beyond_the_gpu_is_an_input_error() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(ProbeInputError, match="exceeds"):
        CudaDevice(0, memory_limit_bytes=total + 1)


def test_over_headroom_on_a_real_gpu() -> None:
    with TrialSession(task()) as session:
        fit = session.run(4, accumulation_steps=1, optimizer_steps=2)
    assert fit.peak_reserved_bytes is not None
    limit = fit.peak_reserved_bytes + 64 * MiB
    with TrialSession(task(limit=limit, headroom=limit - fit.peak_reserved_bytes // 2)) as session:
        record = session.run(4, accumulation_steps=1, optimizer_steps=2)
    assert record.outcome is Outcome.OVER_HEADROOM, record.message


@pytest.mark.parametrize("precision", [Precision.BF16_MIXED, Precision.BF16_TRUE])
def test_bf16_runs_only_where_the_gpu_has_it(precision: Precision) -> None:
    with TrialSession(task(precision)) as session:
        record = session.run(2, accumulation_steps=1, optimizer_steps=2)
    if capability() >= (8, 0):
        assert record.outcome is Outcome.FIT, record.message
    else:
        assert record.outcome is Outcome.ERROR
        assert record.message is not None
        assert "needs native bf16" in record.message


def test_fp16_mixed_runs_with_a_scaler() -> None:
    with TrialSession(task(Precision.FP16_MIXED)) as session:
        record = session.run(2, accumulation_steps=2, optimizer_steps=2)
    assert record.outcome is Outcome.FIT, record.message
    assert record.optimizer_steps >= 2


def test_simulated_count_grows_like_the_gpu_allocator() -> None:
    """Per-batch growth of the counted peak against ``max_memory_allocated``'s, on the same trials.

    Differences of two batch sizes cancel what only the GPU has (cuBLAS workspaces, the CUDA
    context); what is left is tensors, which both devices should see alike.
    """

    def growth(device: str) -> int:
        limit = None if device.startswith("cuda") else 4096 * MiB
        with TrialSession(task(device=device, limit=limit)) as session:
            small = session.run(16, accumulation_steps=1, optimizer_steps=2)
            large = session.run(64, accumulation_steps=1, optimizer_steps=2)
        assert small.peak_allocated_bytes is not None
        assert large.peak_allocated_bytes is not None
        return large.peak_allocated_bytes - small.peak_allocated_bytes

    gpu, simulated = growth("cuda:0"), growth("simulated")
    print(f"growth from batch 16 to 64: simulated {simulated} bytes, cuda allocated {gpu} bytes")
    assert 0.67 < simulated / gpu < 1.5
