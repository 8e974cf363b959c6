"""When batch size 1 does not fit: its need against the limit, and the strategy that fits instead."""

from __future__ import annotations

from probes.shortfall import DEFERRED_SYNC_HINT, explain_shortfalls, min_batch_need, single_rank_warning
from probes.spec import ConfigResult, ConfigStatus, Outcome, Precision, Strategy, TrialRecord

MiB = 2**20


def _config(strategy: Strategy, best: int | None, reason: str | None = None) -> ConfigResult:
    return ConfigResult(
        precision=Precision.BF16_MIXED,
        gradient_checkpointing=True,
        strategy=strategy,
        status=ConfigStatus.OK,
        max_batch_size=best,
        reason=reason,
    )


def test_an_oom_gives_a_lower_bound() -> None:
    trials = [TrialRecord(batch_size=1, outcome=Outcome.OOM, needed_bytes=300 * MiB)]
    need = min_batch_need(trials, 200 * MiB)
    assert (need.bytes, need.lower_bound) == (300 * MiB, True)
    assert (
        need.sentence
        == "batch size 1 does not fit: it needs at least 300.00 MiB per device against 200.00 MiB"
    )


def test_a_run_that_finished_over_the_headroom_gives_the_need() -> None:
    over = TrialRecord(batch_size=1, outcome=Outcome.OVER_HEADROOM, peak_allocated_bytes=210 * MiB)
    need = min_batch_need([over], 200 * MiB)
    assert (need.bytes, need.lower_bound) == (210 * MiB, False)
    assert "needs 210.00 MiB per device against 200.00 MiB" in need.sentence


def test_without_numbers_the_old_sentence() -> None:
    need = min_batch_need([TrialRecord(batch_size=1, outcome=Outcome.OOM)], 200 * MiB)
    assert need.bytes is None
    assert need.sentence == "batch size 1 does not fit: no batch size trains here"


def test_the_strategy_that_fits_is_named() -> None:
    results = [
        _config(Strategy.DDP, None, "batch size 1 does not fit: it needs at least 95 GiB"),
        _config(Strategy.FSDP, 2),
        _config(Strategy.SINGLE, None, "batch size 1 does not fit"),
    ]
    explained = explain_shortfalls(results)
    assert explained[0].fits_with == (Strategy.FSDP,)
    assert explained[0].reason is not None
    assert explained[0].reason.endswith(
        "with the same precision and checkpointing, fsdp (max batch size 2) fits"
    )
    assert explained[1] == results[1]
    assert explained[2].fits_with == (Strategy.FSDP,)


def test_no_strategy_fits_leaves_the_reason() -> None:
    results = [_config(Strategy.DDP, None, "x"), _config(Strategy.FSDP, None, "y")]
    assert explain_shortfalls(results) == results


def test_single_for_a_multi_rank_job_is_warned_about() -> None:
    assert single_rank_warning(Strategy.SINGLE, 1) == ()
    assert single_rank_warning(Strategy.DDP, 8) == ()
    (warning,) = single_rank_warning(Strategy.SINGLE, 8)
    assert "probe ddp or fsdp" in warning


def test_the_cli_table_shows_what_batch_1_needed() -> None:
    import io

    from rich.console import Console

    from probes.cli import render_table
    from probes.spec import DeviceInfo, ModelSpec, ProbeResult, ProbeSpec, Versions

    spec = ProbeSpec(
        model=ModelSpec(architecture="llama"),
        seq_len=4096,
        world_size=8,
        target_effective_batch_size=256,
        device="predict",
        gpu="H100-80GB",
    )
    short = _config(Strategy.DDP, None, "batch size 1 does not fit").model_copy(
        update={"min_batch_needs_bytes": 300 * MiB, "min_batch_need_is_lower_bound": True}
    )
    result = ProbeResult(
        spec=spec,
        device=DeviceInfo(
            kind="predict", name="predict: H100-80GB", total_memory_bytes=80 << 30, bf16_supported=True
        ),
        configs=(short, _config(Strategy.FSDP, 2)),
        versions=Versions(maxbatch="0", python="3"),
        elapsed_seconds=1.0,
    )
    out = io.StringIO()
    render_table(result, Console(file=out, width=220))
    text = out.getvalue()
    assert "b=1 needs ≥ 300.00 MiB" in text
    assert "8 ranks" in text
    assert "fsdp" in text


def test_fsdp_that_fits_nothing_after_its_trials_names_sync_each_batch() -> None:
    tried = _config(
        Strategy.FSDP, None, "batch size 1 does not fit: it needs 80.30 GiB per device"
    ).model_copy(update={"trials": (TrialRecord(batch_size=1, outcome=Outcome.OVER_HEADROOM),)})
    untried = _config(Strategy.FSDP, None, "no trial ran").model_copy(
        update={"gradient_checkpointing": False}
    )
    explained = explain_shortfalls([tried, untried])
    assert (
        explained[0].reason
        == f"batch size 1 does not fit: it needs 80.30 GiB per device; {DEFERRED_SYNC_HINT}"
    )
    assert explained[1] == untried  # no trial: the weights, gradients and state alone do not fit
    assert explain_shortfalls([tried], sync_each_batch=True) == [tried]
