"""The confirmation that holds for the whole job: lengths, allocator settings, headroom."""

from __future__ import annotations

import pytest

from probes.confirmation import (
    ALLOCATOR_ADVICE,
    ALLOCATOR_GRANULARITY_BYTES,
    allocator_settings,
    derived_headroom_bytes,
    dynamic_padding_lengths,
)

MiB = 2**20


def test_the_worst_case_comes_first_and_last_and_the_rest_varies() -> None:
    lengths = dynamic_padding_lengths(2048, 200, worst_case_steps=4)
    assert len(lengths) == 200
    assert lengths[:4] == [2048] * 4
    assert lengths[-1] == 2048
    middle = lengths[4:-1]
    assert all(1 <= n <= 2048 and n % 8 == 0 for n in middle)
    assert len(set(middle)) > 100  # new sizes nearly every step: what fragments the cache
    assert min(middle) < 512
    assert max(middle) > 1536


def test_the_lengths_are_the_same_every_time_for_a_seed() -> None:
    assert dynamic_padding_lengths(512, 50) == dynamic_padding_lengths(512, 50)
    assert dynamic_padding_lengths(512, 50, seed=1) != dynamic_padding_lengths(512, 50)


def test_padding_never_passes_the_sequence_length() -> None:
    lengths = dynamic_padding_lengths(100, 300, pad_to_multiple_of=64)
    assert set(lengths) <= {64, 100}
    assert dynamic_padding_lengths(5, 10, pad_to_multiple_of=1)[2:-1] != []


@pytest.mark.parametrize(
    ("seq_len", "steps", "worst", "message"),
    [(0, 10, 2, "at least 1"), (64, 3, 2, "no room"), (64, 10, 0, "no room")],
)
def test_impossible_step_lists_are_refused(seq_len: int, steps: int, worst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dynamic_padding_lengths(seq_len, steps, worst_case_steps=worst)


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (None, ALLOCATOR_ADVICE),
        ("", ALLOCATOR_ADVICE),
        ("max_split_size_mb:128", f"max_split_size_mb:128,{ALLOCATOR_ADVICE}"),
        ("expandable_segments:False", "expandable_segments:False"),
        (
            " garbage_collection_threshold:0.6 , expandable_segments:True",
            "garbage_collection_threshold:0.6,expandable_segments:True",
        ),
    ],
)
def test_allocator_settings_keep_the_jobs_own_choices(current: str | None, expected: str) -> None:
    assert allocator_settings(current) == expected


def test_headroom_is_the_largest_gap_rounded_up_to_the_allocator_granularity() -> None:
    assert derived_headroom_bytes([(10 * MiB, 10 * MiB)]) == 0
    assert derived_headroom_bytes([(100 * MiB, 99 * MiB), (120 * MiB, 115 * MiB + 1)]) == 6 * MiB
    assert derived_headroom_bytes([(3 * MiB, MiB)]) == ALLOCATOR_GRANULARITY_BYTES
    with pytest.raises(ValueError, match="no measurement"):
        derived_headroom_bytes([])
    with pytest.raises(ValueError, match="cannot exceed"):
        derived_headroom_bytes([(MiB, 2 * MiB)])
