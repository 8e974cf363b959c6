"""The confirmation that holds for the whole job: lengths, allocator settings, headroom."""

from __future__ import annotations

import pytest

from probes.confirmation import (
    ALLOCATOR_ADVICE,
    ALLOCATOR_GRANULARITY_BYTES,
    DERIVED_HEADROOM_NOTE,
    VARIED_OPTIMIZER_STEPS,
    allocator_settings,
    confirmation_plan,
    confirmation_report,
    derived_headroom_bytes,
    dynamic_padding_lengths,
    judge_confirmation,
)
from probes.spec import DEFAULT_CUDA_ALLOC_CONF, ModelSpec, Outcome, ProbeSpec, TrialRecord

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


def test_the_advice_is_the_requests_default() -> None:
    assert ALLOCATOR_ADVICE == DEFAULT_CUDA_ALLOC_CONF == ProbeSpec.model_fields["cuda_alloc_conf"].default


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


# --- the engine's side: the plan, the judgement, the report (pure) ---------------------------


def _spec(**fields: object) -> ProbeSpec:
    base: dict[str, object] = {
        "model": ModelSpec(architecture="gpt2"),
        "seq_len": 256,
        "target_effective_batch_size": 64,
        "memory_limit_bytes": 1 << 30,
    }
    return ProbeSpec.model_validate({**base, **fields})


def test_every_varying_pair_of_steps_has_a_short_and_a_long_length() -> None:
    lengths = dynamic_padding_lengths(256, 20, worst_case_steps=4)[4:-1]
    assert all(n <= 128 for n in lengths[0::2])
    assert all(n > 128 for n in lengths[1::2])


@pytest.mark.parametrize(("kind", "varied"), [("cuda", 16), ("simulated", 2), ("predict", 0)])
def test_the_default_varied_steps_depend_on_the_device(kind: str, varied: int) -> None:
    plan = confirmation_plan(_spec(), kind)
    assert plan.varied_optimizer_steps == VARIED_OPTIMIZER_STEPS.get(kind, 0) == varied
    assert plan.optimizer_steps == 4 + varied
    if varied:
        assert plan.lengths is not None
        assert len(plan.lengths) == (4 + varied) * 2
        assert plan.lengths[: plan.worst_case_micro_steps] == (256,) * 8
        assert plan.varied_lengths == plan.lengths[8:]
        assert plan.varied_lengths[-1] == 256
        assert min(plan.varied_lengths) <= 128
    else:
        assert plan.lengths is None
    assert plan.derive_headroom is (kind == "cuda")


def test_the_request_sets_the_varied_steps_and_an_explicit_headroom_turns_the_derived_one_off() -> None:
    assert confirmation_plan(_spec(confirm_varied_steps=0), "cuda").lengths is None
    assert confirmation_plan(_spec(confirm_varied_steps=5), "simulated").optimizer_steps == 9
    assert not confirmation_plan(_spec(headroom_bytes=MiB), "cuda").derive_headroom


def _fit(batch: int, reserved: int | None, allocated: int | None, **fields: object) -> TrialRecord:
    return TrialRecord(
        batch_size=batch,
        outcome=Outcome.FIT,
        peak_reserved_bytes=reserved,
        peak_allocated_bytes=allocated,
        **fields,
    )


def test_on_cuda_the_answer_must_leave_its_measured_margin_free() -> None:
    plan = confirmation_plan(_spec(), "cuda")
    capacity = 1000 * MiB
    roomy = _fit(8, 900 * MiB, 890 * MiB)
    assert judge_confirmation(roomy, plan, capacity) is roomy  # 900 + 10 MiB fits under 1000
    tight = _fit(8, 990 * MiB, 970 * MiB - 1)  # margin just over 20 MiB: 22 MiB kept free
    judged = judge_confirmation(tight, plan, capacity)
    assert judged.outcome is Outcome.OVER_HEADROOM
    assert judged.message is not None
    assert judged.message.startswith(DERIVED_HEADROOM_NOTE)
    assert "22.00 MiB" in judged.message
    # an explicit headroom, a counting device or a failed trial: judged as they are
    assert judge_confirmation(tight, confirmation_plan(_spec(headroom_bytes=MiB), "cuda"), capacity) is tight
    assert judge_confirmation(tight, confirmation_plan(_spec(), "simulated"), capacity) is tight
    oom = TrialRecord(batch_size=8, outcome=Outcome.OOM)
    assert judge_confirmation(oom, plan, capacity) is oom


def test_the_report_names_the_lengths_the_margin_and_the_sizes_that_failed_late() -> None:
    plan = confirmation_plan(_spec(), "cuda")
    assert plan.lengths is not None
    worst = plan.worst_case_micro_steps
    conf = "expandable_segments:True"
    backing = _fit(16, 700 * MiB, 695 * MiB, lengths=plan.lengths, micro_steps_done=len(plan.lengths))
    backing = backing.model_copy(update={"cuda_alloc_conf": conf})
    trials = [
        TrialRecord(batch_size=32, outcome=Outcome.OOM, lengths=plan.lengths, micro_steps_done=worst + 3),
        TrialRecord(batch_size=48, outcome=Outcome.OOM, lengths=plan.lengths, micro_steps_done=1),
        TrialRecord(
            batch_size=24, outcome=Outcome.OVER_HEADROOM, message=f"{DERIVED_HEADROOM_NOTE}: x", lengths=()
        ),
        backing,
    ]
    report = confirmation_report(plan, backing, trials, "cuda")
    assert report.batch_size == 16
    assert report.all_fit
    assert (report.worst_case_optimizer_steps, report.varied_optimizer_steps) == (4, 16)
    assert report.varied_lengths == plan.varied_lengths
    assert report.cuda_alloc_conf == conf
    assert report.reserved_minus_allocated_bytes == 5 * MiB
    assert report.derived_headroom_bytes == 6 * MiB
    assert report.failed_sizes == (24, 32)  # 48 failed in the worst case: a worst-case run sees that too
    counted = confirmation_report(confirmation_plan(_spec(), "simulated"), backing, trials, "simulated")
    assert counted.reserved_minus_allocated_bytes is None  # not measurable on a counting device
    assert counted.derived_headroom_bytes is None
