"""On a real GPU, an out-of-memory trial's lower bound (parsed from torch's message) is below its peak.

Skipped where CUDA is absent (the ``gpu`` marker, see ``tests/conftest.py``).
"""

from __future__ import annotations

import pytest

from probes.spec import ConfigTask, ModelSpec, Outcome, Precision
from probes.trial import TrialSession

pytestmark = pytest.mark.gpu

MiB = 2**20
GPT2 = {
    "n_layer": 2,
    "n_embd": 256,
    "n_head": 4,
    "vocab_size": 32000,
    "n_positions": 1024,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def task(limit: int | None) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture="gpt2", config=GPT2),
        seq_len=256,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device="cuda:0",
        memory_limit_bytes=limit,
    )


def test_the_bound_of_a_cuda_oom_is_at_most_the_peak_it_would_have_reached() -> None:
    with TrialSession(task(512 * MiB)) as capped:
        failed = capped.run(64, accumulation_steps=2, optimizer_steps=2)
    assert failed.outcome is Outcome.OOM, failed.message
    assert failed.needed_bytes is not None, failed.message
    with TrialSession(task(None)) as roomy:
        ran = roomy.run(64, accumulation_steps=2, optimizer_steps=2)
    assert ran.outcome is Outcome.FIT
    assert ran.peak_allocated_bytes is not None
    assert failed.needed_bytes <= ran.peak_allocated_bytes
    # The caching allocator reports allocated bytes below the cap: the bound says something.
    assert failed.needed_bytes > 256 * MiB
