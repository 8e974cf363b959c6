"""The confirmation on a real GPU: varied lengths after the worst case, the job's allocator settings
in the trial child, and the reserved - allocated margin measured and used as the headroom.

Skipped where CUDA is absent (the ``gpu`` marker, see ``tests/conftest.py``).
"""

from __future__ import annotations

import pytest

from probes.confirmation import confirmation_plan
from probes.engine import run_probe
from probes.spec import DEFAULT_CUDA_ALLOC_CONF, ConfigStatus, ModelSpec, Outcome, ProbeSpec

pytestmark = pytest.mark.gpu

MiB = 2**20
TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 128}


def _spec(**fields: object) -> ProbeSpec:
    base: dict[str, object] = {
        "model": ModelSpec(architecture="gpt2", config=TINY_GPT2),
        "seq_len": 128,
        "precisions": ["32-true"],
        "gradient_checkpointing": [False],
        "target_effective_batch_size": 64,
        "device": "cuda:0",
        "memory_limit_bytes": 512 * MiB,
        "predict_seeding": False,
    }
    return ProbeSpec.model_validate({**base, **fields})


def test_the_cuda_confirmation_runs_the_varied_lengths_with_the_allocator_settings() -> None:
    spec = _spec()
    result = run_probe(spec)
    (config,) = result.configs
    assert config.status is ConfigStatus.OK, config.reason
    report = config.confirmation
    assert report is not None
    plan = confirmation_plan(spec, "cuda")
    assert report.varied_optimizer_steps == 16
    assert report.varied_lengths == plan.varied_lengths
    assert report.all_fit
    assert report.cuda_alloc_conf == DEFAULT_CUDA_ALLOC_CONF
    # measured on the GPU: the margin and the headroom derived from it
    assert report.reserved_minus_allocated_bytes is not None
    assert report.reserved_minus_allocated_bytes >= 0
    assert report.derived_headroom_bytes is not None
    assert report.derived_headroom_bytes % (2 * MiB) == 0
    backing = next(
        t
        for t in config.trials
        if t.batch_size == config.max_batch_size and t.outcome is Outcome.FIT and t.lengths == plan.lengths
    )
    assert backing.peak_reserved_bytes is not None
    assert result.device.capacity_bytes is not None
    assert backing.peak_reserved_bytes + report.derived_headroom_bytes <= result.device.capacity_bytes
    assert {t.cuda_alloc_conf for t in config.trials} == {DEFAULT_CUDA_ALLOC_CONF}
    assert result.recommendation is not None
    assert result.recommendation.env == {"PYTORCH_CUDA_ALLOC_CONF": DEFAULT_CUDA_ALLOC_CONF}


def test_an_explicit_headroom_replaces_the_derived_one() -> None:
    (config,) = run_probe(_spec(headroom_bytes=8 * MiB, confirm_varied_steps=2)).configs
    report = config.confirmation
    assert report is not None
    assert report.varied_optimizer_steps == 2
    assert report.reserved_minus_allocated_bytes is not None  # still measured and reported
    assert report.derived_headroom_bytes is None
