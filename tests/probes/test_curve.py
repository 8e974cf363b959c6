"""measure_curve: the whole peak curve from a few timelines gives the exhaustive ladder search's answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from probes.curve import measure_curve
from probes.models import inspect_model
from probes.search import ladder_next, training_state_bytes
from probes.spec import ConfigTask, ModelSpec, Outcome, Precision
from probes.timeline import PeakCurve
from probes.trial import TrialSession
from tests.probes.tiny_families import tiny

MiB = 2**20


def task(
    limit: int, *, layers: int = 8, precision: Precision = Precision.BF16_MIXED, finetuning: str = "full"
) -> ConfigTask:
    return ConfigTask.model_validate(
        {
            "model": ModelSpec(architecture="llama", config=tiny("llama", layers=layers)),
            "seq_len": 32,
            "precision": precision,
            "gradient_checkpointing": True,
            "device": "simulated",
            "memory_limit_bytes": limit,
            "finetuning": {"method": finetuning},
        }
    )


def exhaustive(config: ConfigTask) -> Iterator[tuple[int, Outcome, int | None]]:
    """Every ladder size from 1 up to the first that fails: (size, outcome, peak)."""
    with TrialSession(config) as session:
        size = 1
        while True:
            record = session.run(size, accumulation_steps=2, optimizer_steps=2)
            yield size, record.outcome, record.peak_bytes
            if record.outcome is not Outcome.FIT:
                return
            size = ladder_next(size)


@pytest.fixture(scope="module")
def roomy_curve() -> PeakCurve:
    outcome = measure_curve(task(1024 * MiB))
    assert outcome.curve is not None, outcome.reason
    assert outcome.depths == (3, 4, 5)  # llama is covered: the 8-layer model is never built
    assert outcome.trials == 6
    return outcome.curve


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first test waits for the module's curve, then runs the exhaustive ladder
def test_the_curve_gives_the_exhaustive_answer_and_its_peaks(roomy_curve: PeakCurve) -> None:
    capacity = roomy_curve.peak(20)  # 20 fits, 21 does not: the ladder answer is 16, 24 fails
    walked = list(exhaustive(task(capacity)))
    assert [(size, outcome) for size, outcome, _ in walked][-2:] == [(16, Outcome.FIT), (24, Outcome.OOM)]
    assert roomy_curve.ladder_bracket(capacity) == (16, 24)
    for size, outcome, peak in walked:
        if outcome is Outcome.FIT and size >= 2:
            assert roomy_curve.peak(size) == peak  # the 8-layer model's own trial, to the byte


@pytest.mark.slow
def test_batch_size_one_is_measured_when_two_does_not_fit(roomy_curve: PeakCurve) -> None:
    capacity = roomy_curve.peak(2) - 1
    outcome = measure_curve(task(capacity))
    assert outcome.curve is not None, outcome.reason
    assert outcome.trials == 6 + 3  # b = 1 at each base depth
    with TrialSession(task(1024 * MiB)) as session:
        one = session.run(1, accumulation_steps=2, optimizer_steps=2)
    assert outcome.curve.peak(1) == one.peak_bytes
    expected = (1, 2) if one.peak_bytes is not None and one.peak_bytes <= capacity else (None, 1)
    assert outcome.curve.ladder_bracket(capacity) == expected


def test_when_the_training_state_alone_does_not_fit_no_trial_runs() -> None:
    outcome = measure_curve(task(MiB, precision=Precision.FP32))
    assert outcome.nothing_fits
    assert outcome.trials == 0
    assert outcome.curve is None
    assert outcome.reason is not None
    assert "optimizer state" in outcome.reason


def test_with_adapters_a_full_fine_tuning_state_is_no_floor() -> None:
    """LoRA trains its adapters only: that a full fine-tuning's weights, gradients and AdamW state
    (6.8 MB of the tiny Llama in fp32) exceed the cap is no reason to run no trial."""
    lora = task(6 * MiB, precision=Precision.FP32, finetuning="lora")
    parameters = inspect_model(lora.model, lora.seq_len, allow_remote_code=False).parameter_count
    full_state = training_state_bytes(parameters, Precision.FP32)
    assert full_state is not None
    assert full_state > 6 * MiB
    outcome = measure_curve(lora)
    assert not outcome.nothing_fits
    assert outcome.curve is not None, outcome.reason
    assert outcome.bracket is not None
    assert (outcome.bracket[0] or 0) >= 2


@pytest.mark.slow
@pytest.mark.timeout(900)  # the 8-layer model's own timelines: minutes on a loaded 2-core machine
def test_without_depth_extrapolation_the_model_itself_runs() -> None:
    outcome = measure_curve(task(1024 * MiB, layers=3), extrapolate_depth_allowed=True)
    assert outcome.depths == ()  # 3 layers: no deeper than the base depths
    assert outcome.notes
    assert outcome.curve is not None
    with TrialSession(task(1024 * MiB, layers=3)) as session:
        record = session.run(5, accumulation_steps=2, optimizer_steps=2)
    assert outcome.curve.peak(5) == record.peak_bytes


def test_a_bracket_from_a_curve_respects_the_upper_limit(roomy_curve: PeakCurve) -> None:
    capacity = roomy_curve.peak(20)
    assert roomy_curve.ladder_bracket(capacity, upper_limit=12) == (8, None)
    with pytest.raises(ValueError, match="batch size 1 was not measured"):
        roomy_curve.ladder_bracket(capacity, upper_limit=1)
    measured_one = PeakCurve(affine=roomy_curve.affine, peak_at_one=roomy_curve.peak(2) - 1)
    assert measured_one.ladder_bracket(capacity, upper_limit=1) == (1, None)
    assert measured_one.ladder_bracket(roomy_curve.peak(2) - 1) == (1, 2)
    assert measured_one.ladder_bracket(roomy_curve.peak(2) - 2) == (None, 1)


@pytest.mark.slow
def test_a_trial_child_measures_the_curve_and_sends_it_whole(roomy_curve: PeakCurve) -> None:
    """The trial server's curve exchange: the bracket for the child's capacity, and the curve itself."""
    from probes.isolate import curve_from_reply, trial_child
    from probes.protocol import CurveRequest, TrialReply, TrialRequest

    capacity = roomy_curve.peak(24)  # 24 fits to the byte, 32 does not
    with trial_child(task(capacity)) as child:
        reply = curve_from_reply(
            child.request(CurveRequest(accumulation_steps=2, optimizer_steps=2), timeout_seconds=600)
        )
        assert reply.reason is None
        assert (reply.max_batch_size, reply.first_failing_batch_size) == (24, 32)
        assert reply.capacity_bytes == capacity
        assert reply.trials == 6
        assert reply.depths == (3, 4, 5)
        assert reply.curve is not None
        sent = PeakCurve.from_wire(reply.curve)
        assert [sent.peak(b) for b in (2, 3, 24, 64)] == [roomy_curve.peak(b) for b in (2, 3, 24, 64)]
        limited = curve_from_reply(
            child.request(
                CurveRequest(accumulation_steps=2, optimizer_steps=2, upper_limit=16), timeout_seconds=600
            )
        )
        assert (limited.max_batch_size, limited.first_failing_batch_size) == (16, None)
        # the same child still runs trials, dynamic padding included
        served = child.request(
            TrialRequest(batch_size=2, accumulation_steps=2, optimizer_steps=2, lengths=(32, 32, 8, 32)),
            timeout_seconds=600,
        )
        assert isinstance(served, TrialReply)
        assert served.trial.outcome is Outcome.FIT


def test_a_curve_wire_form_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match="not a peak curve"):
        PeakCurve.from_wire({"affine": None})
    with pytest.raises(ValueError, match="not a peak curve"):
        PeakCurve.from_wire({"affine": {}, "peak_at_one": -1})
