"""The GPU table and the overhead model: lookups, errors, bf16 eligibility, arithmetic."""

from __future__ import annotations

import subprocess
import sys

import pytest

from probes.errors import ProbeInputError, UnknownGpu
from probes.gpus import GPUS, known_gpu_names, lookup_gpu
from probes.overhead import (
    ALLOCATOR_SLACK_FRACTION,
    CUDA_CONTEXT_BYTES,
    LIBRARY_WORKSPACE_BYTES,
    SMALL_POOL_BYTES,
    overhead_for,
    tensor_capacity,
)

GiB = 2**30
REQUIRED = [
    "A100-40GB",
    "A100-80GB",
    "H100-80GB",
    "H200-141GB",
    "L4-24GB",
    "A10G-24GB",
    "L40S-48GB",
    "RTX4090-24GB",
    "T4-16GB",
    "V100-16GB",
    "V100-32GB",
]


def test_the_table_holds_the_cards_the_issue_names() -> None:
    assert set(REQUIRED) <= set(known_gpu_names())
    assert len(set(known_gpu_names())) == len(GPUS)


@pytest.mark.parametrize("name", REQUIRED)
def test_memory_is_below_the_marketing_figure_and_close_to_it(name: str) -> None:
    gpu = lookup_gpu(name)
    advertised_gb = int(name.rsplit("-", 1)[1].removesuffix("GB"))
    # The runtime reports less than the label (ECC, driver reservations), never less than 85 % of it.
    assert 0.85 * advertised_gb * 1e9 < gpu.memory_bytes <= advertised_gb * 2**30
    assert gpu.source


@pytest.mark.parametrize("spelling", ["h100-80gb", "H100-80GB", " H100_80gb ", "h100 80GB"])
def test_lookup_ignores_case_and_separators(spelling: str) -> None:
    assert lookup_gpu(spelling).name == "H100-80GB"


def test_unknown_gpu_lists_the_known_ones() -> None:
    with pytest.raises(UnknownGpu) as caught:
        lookup_gpu("H100")
    error = caught.value
    assert isinstance(error, ProbeInputError)
    assert error.code == "unknown-gpu"
    assert error.known == known_gpu_names()
    assert "'H100'" in error.message
    assert "H100-80GB" in error.message  # an example of the spelling


@pytest.mark.parametrize(
    ("name", "capability", "bf16"),
    [
        ("T4-16GB", "7.5", False),
        ("V100-16GB", "7.0", False),
        ("V100-32GB", "7.0", False),
        ("A100-80GB", "8.0", True),
        ("A10G-24GB", "8.6", True),
        ("L4-24GB", "8.9", True),
        ("H100-80GB", "9.0", True),
    ],
)
def test_bf16_follows_the_compute_capability(name: str, capability: str, bf16: bool) -> None:
    gpu = lookup_gpu(name)
    assert gpu.capability_label == capability
    assert gpu.bf16_supported is bf16


def test_the_table_imports_no_torch() -> None:
    code = "import sys, probes.gpus, probes.overhead; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"


def test_overhead_adds_up() -> None:
    card = lookup_gpu("H100-80GB").memory_bytes
    overhead = overhead_for(card)
    fixed = CUDA_CONTEXT_BYTES.value + LIBRARY_WORKSPACE_BYTES.value + SMALL_POOL_BYTES.value
    assert overhead.context_bytes + overhead.workspace_bytes + overhead.small_pool_bytes == fixed
    assert overhead.total_bytes == fixed + overhead.allocator_slack_bytes
    assert overhead.allocator_slack_bytes == pytest.approx(
        (card - fixed) * ALLOCATOR_SLACK_FRACTION.value, abs=1
    )
    assert tensor_capacity(card) == card - overhead.total_bytes
    assert not overhead.calibrated


def test_overhead_grows_with_the_card_but_stays_a_small_share() -> None:
    small = overhead_for(lookup_gpu("T4-16GB").memory_bytes).total_bytes
    large = overhead_for(lookup_gpu("H200-141GB").memory_bytes).total_bytes
    assert small < large
    for gpu in GPUS:
        share = overhead_for(gpu.memory_bytes).total_bytes / gpu.memory_bytes
        assert 0.05 < share < 0.15, gpu.name


def test_every_constant_says_where_it_comes_from() -> None:
    for constant in (CUDA_CONTEXT_BYTES, LIBRARY_WORKSPACE_BYTES, SMALL_POOL_BYTES, ALLOCATOR_SLACK_FRACTION):
        assert constant.value > 0
        assert constant.what
        # Each says whether it was measured (card, driver, date) or is still an estimate.
        assert "measured 20" in constant.source or "estimate, not measured" in constant.source
    assert "H200" in CUDA_CONTEXT_BYTES.source


def test_a_card_smaller_than_the_fixed_overhead_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing for tensors"):
        overhead_for(GiB)
