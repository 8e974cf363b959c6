"""Compare cards in one request (``probes.cards``): real ``predict`` trials in child processes on a
tiny GPT-2 under a 64 MiB limit, each card's configs checked against the one-card request's."""

from __future__ import annotations

from typing import Any

import pytest

from probes.cards import run_request
from probes.engine import run_probe
from probes.errors import ProbeInputError
from probes.protocol import TrialRequest
from probes.spec import (
    ConfigResult,
    ConfigStatus,
    ConfigTask,
    EventKind,
    ModelSpec,
    Outcome,
    Precision,
    ProbeEvent,
    ProbeSpec,
    TrialRecord,
)
from probes.trial_memo import TrialMemo

CAP = 64 * 2**20
TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}
TIMES = {"step_seconds", "samples_per_second", "tokens_per_second"}


def cards_spec(gpu: object, **fields: object) -> ProbeSpec:
    body: dict[str, object] = {
        "model": ModelSpec(
            architecture="gpt2", config={"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}
        ),
        "seq_len": 128,
        "target_effective_batch_size": 256,
        "device": "predict",
        "memory_limit_bytes": CAP,
        "precisions": ["32-true", "bf16-mixed"],
        "gradient_checkpointing": [False],
        "gpu": gpu,
    }
    body.update(fields)
    return ProbeSpec.model_validate(body)


def without_times(configs_in: tuple[ConfigResult, ...]) -> list[dict[str, Any]]:
    """The configs as a one-card and a multi-card run must agree on them: all but CPU times."""
    configs = []
    for config in configs_in:
        data = config.model_dump(mode="json", exclude=TIMES)
        data["trials"] = [t.model_dump(mode="json", exclude=TIMES) for t in config.trials]
        configs.append(data)
    return configs


@pytest.mark.slow
def test_each_card_answers_as_its_one_card_request_and_same_kernels_are_measured_once() -> None:
    spec = cards_spec(["T4-16GB", "A100-40GB", "a100_80gb"])
    assert spec.cards == ("T4-16GB", "A100-40GB", "A100-80GB")
    events: list[ProbeEvent] = []
    result = run_request(spec, on_event=events.append)

    assert result.cards is not None
    assert [card.gpu for card in result.cards] == ["T4-16GB", "A100-40GB", "A100-80GB"]
    for card in result.cards:
        alone = run_probe(spec.for_card(card.gpu))
        assert without_times(card.configs) == without_times(alone.configs), card.gpu
        assert card.device == alone.device
        assert card.recommendation == alone.recommendation
    t4, a100_40, a100_80 = result.cards
    # the T4 has no bf16: skipped there as in a one-card request, searched on the A100s
    assert [c.status for c in t4.configs] == [ConfigStatus.OK, ConfigStatus.SKIPPED]
    assert "compute capability 7.5" in (t4.configs[1].reason or "")
    assert all(c.status is ConfigStatus.OK for c in a100_40.configs)
    # the two A100s share compute capability 8.0 and, here, the 64 MiB for tensors: the second card
    # runs only what the first could not lend (its runs out of memory); the T4 lends nothing
    fits_40 = sum(t.outcome is Outcome.FIT for c in a100_40.configs for t in c.trials)
    assert a100_40.trials_reused == 0
    assert t4.trials_reused == 0
    assert a100_80.trials_reused == fits_40 > 0
    assert a100_80.trials_run == sum(len(c.trials) for c in a100_80.configs) - fits_40
    # the top level is the first card's, for clients that read one card
    assert result.configs == t4.configs
    assert result.device == t4.device
    # events name their card and count across cards
    done = [e for e in events if e.kind is EventKind.CONFIG_DONE]
    assert sorted((e.config_index, e.gpu) for e in done) == [
        (index, card) for index, card in enumerate(card for card in spec.cards for _ in range(2))
    ]
    assert {e.config_count for e in events} == {6}


def test_run_probe_refuses_a_list_of_cards() -> None:
    with pytest.raises(ProbeInputError, match="compares cards"):
        run_probe(cards_spec(["T4-16GB", "A100-40GB"]))


def _task(gpu: str) -> ConfigTask:
    return ConfigTask.for_config(cards_spec(gpu), Precision.FP32, False)


def test_the_memo_lends_fits_only_to_the_same_capability_and_only_within_capacity() -> None:
    memo = TrialMemo()
    request = TrialRequest(batch_size=8, accumulation_steps=2, optimizer_steps=2)
    fit = TrialRecord(batch_size=8, outcome=Outcome.FIT, peak_allocated_bytes=1000)
    memo.remember(_task("A100-40GB"), request, fit)
    assert memo.recall(_task("A100-80GB"), request, 1000) == fit
    assert memo.recall(_task("A100-80GB"), request, 999) is None  # would not fit: run it
    assert memo.recall(_task("H100-80GB"), request, 10**9) is None  # other kernels
    other = TrialRequest(batch_size=8, accumulation_steps=2, optimizer_steps=4)
    assert memo.recall(_task("A100-80GB"), other, 10**9) is None
    oom = TrialRecord(batch_size=16, outcome=Outcome.OOM, needed_bytes=5000)
    memo.remember(_task("A100-40GB"), request.model_copy(update={"batch_size": 16}), oom)
    assert memo.recall(_task("A100-80GB"), request.model_copy(update={"batch_size": 16}), 100) is None
    assert (memo.lent, memo.kept) == (1, 1)
