"""``gpu_type``: one vocabulary with the predict table, and what a request may combine it with."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from probes.gpu_types import GpuType, normalise_gpu_type, parse_gpu_type
from probes.gpus import known_gpu_names
from probes.spec import ProbeSpec


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("H100-80GB", "H100-80GB"),
        ("h100_80gb", "H100-80GB"),
        ("a100 40GB", "A100-40GB"),
        ("A100-80G", "A100-80GB"),  # Ray's own spelling of a sized A100
        ("l4-24gb", "L4-24GB"),
        ("H100-94GB", "H100-94GB"),  # not in the table: still a sized name
        ("H100", "H100"),
        ("a100", "A100"),
        ("A10G", "A10G"),
        ("RTX-PRO-6000", "RTX-PRO-6000"),
        ("Intel-GAUDI", "Intel-GAUDI"),
    ],
)
def test_names_normalise(written: str, canonical: str) -> None:
    assert normalise_gpu_type(written) == canonical


def test_every_predict_card_is_a_gpu_type() -> None:
    for name in known_gpu_names():
        parsed = parse_gpu_type(name)
        assert parsed.name == name
        assert parsed.memory_gb is not None


@pytest.mark.parametrize("bad", ["", "H100/80", "-H100", "H100-", "a b c!"])
def test_malformed_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="MODEL-MEMORY"):
        parse_gpu_type(bad)


def test_a_bare_model_matches_every_memory_a_sized_name_one() -> None:
    sized, other, bare = GpuType("H100", 80), GpuType("H100", 94), GpuType("h100")
    assert bare.matches(sized)
    assert bare.matches(other)
    assert sized.matches(GpuType("h100", 80))
    assert not sized.matches(other)
    assert not sized.matches(GpuType("H100"))  # a node that does not say its memory
    assert not GpuType("A100").matches(sized)


def _spec(**fields: object) -> ProbeSpec:
    body: dict[str, object] = {
        "model": {"architecture": "gpt2"},
        "seq_len": 64,
        "target_effective_batch_size": 64,
    }
    body.update(fields)
    return ProbeSpec.model_validate(body)


def test_device_gpu_takes_a_gpu_type() -> None:
    spec = _spec(device="GPU", gpu_type="h100_80gb")
    assert (spec.device, spec.gpu_type, spec.device_kind) == ("gpu", "H100-80GB", "gpu")
    assert spec.cuda_index is None
    placed = _spec(device="predict", gpu_type="a100", memory_limit_bytes=1 << 30)
    assert placed.gpu_type == "A100"


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"device": "gpu"}, "needs gpu_type"),
        ({"device": "cuda:1", "gpu_type": "H100"}, "names one GPU of the service's machine"),
        ({"device": "gpu", "gpu_type": "H100/80"}, "not a GPU type"),
        ({"device": "tpu"}, "gpu (with gpu_type)"),
    ],
)
def test_what_gpu_type_cannot_go_with(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        _spec(**fields)


def test_the_engine_refuses_a_fleet_request_it_cannot_place() -> None:
    from probes.engine import run_probe
    from probes.errors import DeviceUnavailable

    with pytest.raises(DeviceUnavailable, match="name the GPU: cuda:N"):
        run_probe(_spec(device="gpu", gpu_type="H100-80GB"))
