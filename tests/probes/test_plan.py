"""The accumulation plan: exact where a good micro batch divides the target, nearest otherwise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.plan import MAX_ORDINARY_ACCUMULATION, efficient_micro_batches, make_plan
from probes.search import is_ladder_size
from probes.spec import Plan


def shape(plan: Plan) -> tuple[int, int, int, int, bool]:
    return (
        plan.per_device_train_batch_size,
        plan.gradient_accumulation_steps,
        plan.world_size,
        plan.effective_batch_size,
        plan.exact,
    )


def test_target_below_the_maximum_needs_no_accumulation() -> None:
    plan = make_plan(max_batch_size=64, target=24, world_size=1)
    assert shape(plan) == (24, 1, 1, 24, True)
    assert plan.note is None


def test_target_above_the_maximum_takes_the_largest_dividing_ladder_size() -> None:
    assert shape(make_plan(max_batch_size=16, target=24, world_size=1)) == (8, 3, 1, 24, True)
    assert shape(make_plan(max_batch_size=40, target=1000, world_size=1)) == (40, 25, 1, 1000, True)
    assert shape(make_plan(max_batch_size=32, target=48, world_size=1)) == (24, 2, 1, 48, True)


def test_a_target_that_is_not_a_ladder_size_uses_a_divisor_below_it() -> None:
    # 12 is no ladder size: 4 × 3 is exact and 4 is within a quarter of the usable 8.
    assert shape(make_plan(max_batch_size=64, target=12, world_size=1)) == (4, 3, 1, 12, True)


@pytest.mark.parametrize(
    ("max_batch_size", "expected"), [(64, (32, 1, 8, 256, True)), (16, (16, 2, 8, 256, True))]
)
def test_world_size_splits_the_target(max_batch_size: int, expected: tuple[int, int, int, int, bool]) -> None:
    plan = make_plan(max_batch_size=max_batch_size, target=256, world_size=8)
    assert shape(plan) == expected
    assert plan.note is None


def test_a_prime_target_gives_the_nearest_plan_and_says_how_to_be_exact() -> None:
    plan = make_plan(max_batch_size=64, target=251, world_size=1)
    # 64 × 4 = 256 and 16 × 16 = 256 are both 5 away: the larger micro batch wins.
    assert shape(plan) == (64, 4, 1, 256, False)
    assert plan.note is not None
    assert "251" in plan.note
    assert "Set the target to 256" in plan.note
    assert "per_device_train_batch_size=1 with gradient_accumulation_steps=251" in plan.note


def test_an_exact_plan_with_a_tiny_micro_batch_is_passed_over_for_a_near_one() -> None:
    # 100 = 4 × 25, but 4 is far below the 64 that fits; 48 × 2 = 96 is the nearest good plan.
    plan = make_plan(max_batch_size=64, target=100, world_size=1)
    assert shape(plan) == (48, 2, 1, 96, False)
    assert plan.note is not None
    assert "per_device_train_batch_size=4 with gradient_accumulation_steps=25" in plan.note
    # With only 8 fitting, 4 × 25 uses the memory well and is exact.
    assert shape(make_plan(max_batch_size=8, target=100, world_size=1)) == (4, 25, 1, 100, True)


def test_a_target_not_divisible_by_the_world_size_names_the_multiples_around_it() -> None:
    plan = make_plan(max_batch_size=64, target=100, world_size=8)
    assert shape(plan) == (4, 3, 8, 96, False)
    assert plan.note is not None
    assert "not a multiple of the world size 8" in plan.note
    assert "96 or 104" in plan.note


def test_a_target_below_the_world_size_gives_one_sample_per_device() -> None:
    plan = make_plan(max_batch_size=64, target=4, world_size=8)
    assert shape(plan) == (1, 1, 8, 8, False)
    assert plan.note is not None
    assert "smaller than the world size 8" in plan.note


def test_max_batch_size_one_accumulates_everything() -> None:
    assert shape(make_plan(max_batch_size=1, target=7, world_size=1)) == (1, 7, 1, 7, True)
    assert shape(make_plan(max_batch_size=1, target=256, world_size=8)) == (1, 32, 8, 256, True)
    # 7 over 2 devices: 6 and 8 are equally near; fewer accumulation steps win.
    uneven = make_plan(max_batch_size=1, target=7, world_size=2)
    assert shape(uneven) == (1, 3, 2, 6, False)


def test_a_maximum_off_the_ladder_is_never_exceeded() -> None:
    # 100 fits, but micro batches come from the ladder: 96 is the largest.
    plan = make_plan(max_batch_size=100, target=192, world_size=1)
    assert shape(plan) == (96, 2, 1, 192, True)


@pytest.mark.parametrize("field", ["max_batch_size", "target", "world_size"])
def test_arguments_must_be_positive(field: str) -> None:
    arguments = {"max_batch_size": 8, "target": 8, "world_size": 1, field: 0}
    with pytest.raises(ValueError, match=field):
        make_plan(**arguments)


def test_efficient_micro_batches_reach_down_to_a_quarter_of_the_usable_size() -> None:
    assert efficient_micro_batches(max_batch_size=64, per_device_target=251) == [16, 24, 32, 40, 48, 56, 64]
    assert efficient_micro_batches(max_batch_size=64, per_device_target=12) == [
        2,
        4,
        8,
        16,
        24,
        32,
        40,
        48,
        56,
        64,
    ]
    assert efficient_micro_batches(max_batch_size=1, per_device_target=100) == [1]


@settings(max_examples=500, deadline=None)
@given(
    max_batch_size=st.integers(min_value=1, max_value=512),
    target=st.integers(min_value=1, max_value=5000),
    world_size=st.sampled_from([1, 1, 2, 3, 4, 8, 16, 64]),
)
def test_plan_properties(max_batch_size: int, target: int, world_size: int) -> None:
    plan = make_plan(max_batch_size=max_batch_size, target=target, world_size=world_size)
    micro = plan.per_device_train_batch_size
    assert micro <= max_batch_size
    assert is_ladder_size(micro)
    assert plan.gradient_accumulation_steps >= 1
    assert plan.world_size == world_size
    assert plan.effective_batch_size == micro * plan.gradient_accumulation_steps * world_size
    assert plan.exact == (plan.effective_batch_size == target)
    ordinary = plan.gradient_accumulation_steps <= MAX_ORDINARY_ACCUMULATION
    assert (plan.note is None) == (plan.exact and ordinary)

    good = efficient_micro_batches(max_batch_size=max_batch_size, per_device_target=target // world_size)
    assert micro in good
    # Brute force over every good micro batch and a generous range of accumulation steps.
    distance = abs(plan.effective_batch_size - target)
    for m in good:
        for steps in range(1, target // (m * world_size) + 3):
            assert abs(m * steps * world_size - target) >= distance
    if target % world_size == 0:
        share = target // world_size
        dividing = [m for m in good if share % m == 0 and m <= share]
        assert plan.exact == bool(dividing)
        if dividing:
            assert micro == max(dividing)
            if share <= max_batch_size and is_ladder_size(share):
                assert plan.gradient_accumulation_steps == 1
    else:
        assert not plan.exact


def test_a_plan_with_absurd_accumulation_says_so() -> None:
    plan = make_plan(max_batch_size=1, target=2**20, world_size=1)
    assert shape(plan) == (1, 2**20, 1, 2**20, True)
    assert plan.note is not None
    assert "1048576 micro-batches" in plan.note, plan.note
    assert "world_size" in plan.note


def test_ordinary_accumulation_carries_no_note() -> None:
    assert make_plan(max_batch_size=4, target=4096, world_size=1).note is None
