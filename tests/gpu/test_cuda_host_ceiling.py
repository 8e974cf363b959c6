"""On a real GPU: a trial child under a host-memory ceiling (RLIMIT_DATA) still initialises CUDA and
trains; weights larger than the GPU are an ``oom`` outcome before anything is allocated.

Skipped where CUDA is absent (the ``gpu`` marker, see ``tests/conftest.py``).
"""

from __future__ import annotations

import pytest

from bench.proctree import data_limit
from probes.hostmem import HostMemoryPolicy, ceilings_enforced
from probes.isolate import TrialChild, trial_from_reply
from probes.protocol import TrialRequest
from probes.spec import ConfigTask, ModelSpec, Outcome, Precision

pytestmark = pytest.mark.gpu

GiB = 2**30
TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 128}


def task(**config: object) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture="gpt2", config={**TINY_GPT2, **config}),
        seq_len=64,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device="cuda:0",
    )


def one_trial(child: TrialChild) -> tuple[Outcome, str | None]:
    reply = child.request(
        TrialRequest(batch_size=2, accumulation_steps=2, optimizer_steps=2), timeout_seconds=300
    )
    trial, _ = trial_from_reply(2, reply)
    return trial.outcome, trial.message


@pytest.mark.skipif(not ceilings_enforced(), reason="RLIMIT_DATA bounds mmap only on Linux >= 4.7")
def test_a_cuda_trial_runs_under_a_host_memory_ceiling() -> None:
    child = TrialChild(task(), host_memory=HostMemoryPolicy(cuda_bytes=8 * GiB))
    try:
        outcome, message = one_trial(child)
        assert outcome is Outcome.FIT, message
        assert child.pid is not None
        assert data_limit(child.pid) == 8 * GiB
    finally:
        child.close()


def test_weights_larger_than_the_gpu_are_an_oom_without_allocating() -> None:
    child = TrialChild(task(vocab_size=10**9))  # 3 TB of fp32 embeddings
    try:
        outcome, message = one_trial(child)
        assert outcome is Outcome.OOM
        assert message is not None
        assert message.startswith("the weights alone need ")
        assert message.endswith("this device has for tensors; nothing was allocated")
    finally:
        child.close()
