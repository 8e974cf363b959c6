"""One device-name validator, and the trial capacity computed once, by the device, in the child."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from probes.devices.base import trial_capacity_bytes
from probes.devices.predict import PredictDevice
from probes.devices.simulated import SimulatedDevice
from probes.gpus import lookup_gpu
from probes.spec import ConfigTask, DeviceInfo, ModelSpec, Precision, ProbeSpec, normalize_device

MiB = 2**20
GiB = 2**30


NORMALISED = {"cuda": "cuda:0", " CUDA:3 ": "cuda:3", "Simulated": "simulated", "predict": "predict"}


def test_device_names_are_normalised() -> None:
    assert {given: normalize_device(given) for given in NORMALISED} == NORMALISED


@pytest.mark.parametrize("given", ["tpu", "cuda:", "cuda:x", "cpu", "", "cuda:0:1"])
def test_unknown_device_names_are_refused_by_spec_and_task_alike(given: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        normalize_device(given)
    with pytest.raises(ValidationError, match="unknown device"):
        ProbeSpec(
            model=ModelSpec(architecture="gpt2"),
            seq_len=8,
            target_effective_batch_size=8,
            device=given,
            memory_limit_bytes=MiB,
        )
    with pytest.raises(ValidationError, match="unknown device"):
        ConfigTask(
            model=ModelSpec(architecture="gpt2"),
            seq_len=8,
            precision=Precision.FP32,
            gradient_checkpointing=False,
            device=given,
        )


def test_a_task_carries_the_normalised_name() -> None:
    task = ConfigTask(
        model=ModelSpec(architecture="gpt2"),
        seq_len=8,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device="CUDA",
    )
    assert task.device == "cuda:0"


def test_capacity_is_the_limit_else_the_total_less_headroom_and_overhead() -> None:
    assert trial_capacity_bytes(100, None, 10) == 90
    assert trial_capacity_bytes(100, 60, 10, 5) == 45


@pytest.mark.parametrize(
    "device",
    [
        SimulatedDevice(320 * MiB, headroom_bytes=MiB),
        PredictDevice(memory_limit_bytes=320 * MiB, headroom_bytes=MiB),
        PredictDevice(gpu=lookup_gpu("H100-80GB"), headroom_bytes=GiB),
        PredictDevice(gpu=lookup_gpu("T4-16GB"), memory_limit_bytes=8 * GiB, headroom_bytes=GiB),
    ],
    ids=["simulated", "predict-limit", "predict-gpu", "predict-gpu-limit"],
)
def test_the_device_reports_the_capacity_its_trials_are_checked_against(
    device: SimulatedDevice | PredictDevice,
) -> None:
    info = device.info()
    assert info.capacity_bytes == device.capacity_bytes
    assert DeviceInfo.model_validate_json(info.model_dump_json()).capacity_bytes == device.capacity_bytes


def test_results_stored_before_the_field_still_read() -> None:
    old = '{"kind": "simulated", "name": "s", "total_memory_bytes": 1, "bf16_supported": true}'
    assert DeviceInfo.model_validate_json(old).capacity_bytes is None
