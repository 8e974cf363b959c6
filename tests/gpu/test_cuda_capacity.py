"""On a real GPU the device reports the capacity its trials are checked against (issue 13, item 3).

Skipped where CUDA is absent (the ``gpu`` marker, see ``tests/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from probes.spec import ConfigTask, ModelSpec, Precision
from probes.trial import TrialSession

pytestmark = pytest.mark.gpu

MiB = 2**20


@pytest.mark.parametrize("limited", [False, True])
def test_cuda_info_carries_the_trial_capacity(limited: bool) -> None:
    total = int(torch.cuda.get_device_properties(0).total_memory)
    limit = total // 2 if limited else None
    task = ConfigTask(
        model=ModelSpec(architecture="gpt2", config={"n_layer": 1, "n_embd": 32, "n_head": 2}),
        seq_len=16,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device="cuda",
        memory_limit_bytes=limit,
        headroom_bytes=64 * MiB,
    )
    with TrialSession(task) as session:
        info = session.device_info()
        assert info.capacity_bytes == session.device.capacity_bytes == (limit or total) - 64 * MiB
