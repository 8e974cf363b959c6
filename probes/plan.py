"""The accumulation plan: ``per_device × accumulation × world_size = target`` (pure, no torch).

The per-device (micro) batch is a ladder size no larger than the measured maximum, so the plan
never asks for memory the search did not see fit. Among the micro batches that use the memory
well (at least ``1/EFFICIENT_SHARE`` of the largest usable one), the largest that divides the
per-device share of the target exactly wins, with the accumulation steps that make up the
rest. When none divides it (a prime target, a target that is not a multiple of the world size),
the plan is the one whose effective batch is nearest the target, ``exact`` is false, and
``note`` says what to change. A micro batch of 1 always divides, but a plan of 1 × 251 on a
device that fits 64 wastes most of the memory; the note names that exact alternative instead.
"""

from __future__ import annotations

from probes.search import ladder, ladder_floor
from probes.spec import Plan

MAX_ORDINARY_ACCUMULATION = 1024
"""More accumulation steps than this get a note: each optimizer step then runs that many
micro-batches one after another, which is rarely what a job wants (more devices would be)."""

EFFICIENT_SHARE = 4
"""A micro batch counts as using the memory well when it is at least the largest usable one
(the largest ladder size within both the measured maximum and one device's share of the
target) divided by this."""


def make_plan(*, max_batch_size: int, target: int, world_size: int) -> Plan:
    """The plan for ``target`` samples per optimizer step over ``world_size`` devices.

    ``max_batch_size`` is the largest per-device batch that fits (the search's answer).
    """
    for name, value in (("max_batch_size", max_batch_size), ("target", target), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    share, remainder = divmod(target, world_size)
    sizes = efficient_micro_batches(max_batch_size=max_batch_size, per_device_target=share)
    if remainder == 0:
        divisor = max(m for m in ladder(min(max_batch_size, share)) if share % m == 0)
        if divisor in sizes:
            return _with_accumulation_note(_plan(divisor, share // divisor, world_size, target))
    per_device, accumulation = _nearest(sizes, target, world_size)
    plan = _plan(per_device, accumulation, world_size, target)
    return plan.model_copy(update={"note": _note(plan, target, max_batch_size, sizes)})


def _with_accumulation_note(plan: Plan) -> Plan:
    steps = plan.gradient_accumulation_steps
    if steps <= MAX_ORDINARY_ACCUMULATION:
        return plan
    note = (
        f"Each optimizer step runs {steps} micro-batches one after another "
        f"(more than {MAX_ORDINARY_ACCUMULATION} accumulation steps): a larger world_size, or a "
        "smaller target, would make steps shorter."
    )
    return plan.model_copy(update={"note": note})


def efficient_micro_batches(*, max_batch_size: int, per_device_target: int) -> list[int]:
    """Ladder sizes within ``max_batch_size`` that use the memory well, ascending.

    The reference is the largest ladder size within both the maximum and one device's share of
    the target (at least 1): a micro batch below a quarter of it is passed over.
    """
    top = ladder_floor(min(max_batch_size, max(per_device_target, 1)))
    return [m for m in ladder(max_batch_size) if m * EFFICIENT_SHARE >= top]


def _nearest(sizes: list[int], target: int, world_size: int) -> tuple[int, int]:
    """The (micro batch, accumulation) whose effective batch is nearest ``target``.

    Ties go to the larger micro batch, then to fewer accumulation steps.
    """
    candidates = [
        (abs(m * accumulation * world_size - target), -m, accumulation)
        for m in sizes
        for accumulation in {max(1, target // (m * world_size)), target // (m * world_size) + 1}
    ]
    _, negative_micro, accumulation = min(candidates)
    return -negative_micro, accumulation


def _plan(per_device: int, accumulation: int, world_size: int, target: int) -> Plan:
    effective = per_device * accumulation * world_size
    return Plan(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        world_size=world_size,
        effective_batch_size=effective,
        exact=effective == target,
    )


def _note(plan: Plan, target: int, max_batch_size: int, sizes: list[int]) -> str:
    """A sentence a person can act on: why the plan misses the target and what would hit it."""
    world = plan.world_size
    effective = plan.effective_batch_size
    gives = f"this plan gives {effective} ({effective - target:+d})"
    if target < world:
        return (
            f"The target {target} is smaller than the world size {world}: every device takes at least "
            f"one sample per step, so the smallest effective batch is {world}; {gives}."
        )
    if target % world:
        below = target - target % world
        return (
            f"The target {target} is not a multiple of the world size {world}, so no plan reaches it "
            f"exactly; {gives}. Choose a multiple of {world} such as {below} or {below + world}."
        )
    share = target // world
    per_device = f"{share} per device ({target} over {world} devices)" if world > 1 else f"{share}"
    divisor = max(m for m in ladder(min(max_batch_size, share)) if share % m == 0)
    span = f"{sizes[0]} to {sizes[-1]}" if len(sizes) > 1 else f"{sizes[0]}"
    return (
        f"No micro batch from {span} (the ladder sizes that use the memory well) divides {per_device}; "
        f"{gives}. Set the target to {effective} for an exact plan, or, if it must be exactly {target}, "
        f"use per_device_train_batch_size={divisor} with gradient_accumulation_steps={share // divisor} "
        f"(slower)."
    )
