"""One GPU measuring a rank of a multi-GPU job: DDP and FSDP2 on the fake process group, on cuda:0.

Skipped where CUDA is absent (the ``gpu`` marker). The comparison with ``predict`` and the soak are
in ``bench/gpu_check.py`` (part 7).
"""

from __future__ import annotations

import pytest

from probes.spec import ConfigTask, ModelSpec, Outcome, Precision, Strategy
from probes.trial import TrialSession

pytestmark = pytest.mark.gpu

TINY_LLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def _task(
    strategy: Strategy,
    ranks: int,
    precision: Precision = Precision.BF16_MIXED,
    *,
    sync_each_batch: bool = False,
) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture="llama", config=TINY_LLAMA),
        seq_len=128,
        precision=precision,
        gradient_checkpointing=False,
        strategy=strategy,
        world_size=ranks,
        sync_each_batch=sync_each_batch,
        device="cuda:0",
    )


def _peak(task: ConfigTask) -> int:
    with TrialSession(task) as session:
        trial = session.run(4, accumulation_steps=2, optimizer_steps=2)
    assert trial.outcome is Outcome.FIT, trial.message
    assert trial.peak_allocated_bytes is not None
    return trial.peak_allocated_bytes


def test_ddp_buckets_cost_memory_on_the_gpu() -> None:
    single = _peak(_task(Strategy.SINGLE, 1))
    ddp = _peak(_task(Strategy.DDP, 2))
    assert ddp > single


def test_fsdp_over_more_ranks_needs_less_per_rank() -> None:
    two = _peak(_task(Strategy.FSDP, 2))
    eight = _peak(_task(Strategy.FSDP, 8))
    assert eight < two


def test_fsdp_with_sync_each_batch_keeps_no_unsharded_gradients_between_micro_steps() -> None:
    deferred = _peak(_task(Strategy.FSDP, 8))
    each = _peak(_task(Strategy.FSDP, 8, sync_each_batch=True))
    assert each < deferred


def test_fp32_runs_cudas_own_kernel() -> None:
    """No emulation on a real GPU: the trial runs whatever kernel CUDA picks."""
    with TrialSession(_task(Strategy.SINGLE, 1, Precision.FP32)) as session:
        assert session.recipe.attention is None
        trial = session.run(2, accumulation_steps=2, optimizer_steps=2)
    assert trial.outcome is Outcome.FIT
