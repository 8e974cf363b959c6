"""The ladder search against scripted memory curves: exact sequences, properties, trial budget."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.search import (
    MAX_JUMP_FACTOR,
    LadderSearch,
    is_ladder_size,
    ladder,
    ladder_ceil,
    ladder_floor,
    ladder_next,
    ladder_prev,
    training_state_bytes,
)
from probes.spec import Outcome, Precision, TrialRecord

Curve = Callable[[int], int]
GiB = 2**30
MiB = 2**20


# -- the ladder --------------------------------------------------------------------------


def test_ladder_lists_sizes_up_to_the_bound() -> None:
    assert ladder(0) == []
    assert ladder(1) == [1]
    assert ladder(7) == [1, 2, 4]
    assert ladder(8) == [1, 2, 4, 8]
    assert ladder(41) == [1, 2, 4, 8, 16, 24, 32, 40]


@pytest.mark.parametrize(
    ("n", "floor", "ceil", "following"),
    [
        (1, 1, 1, 2),
        (2, 2, 2, 4),
        (3, 2, 4, 4),
        (5, 4, 8, 8),
        (8, 8, 8, 16),
        (9, 8, 16, 16),
        (100, 96, 104, 104),
    ],
)
def test_ladder_neighbours(n: int, floor: int, ceil: int, following: int) -> None:
    assert ladder_floor(n) == floor
    assert ladder_ceil(n) == ceil
    assert ladder_next(n) == following


def test_ladder_prev_and_the_bottom_of_the_ladder() -> None:
    assert [ladder_prev(n) for n in (2, 3, 4, 8, 16, 24, 100)] == [1, 2, 2, 4, 8, 16, 96]
    with pytest.raises(ValueError, match="below 1"):
        ladder_prev(1)
    with pytest.raises(ValueError, match="at or below 0"):
        ladder_floor(0)
    assert ladder_next(0) == 1
    assert ladder_ceil(-5) == 1


@given(st.integers(min_value=1, max_value=100_000))
def test_ladder_helpers_agree_with_the_listed_ladder(n: int) -> None:
    sizes = ladder(n + 20)
    assert is_ladder_size(n) == (n in sizes)
    assert ladder_floor(n) == max(s for s in sizes if s <= n)
    assert ladder_ceil(n) == min(s for s in sizes if s >= n)
    assert ladder_next(n) == min(s for s in sizes if s > n)
    if n >= 2:
        assert ladder_prev(n) == max(s for s in sizes if s < n)


# -- a tiny driver -----------------------------------------------------------------------


@dataclass
class Run:
    sizes: list[int]
    failures: int
    search: LadderSearch


def trial_for(
    n: int, curve: Curve, capacity: int, limit: int | None = None, bound_share: float | None = None
) -> TrialRecord:
    """What a trial at ``n`` reports: fit iff the peak is within capacity.

    A peak above the capacity but within ``limit`` ran to the end (over the headroom, peak
    known); above the limit it ran out of memory (no peak). With ``bound_share``, the
    out-of-memory trial reports a lower bound of its peak: the limit (else the capacity) plus
    that share of the way up to the peak (0: it failed as soon as it crossed, 1: at its peak).
    """
    peak = curve(n)
    if peak <= capacity:
        return TrialRecord(batch_size=n, outcome=Outcome.FIT, peak_reserved_bytes=peak)
    if limit is not None and peak <= limit:
        return TrialRecord(batch_size=n, outcome=Outcome.OVER_HEADROOM, peak_reserved_bytes=peak)
    bound = None
    if bound_share is not None:
        crossed = (limit if limit is not None else capacity) + 1
        bound = min(peak, crossed + int(bound_share * max(peak - crossed, 0)))
    return TrialRecord(batch_size=n, outcome=Outcome.OOM, needed_bytes=bound)


def drive(
    curve: Curve,
    capacity: int,
    *,
    known_capacity: bool = True,
    limit: int | None = None,
    upper_limit: int | None = None,
    start: int = 1,
    search: LadderSearch | None = None,
    floor: int | None = None,
    bound_share: float | None = None,
) -> Run:
    if search is None:
        search = LadderSearch(
            capacity_bytes=capacity if known_capacity else None,
            upper_limit=upper_limit,
            start=start,
            floor_bytes=floor,
        )
    sizes: list[int] = []
    failures = 0
    while (n := search.next_size()) is not None:
        assert len(sizes) < 200, f"runaway search: {sizes[:30]}"
        sizes.append(n)
        trial = trial_for(n, curve, capacity, limit, bound_share)
        failures += trial.outcome is not Outcome.FIT
        search.record(trial)
    return Run(sizes, failures, search)


def exhaustive(curve: Curve, capacity: int, upper_limit: int | None) -> tuple[int | None, int | None]:
    """Walk the whole ladder: (largest fitting size, smallest failing size), both within the limit."""
    largest: int | None = None
    n = 1
    while upper_limit is None or n <= upper_limit:
        if curve(n) > capacity:
            return largest, n
        largest = n
        n = ladder_next(n)
    return largest, None


def linear(intercept: float, slope: float) -> Curve:
    return lambda n: int(intercept + slope * n)


def floored(floor: float, intercept: float, slope: float) -> Curve:
    return lambda n: int(max(floor, intercept + slope * n))


def kinked(intercept: float, slope: float, knee: float, steeper: float) -> Curve:
    """Slope ``slope`` up to ``knee``, then ``slope * steeper`` (the peak op moves)."""
    return lambda n: int(intercept + slope * min(n, knee) + slope * steeper * max(0.0, n - knee))


def plateau(floor: float, optimizer_extra: float, activation_free: float, slope: float) -> Curve:
    """A training step's peak: the optimizer step's plateau or the backward's line, whichever is higher.

    ``floor`` is weights + gradients + optimizer state, ``optimizer_extra`` the optimizer step's
    temporaries on top, ``activation_free`` the batch-free bytes the backward adds to the floor.
    """
    return lambda n: int(max(floor + optimizer_extra, floor + activation_free + slope * n))


# -- named cases: the exact sizes tried ---------------------------------------------------


def test_linear_curve_jumps_to_the_predicted_boundary_and_checks_the_next_size() -> None:
    run = drive(linear(300, 7), 1000)  # boundary at 100 → ladder floor 96
    assert run.sizes == [1, 2, 96, 104]
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (96, 104)
    assert run.failures == 1
    assert run.search.done
    assert [t.batch_size for t in run.search.trials] == [1, 2, 96, 104]


def test_boundary_exactly_on_a_ladder_size_fits() -> None:
    on = drive(linear(400, 3), 1000)  # peak(200) == capacity exactly
    assert on.sizes == [1, 2, 200, 208]
    assert on.search.max_batch_size == 200
    below = drive(linear(400, 3), 999)  # boundary 199.67
    assert below.sizes == [1, 2, 192, 200]
    assert below.search.max_batch_size == 192


def test_floored_curve_doubles_through_the_flat_part_then_bisects() -> None:
    run = drive(floored(600, 100, 10), 1000)  # flat up to 50, boundary 90
    assert run.sizes == [1, 2, 4, 8, 16, 32, 64, 120, 88, 96]
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (88, 96)


def test_kinked_curve_recovers_from_an_optimistic_jump() -> None:
    curve = kinked(200, 2, 100, 3)  # slope 2 up to 100, then 6; boundary 183.3
    run = drive(curve, 900)
    assert run.sizes == [1, 2, 344, 168, 192, 176, 184]
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (176, 184)


def test_a_failure_with_a_peak_is_interpolated() -> None:
    # Same curve, but failures up to 2000 bytes ran to the end and report their peak.
    run = drive(kinked(200, 2, 100, 3), 900, limit=2000)
    assert run.sizes == [1, 2, 344, 144, 216, 176, 184]
    assert run.search.trials[2].outcome is Outcome.OVER_HEADROOM
    assert run.search.max_batch_size == 176


def test_without_capacity_the_search_doubles_then_bisects() -> None:
    run = drive(linear(300, 7), 1000, known_capacity=False)
    assert run.sizes == [1, 2, 4, 8, 16, 32, 64, 128, 96, 112, 104]
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (96, 104)


def test_everything_fits_up_to_the_limit() -> None:
    run = drive(linear(10, 1), 1000, upper_limit=100)  # 100 is not on the ladder: 96 is the cap
    assert run.sizes == [1, 2, 96]
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (96, None)
    assert run.search.done


def test_a_start_above_the_limit_is_capped() -> None:
    run = drive(linear(10, 1), 1000, upper_limit=100, start=200)
    assert run.sizes == [96]
    assert run.search.max_batch_size == 96


def test_a_failing_start_bisects_below_it() -> None:
    run = drive(linear(300, 7), 1000, start=200)
    assert run.sizes == [200, 88, 144, 112, 96, 104]
    assert run.search.max_batch_size == 96


def test_nothing_fits() -> None:
    run = drive(linear(2000, 1), 1000)
    assert run.sizes == [1]
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (None, 1)
    assert run.search.done
    assert run.search.aborted_reason is None


def test_a_rejected_confirmation_reopens_the_search_one_size_down() -> None:
    curve = linear(300, 7)
    run = drive(curve, 1000)
    assert run.sizes == [1, 2, 96, 104]
    confirmation = TrialRecord(batch_size=96, outcome=Outcome.OOM, message="CUDA out of memory.")
    run.search.reject(96, confirmation)
    assert not run.search.done
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (2, 96)
    again = drive(curve, 1000, search=run.search)
    assert again.sizes == [88]
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == (88, 96)
    assert [t.batch_size for t in run.search.trials] == [1, 2, 96, 104, 96, 88]
    assert run.search.trials[4] is confirmation


def test_rejecting_when_the_size_below_already_passed_closes_at_once() -> None:
    search = LadderSearch(capacity_bytes=None)
    for n in (1, 2, 4, 8, 16):
        search.record(TrialRecord(batch_size=n, outcome=Outcome.FIT))
    search.record(TrialRecord(batch_size=24, outcome=Outcome.OOM))
    search.reject(16, TrialRecord(batch_size=16, outcome=Outcome.OVER_HEADROOM, peak_reserved_bytes=10))
    assert search.done
    assert (search.max_batch_size, search.first_failing_batch_size) == (8, 16)


@pytest.mark.parametrize("outcome", [Outcome.ERROR, Outcome.TIMEOUT, Outcome.CRASH])
def test_an_error_aborts_the_search(outcome: Outcome) -> None:
    search = LadderSearch(capacity_bytes=1000)
    search.record(TrialRecord(batch_size=1, outcome=Outcome.FIT, peak_reserved_bytes=307))
    assert search.next_size() == 2
    search.record(TrialRecord(batch_size=2, outcome=outcome, message="an illegal memory access"))
    assert search.next_size() is None
    assert search.done
    reason = search.aborted_reason
    assert reason is not None
    assert "batch size 2" in reason
    assert outcome.value in reason
    assert "an illegal memory access" in reason
    assert search.max_batch_size == 1
    with pytest.raises(ValueError, match="aborted"):
        search.record(TrialRecord(batch_size=4, outcome=Outcome.FIT))
    with pytest.raises(ValueError, match="aborted"):
        search.reject(1, TrialRecord(batch_size=1, outcome=Outcome.OOM))


def test_record_refuses_sizes_off_the_ladder_or_already_decided() -> None:
    search = LadderSearch(capacity_bytes=None, upper_limit=64)
    with pytest.raises(ValueError, match="not on the ladder"):
        search.record(TrialRecord(batch_size=12, outcome=Outcome.FIT))
    with pytest.raises(ValueError, match="above the upper limit"):
        search.record(TrialRecord(batch_size=72, outcome=Outcome.FIT))
    search.record(TrialRecord(batch_size=8, outcome=Outcome.FIT))
    search.record(TrialRecord(batch_size=32, outcome=Outcome.OOM))
    for n in (4, 8, 32, 40):
        with pytest.raises(ValueError, match="already decided"):
            search.record(TrialRecord(batch_size=n, outcome=Outcome.FIT))
    assert [t.batch_size for t in search.trials] == [8, 32]


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        LadderSearch(capacity_bytes=0)
    with pytest.raises(ValueError, match="upper_limit"):
        LadderSearch(capacity_bytes=None, upper_limit=0)
    with pytest.raises(ValueError, match="start"):
        LadderSearch(capacity_bytes=None, start=0)


def test_a_flat_then_barely_rising_curve_does_not_jump_past_the_limit_factor() -> None:
    # Peaks 1 byte apart at sizes 1 and 2: the line points absurdly far; the jump is capped.
    curve = linear(500_000, 1)
    run = drive(curve, 1_000_000)
    assert run.sizes[:3] == [1, 2, 2 * MAX_JUMP_FACTOR]
    assert run.search.max_batch_size == exhaustive(curve, 1_000_000, None)[0]


# -- the floor and the lower bounds of out-of-memory trials ---------------------------------

# Issue 11's flat-floor case, measured on the simulated device (bench/floor_search.py): GPT-2 shape
# (2 layers, 256 wide, vocabulary 32000), seq 64, 32-true, no checkpointing, 2 optimizer steps x
# accumulation 2, 400 MiB. The peak is the optimizer step's up to 2 samples, then a line from 4 on;
# each out-of-memory trial's bound is the counted bytes in use plus those requested at the failure.
NAMED_CAPACITY = 400 * MiB
NAMED_FLOOR = training_state_bytes(10_034_176, Precision.FP32)  # 160,546,816 B: 16 B per parameter
NAMED_BOUNDS = {512: 444_707_328, 248: 480_047_616, 120: 426_107_392, 56: 752_435_712, 24: 548_454_912}
NAMED_BOUNDS[16] = 505_796_096


def named_peak(n: int) -> int:
    return max(258_870_784 if n == 1 else 258_873_856, 160_564_224 + 29_103_616 * n)


def drive_named(*, floor: int | None, bounds: bool) -> list[int]:
    search = LadderSearch(capacity_bytes=NAMED_CAPACITY, floor_bytes=floor)
    while (n := search.next_size()) is not None:
        peak = named_peak(n)
        if peak <= NAMED_CAPACITY:
            search.record(TrialRecord(batch_size=n, outcome=Outcome.FIT, peak_reserved_bytes=peak))
        else:
            bound = NAMED_BOUNDS[n] if bounds else None
            search.record(TrialRecord(batch_size=n, outcome=Outcome.OOM, needed_bytes=bound))
    assert (search.max_batch_size, search.first_failing_batch_size) == (8, 16)
    return [t.batch_size for t in search.trials]


def test_the_named_flat_floor_case() -> None:
    # What the issue saw: the flat line jumps to the 256x cap, then bisects down (6 OOMs).
    assert drive_named(floor=None, bounds=False) == [1, 2, 512, 248, 120, 56, 24, 8, 16]
    # The lower bound at 56 (752 MB: it failed late) puts the chord's crossing below 24.
    assert drive_named(floor=None, bounds=True) == [1, 2, 512, 248, 120, 56, 16, 4, 8]
    # The floor: the line through 1 and 2 is flat (3 KB a sample; the floor allows 47 MB), so the
    # floor aims: its bound says 5.3, and along a plateau the search grows at least 4x: 8. From 2 to
    # 8 the line is steep and says 8.9, so 16 closes the bracket: 4 trials, 1 out of memory.
    assert drive_named(floor=NAMED_FLOOR, bounds=True) == [1, 2, 8, 16]
    assert drive_named(floor=NAMED_FLOOR, bounds=False) == [1, 2, 8, 16]


def test_training_state_bytes() -> None:
    assert training_state_bytes(1000, Precision.FP32) == 16_000
    assert training_state_bytes(1000, Precision.BF16_MIXED) == 16_000
    assert training_state_bytes(1000, Precision.FP16_MIXED) == 16_000
    assert training_state_bytes(1000, Precision.BF16_TRUE) == 8_000
    # LoRA: every weight, but gradients and moments only for the adapters.
    assert training_state_bytes(1000, Precision.FP32, trainable_parameter_count=10) == 4_000 + 120
    assert training_state_bytes(1000, Precision.FP32, optimizer="adamw_torch_fused") == 16_000
    assert training_state_bytes(1000, Precision.FP32, optimizer="adamw_bnb_8bit") == 10_000
    assert training_state_bytes(1000, Precision.FP32, optimizer="sgd") == 8_000
    assert training_state_bytes(1000, Precision.BF16_TRUE, optimizer="adafactor") == 4_000
    assert training_state_bytes(1000, Precision.FP32, optimizer="lion") is None
    with pytest.raises(ValueError, match="trainable_parameter_count"):
        training_state_bytes(10, Precision.FP32, trainable_parameter_count=11)
    with pytest.raises(ValueError, match="floor_bytes"):
        LadderSearch(capacity_bytes=1000, floor_bytes=-1)


def test_a_floor_at_or_above_a_passing_peak_is_ignored() -> None:
    """A floor that a measured peak contradicts is no floor of this curve: the search works without it."""
    curve = linear(300, 7)
    assert drive(curve, 1000, floor=400).sizes == drive(curve, 1000).sizes == [1, 2, 96, 104]


def test_a_steep_line_is_trusted_over_the_floor() -> None:
    # Intercept 300 above a floor of 100: the floor's bound is conservative (2 * 900 / 214 = 8.4),
    # the line is exact (boundary 100), and it is not flat (slope 7 >= half of 214 / 2).
    run = drive(linear(300, 7), 1000, floor=100)
    assert run.sizes == [1, 2, 96, 104]


def test_a_lower_bound_is_not_trusted_beyond_the_bisection() -> None:
    """A chord to a lower bound can point too far right: above the bisection it is not followed.

    A flat line sends the search to 512, which fails. Whether the trial failed as soon as it
    crossed the capacity (bound share 0: the chord points just below 512) or at its peak, the
    crossing lies above the bisection's middle, so the search bisects as without a bound rather
    than walking down one ladder size at a time.
    """

    def curve(n: int) -> int:  # 800,000 + n up to 200 samples, then 600,000 + 1000 n: boundary 400
        return max(800_000 + n, 600_000 + 1000 * n)

    plain = drive(curve, 1_000_000).sizes
    assert plain == [1, 2, 512, 248, 376, 400, 408]
    assert drive(curve, 1_000_000, bound_share=0.0).sizes == plain
    assert drive(curve, 1_000_000, bound_share=1.0).sizes == plain


# -- properties: the answer equals exhaustive search on the ladder -----------------------

CAPACITY = 10**9


@st.composite
def curves(draw: st.DrawFn) -> Curve:
    intercept = draw(st.floats(min_value=0.0, max_value=1.1)) * CAPACITY
    boundary = draw(st.floats(min_value=0.5, max_value=3000.0))
    slope = max(1.0, (CAPACITY - intercept) / boundary) if intercept < CAPACITY else CAPACITY / 100
    kind = draw(st.sampled_from(["linear", "floored", "kinked", "plateau"]))
    if kind == "linear":
        return linear(intercept, slope)
    if kind == "plateau":
        extra = draw(st.floats(min_value=0.0, max_value=1.0)) * CAPACITY
        free = draw(st.floats(min_value=0.0, max_value=0.2)) * CAPACITY
        return plateau(intercept, extra, free, slope)
    if kind == "floored":
        return floored(draw(st.floats(min_value=0.0, max_value=1.05)) * CAPACITY, intercept, slope)
    knee = draw(st.floats(min_value=1.0, max_value=2000.0))
    return kinked(intercept, slope, knee, draw(st.floats(min_value=1.0, max_value=8.0)))


@settings(max_examples=400, deadline=None)
@given(
    curve=curves(),
    upper_limit=st.none() | st.integers(min_value=1, max_value=4000),
    known_capacity=st.booleans(),
    report_over_headroom=st.booleans(),
    start=st.sampled_from([1, 1, 1, 2, 8, 64, 300]),
    floor_share=st.none() | st.floats(min_value=0.0, max_value=1.2),
    bound_share=st.none() | st.floats(min_value=0.0, max_value=1.0),
)
def test_search_equals_exhaustive_ladder_search(
    curve: Curve,
    upper_limit: int | None,
    known_capacity: bool,
    report_over_headroom: bool,
    start: int,
    floor_share: float | None,
    bound_share: float | None,
) -> None:
    """Any floor (right or wrong) and any lower bounds move only where the search measures."""
    limit = CAPACITY + CAPACITY // 5 if report_over_headroom else None
    run = drive(
        curve,
        CAPACITY,
        known_capacity=known_capacity,
        limit=limit,
        upper_limit=upper_limit,
        start=start,
        floor=None if floor_share is None else int(floor_share * CAPACITY),
        bound_share=bound_share,
    )
    expected = exhaustive(curve, CAPACITY, upper_limit)
    assert (run.search.max_batch_size, run.search.first_failing_batch_size) == expected
    assert len(run.sizes) == len(set(run.sizes)), f"a size was tried twice: {run.sizes}"
    assert all(is_ladder_size(n) for n in run.sizes)
    assert upper_limit is None or max(run.sizes) <= upper_limit
    assert run.search.done


@settings(max_examples=200, deadline=None)
@given(curve=curves(), drift=st.integers(min_value=1, max_value=CAPACITY // 10))
def test_after_a_reject_the_search_equals_exhaustive_search_of_the_stricter_curve(
    curve: Curve, drift: int
) -> None:
    """A confirmation that needs ``drift`` more bytes rejects the answer; the search settles lower."""
    run = drive(curve, CAPACITY)
    answer = run.search.max_batch_size

    def stricter(n: int) -> int:
        return curve(n) + drift

    while answer is not None and stricter(answer) > CAPACITY:
        run.search.reject(answer, trial_for(answer, stricter, CAPACITY))
        drive(stricter, CAPACITY, search=run.search)
        answer = run.search.max_batch_size
    tried = [t.batch_size for t in run.search.trials]
    assert answer == exhaustive(stricter, CAPACITY, None)[0]
    assert all(tried.count(n) <= 2 for n in tried), tried  # once as a trial, at most once as a confirmation


# -- the trial budget on realistic curves --------------------------------------------------


def _family_cost(peak_for: Callable[[float, float, float], Curve], seed: int) -> tuple[float, float]:
    """Mean trials and mean failures over 500 linear-ish curves of realistic shape."""
    rng = random.Random(seed)
    trials = failures = 0
    count = 500
    for _ in range(count):
        capacity = rng.choice([16, 24, 40, 80, 141]) * GiB
        share = rng.uniform(0.3, 0.7)  # weights, gradients and optimizer state
        boundary = rng.uniform(8, 400)
        curve = peak_for(capacity, share, boundary)
        run = drive(curve, capacity)
        assert run.search.max_batch_size == exhaustive(curve, capacity, None)[0]
        trials += len(run.sizes)
        failures += run.failures
    return trials / count, failures / count


def test_realistic_linear_curves_cost_few_trials_and_one_oom() -> None:
    def exact(capacity: float, share: float, boundary: float) -> Curve:
        return linear(share * capacity, (1 - share) * capacity / boundary)

    mean_trials, mean_ooms = _family_cost(exact, seed=1)
    assert mean_trials <= 5
    assert mean_ooms <= 1


def test_allocator_rounded_curves_stay_within_budget() -> None:
    """Reserved memory comes in 2 MiB blocks: the slope from sizes 1 and 2 is slightly off."""

    def rounded(capacity: float, share: float, boundary: float) -> Curve:
        exact = linear(share * capacity, (1 - share) * capacity / boundary)
        return lambda n: -(-exact(n) // (2 * MiB)) * 2 * MiB

    mean_trials, mean_ooms = _family_cost(rounded, seed=2)
    assert mean_trials <= 5
    assert mean_ooms <= 1.1


def _plateau_cost(seed: int, *, with_floor: bool) -> tuple[float, float]:
    """Mean trials and failures over 500 curves with an optimizer-step plateau (boundary 2-64).

    Weights + gradients + AdamW state ``F`` are 30-70 % of the capacity, the optimizer step's
    temporaries add 5-50 % of ``F`` (the plateau), the backward adds up to 5 % of ``F`` plus the
    activations; on the plateau only the batch's token tensors grow (1e-4 of the activations' slope).
    Out-of-memory trials report a bound anywhere between the capacity and their peak.
    """
    rng = random.Random(seed)
    trials = failures = 0
    count = 500
    for _ in range(count):
        capacity = rng.choice([16, 24, 40, 80, 141]) * GiB
        floor = rng.uniform(0.3, 0.7) * capacity
        extra = rng.uniform(0.05, 0.5) * floor
        free = rng.uniform(0.0, 0.05) * floor
        slope = (capacity - floor - free) / rng.uniform(2, 64)
        step = plateau(floor, extra, free, slope)

        def curve(n: int, step: Curve = step, tokens: float = slope * 1e-4) -> int:
            return step(n) + int(tokens * n)

        run = drive(curve, capacity, floor=int(floor) if with_floor else None, bound_share=rng.random())
        assert run.search.max_batch_size == exhaustive(curve, capacity, None)[0]
        trials += len(run.sizes)
        failures += run.failures
    return trials / count, failures / count


def test_a_floor_shortens_the_walk_along_an_optimizer_plateau() -> None:
    with_floor = _plateau_cost(3, with_floor=True)
    without = _plateau_cost(3, with_floor=False)
    assert with_floor[0] < without[0]
    assert with_floor[1] < without[1] - 0.5
    assert with_floor[0] <= 6.0
    assert with_floor[1] <= 1.6


def test_a_floor_costs_nothing_on_plain_lines() -> None:
    """Lines whose batch-free part sits up to half the room above the floor: the same trials as without."""
    rng = random.Random(4)
    for _ in range(300):
        capacity = rng.choice([16, 24, 40, 80, 141]) * GiB
        floor = rng.uniform(0.3, 0.7) * capacity
        above = rng.uniform(0.0, 0.5) * (capacity - floor)
        curve = linear(floor + above, (capacity - floor - above) / rng.uniform(2, 400))
        assert drive(curve, capacity, floor=int(floor)).sizes == drive(curve, capacity).sizes
