"""Every trial's batch is padded (:mod:`probes.padding`): it allocates the attention mask that a
padded job's batch makes transformers build, on ``simulated`` and ``predict`` alike, and the
confirmation's padded steps no longer find more than the search did."""

from __future__ import annotations

import pytest

from probes import trial as trial_module
from probes.devices import predict as predict_module
from probes.engine import run_probe
from probes.padding import MIN_PADDED_LENGTH, has_padded_position, unpadded_micro_batch
from probes.spec import ConfigTask, ModelSpec, Precision, ProbeSpec
from probes.trial import TrialSession

MiB = 2**20
SEQ_LEN = 32
BATCH = 4
TINY: dict[str, dict[str, object]] = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 128,
    },
}


def _peak(arch: str, device: str, *, packed_micro_batch: bool = True, seq_len: int = SEQ_LEN) -> int:
    """One trial's peak; ``packed_micro_batch=False``: without the packed micro-batch a trial of a
    model whose packed batches take another kernel adds (every micro-batch is then the same)."""
    task = ConfigTask(
        model=ModelSpec(architecture=arch, config=TINY[arch]),
        seq_len=seq_len,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device=device,
        memory_limit_bytes=64 * MiB,
    )
    with TrialSession(task) as session:
        session.recipe.measures_packed_batch &= packed_micro_batch
        record = session.run(BATCH, accumulation_steps=2, optimizer_steps=2)
    assert record.peak_reserved_bytes is not None, record
    return record.peak_reserved_bytes


def test_only_a_batch_of_one_token_has_nothing_to_pad() -> None:
    assert MIN_PADDED_LENGTH == 2
    assert not has_padded_position(1)
    assert has_padded_position(2)


@pytest.mark.parametrize("device", ["simulated", "predict"])
def test_a_gpt2_trial_allocates_the_attention_mask_of_a_padded_batch(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    padded = _peak("gpt2", device)
    # the same trial with an all-ones mask: what every trial measured before
    monkeypatch.setattr(trial_module, "has_padded_position", lambda length: False)
    monkeypatch.setattr(predict_module, "has_padded_position", lambda length: False)
    unpadded = _peak("gpt2", device)
    # at least the b x 1 x s x s boolean mask sdpa is given
    assert padded - unpadded >= BATCH * SEQ_LEN * SEQ_LEN, (padded, unpadded)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_predict_counts_the_padded_batch_simulated_runs(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Predict's fake masks answer "padded" as the real probe mask does, so both devices take the
    same mask path. (On Llama the CPU's SDPA kernel with an explicit mask needs less than with
    ``is_causal`` at this size, so the peak itself is no test of the mask there.)"""
    assert _peak(arch, "predict") == _peak(arch, "simulated")
    padded = _peak(arch, "predict", packed_micro_batch=False)
    assert padded == _peak(arch, "simulated", packed_micro_batch=False)
    monkeypatch.setattr(trial_module, "has_padded_position", lambda length: False)
    monkeypatch.setattr(predict_module, "has_padded_position", lambda length: False)
    # the mask path is not the all-ones one
    assert _peak(arch, "predict", packed_micro_batch=False) != padded


@pytest.mark.parametrize("device", ["simulated", "predict"])
def test_a_trial_covers_a_packed_job_where_packed_batches_need_more(device: str) -> None:
    """``32-true`` Llama with grouped K/V heads: with no padded position transformers asks SDPA for
    grouped heads, which no fused CUDA kernel takes in fp32, and the math kernel keeps the attention
    weights. A job whose batches are all packed needs more than a padded one; the trial's own
    packed micro-batch makes its peak cover that job too."""
    seq_len = 128
    trial = _peak("llama", device, seq_len=seq_len)
    padded_only = _peak("llama", device, packed_micro_batch=False, seq_len=seq_len)
    with unpadded_micro_batch():  # every micro-batch packed
        packed_only = _peak("llama", device, packed_micro_batch=False, seq_len=seq_len)
    assert packed_only > padded_only  # what the trial missed before
    assert trial >= packed_only


def test_a_packed_micro_batch_has_no_padded_position() -> None:
    with unpadded_micro_batch():
        assert not has_padded_position(SEQ_LEN)
    assert has_padded_position(SEQ_LEN)


@pytest.mark.slow
def test_the_confirmation_confirms_what_the_search_answers_for_a_padded_job() -> None:
    """The case the varied confirmation found (docs/probe.md): bf16-true with checkpointing on a tiny
    GPT-2 at seq 128 in 64 MiB answered 40 from unpadded trials and was lowered to 32 by the
    padded confirmation. The search now measures padded batches and answers 32 itself."""
    spec = ProbeSpec(
        model=ModelSpec(architecture="gpt2", config=TINY["gpt2"]),
        seq_len=128,
        precisions=[Precision.BF16_TRUE],
        gradient_checkpointing=[True],
        target_effective_batch_size=256,
        device="simulated",
        memory_limit_bytes=64 * MiB,
    )
    (config,) = run_probe(spec).configs
    confirmation = config.confirmation
    assert confirmation is not None
    assert confirmation.varied_optimizer_steps > 0
    assert confirmation.all_fit
    assert not confirmation.failed_sizes
    assert confirmation.batch_size == config.max_batch_size == 32
