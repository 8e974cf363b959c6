"""Predict-seeded search: two trials when the prediction is right, the exhaustive answer always."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.search import is_ladder_size
from probes.seeding import PredictedBracket, SeededSearch, seed_sizes
from probes.spec import Outcome, TrialRecord
from tests.probes.test_search import CAPACITY, Curve, curves, exhaustive, linear, trial_for


def run(
    curve: Curve,
    prediction: PredictedBracket,
    *,
    upper_limit: int | None = None,
    floor: int | None = None,
    bound_share: float | None = None,
) -> tuple[SeededSearch, list[int]]:
    search = SeededSearch(prediction, capacity_bytes=CAPACITY, upper_limit=upper_limit, floor_bytes=floor)
    sizes: list[int] = []
    while (n := search.next_size()) is not None:
        assert len(sizes) < 200, f"runaway search: {sizes[:30]}"
        sizes.append(n)
        search.record(trial_for(n, curve, CAPACITY, bound_share=bound_share))
    return search, sizes


LINE = linear(0.1 * CAPACITY, 0.9 * CAPACITY / 100)  # 100 fits exactly: truth (96, 104)


def test_a_right_prediction_costs_two_trials() -> None:
    assert exhaustive(LINE, CAPACITY, None) == (96, 104)
    search, sizes = run(LINE, PredictedBracket(96, 104))
    assert sizes == [96, 104]
    assert (search.max_batch_size, search.first_failing_batch_size) == (96, 104)
    assert search.prediction_right is True


def test_a_prediction_one_size_too_high_steps_down_once() -> None:
    search, sizes = run(LINE, PredictedBracket(104, 112))
    assert sizes == [104, 96]
    assert (search.max_batch_size, search.first_failing_batch_size) == (96, 104)
    assert search.prediction_right is False


def test_a_prediction_one_size_too_low_steps_up_once() -> None:
    search, sizes = run(LINE, PredictedBracket(88, 96))
    assert sizes == [88, 96, 104]
    assert (search.max_batch_size, search.first_failing_batch_size) == (96, 104)
    assert search.prediction_right is False


def test_a_prediction_far_off_falls_back_to_the_ladder_search() -> None:
    search, sizes = run(LINE, PredictedBracket(1024, 1032))
    assert sizes[:2] == [1024, 1016]
    assert (search.max_batch_size, search.first_failing_batch_size) == (96, 104)
    assert search.prediction_right is False


def test_nothing_fits_is_confirmed_by_one_trial() -> None:
    def huge(n: int) -> int:
        return 2 * CAPACITY + n

    search, sizes = run(huge, PredictedBracket(None, 1))
    assert sizes == [1]
    assert (search.max_batch_size, search.first_failing_batch_size) == (None, 1)
    assert search.prediction_right is True


def test_at_the_limit_one_trial_confirms() -> None:
    search, sizes = run(LINE, PredictedBracket(64, None), upper_limit=64)
    assert seed_sizes(PredictedBracket(64, None), 64) == [64]
    assert sizes == [64]
    assert (search.max_batch_size, search.first_failing_batch_size) == (64, None)
    assert search.prediction_right is True


def test_an_error_aborts_and_leaves_the_prediction_undecided() -> None:
    search = SeededSearch(PredictedBracket(96, 104), capacity_bytes=CAPACITY)
    assert search.next_size() == 96
    search.record(TrialRecord(batch_size=96, outcome=Outcome.ERROR, message="boom"))
    assert search.next_size() is None
    assert search.aborted_reason is not None
    assert search.prediction_right is None


def test_a_rejected_confirmation_counts_as_a_wrong_prediction() -> None:
    search, _ = run(LINE, PredictedBracket(96, 104))
    search.reject(96, TrialRecord(batch_size=96, outcome=Outcome.OOM))
    assert search.prediction_right is False
    assert search.next_size() == 88


@pytest.mark.parametrize(
    ("bracket", "message"),
    [
        ((96, 112), "not closed"),
        ((None, 2), "fail at batch size 1"),
        ((12, 16), "not on the ladder"),
    ],
)
def test_a_bracket_that_is_not_a_ladder_bracket_is_refused(
    bracket: tuple[int | None, int | None], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PredictedBracket(*bracket)


@st.composite
def brackets(draw: st.DrawFn) -> PredictedBracket:
    index = draw(st.integers(min_value=-1, max_value=400))
    if index < 0:
        return PredictedBracket(None, 1)
    size = [1, 2, 4][index] if index < 3 else 8 * (index - 2)
    return PredictedBracket(size, [2, 4, 8][index] if index < 3 else size + 8)


@settings(max_examples=400, deadline=None)
@given(
    curve=curves(),
    prediction=brackets(),
    upper_limit=st.none() | st.integers(min_value=1, max_value=4000),
    floor_share=st.none() | st.floats(min_value=0.0, max_value=1.2),
    bound_share=st.none() | st.floats(min_value=0.0, max_value=1.0),
)
def test_any_prediction_gives_the_exhaustive_answer(
    curve: Curve,
    prediction: PredictedBracket,
    upper_limit: int | None,
    floor_share: float | None,
    bound_share: float | None,
) -> None:
    search, sizes = run(
        curve,
        prediction,
        upper_limit=upper_limit,
        floor=None if floor_share is None else int(floor_share * CAPACITY),
        bound_share=bound_share,
    )
    truth = exhaustive(curve, CAPACITY, upper_limit)
    assert (search.max_batch_size, search.first_failing_batch_size) == truth
    assert len(sizes) == len(set(sizes)), f"a size was tried twice: {sizes}"
    assert all(is_ladder_size(n) for n in sizes)
    assert upper_limit is None or max(sizes) <= upper_limit
    if search.prediction_right:
        assert len(sizes) <= 2


@settings(max_examples=200, deadline=None)
@given(curve=curves(), upper_limit=st.none() | st.integers(min_value=1, max_value=4000))
def test_the_true_bracket_as_prediction_costs_at_most_two_trials(
    curve: Curve, upper_limit: int | None
) -> None:
    largest, failing = exhaustive(curve, CAPACITY, upper_limit)
    if largest is None and failing is None:
        return  # the limit is below 1: nothing to search
    prediction = PredictedBracket(largest, failing)
    search, sizes = run(curve, prediction, upper_limit=upper_limit)
    assert sizes == seed_sizes(prediction, upper_limit)
    assert search.prediction_right is True
