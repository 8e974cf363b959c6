"""A confirmation that holds for the whole job: dynamic padding, the job's allocator settings, headroom.

The search's trials and today's confirmation repeat the worst-case shape (every sequence at
``seq_len``), which keeps CUDA's caching allocator in its easiest state: the same block sizes every
step. A job with dynamic padding (``DataCollatorWithPadding``: each batch padded to its longest
sequence) asks for new sizes every step, splits cached segments and fragments the cache; "the found
size runs out of memory later" is what that looks like. Pure Python (no torch), for the engine and
the trial child:

- :func:`dynamic_padding_lengths`: the sequence length of every micro step of a confirmation —
  the worst case first (so the peak and AdamW's state are reached as in the search), then lengths
  that vary up to ``seq_len`` (rounded up to ``pad_to_multiple_of`` as the collator does), then the
  worst case again, which must still fit in the fragmented cache.
- :data:`ALLOCATOR_ADVICE` and :func:`allocator_settings`: the ``PYTORCH_CUDA_ALLOC_CONF`` the
  recommendation tells the job to use (``expandable_segments:True``: segments grow in place instead
  of new blocks of every size), merged with what the job already sets, so the confirmation can run
  with exactly the job's settings.
- :func:`derived_headroom_bytes`: on ``cuda``, the headroom a plan should keep, from what was
  measured at the answer: the largest gap between reserved and allocated bytes (the cache's
  fragmentation and rounding), rounded up to the allocator's 2 MiB granularity.
- the engine's side: :func:`confirmation_plan` (what a confirmation runs on a device kind: the
  worst case, then :data:`VARIED_OPTIMIZER_STEPS` at varying lengths), :func:`judge_confirmation`
  (on ``cuda`` with ``headroom_bytes`` 0, a fit whose peak reserved plus its measured margin passes
  the capacity is ``over_headroom``) and :func:`confirmation_report` (``ConfigResult.confirmation``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from probes.spec import DEFAULT_CUDA_ALLOC_CONF, Confirmation, Outcome, ProbeSpec, TrialRecord
from probes.units import format_bytes

MiB = 2**20

ALLOCATOR_GRANULARITY_BYTES = 2 * MiB
"""CUDA's caching allocator rounds large segments to 2 MiB."""

ALLOCATOR_ADVICE = DEFAULT_CUDA_ALLOC_CONF
"""What the recommendation adds to ``PYTORCH_CUDA_ALLOC_CONF`` (torch's own advice in its OOM message)."""

ALLOC_CONF_VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"

VARIED_OPTIMIZER_STEPS: dict[str, int] = {"cuda": 16, "simulated": 2}
"""Optimizer steps at varying lengths after a confirmation's worst-case steps, unless the request says
(``confirm_varied_steps``). ``cuda``: 16, about the GPU time of 8 worst-case steps (the lengths average
half of ``seq_len``) and 32 new shapes at the default accumulation of 2 — a soak of 200 steps is
``bench/gpu_check.py`` part 10's job. ``simulated``: 2, since a counting device has no cache to
fragment; they check that no shorter shape needs more than the worst case, and keep the path tested.
``predict`` has no confirmation (fake tensors give the same bytes every time)."""

DERIVED_HEADROOM_NOTE = "the derived headroom"
"""Opens the message of a confirmation that ran but left less free than its measured margin."""

WORST_CASE_STEPS = 2
"""Micro steps at ``seq_len`` before the lengths vary: at least one optimizer step's worth, so that
AdamW's state exists before the cache is fragmented (the engine passes accumulation x 2)."""


def dynamic_padding_lengths(
    seq_len: int,
    micro_steps: int,
    *,
    worst_case_steps: int = WORST_CASE_STEPS,
    pad_to_multiple_of: int = 8,
    seed: int = 0,
) -> list[int]:
    """Sequence lengths for ``micro_steps`` micro steps: ``seq_len`` first, varying lengths, ``seq_len`` last.

    The varying lengths are drawn by a generator seeded with ``seed`` (the same list every time),
    alternately from the short half ``1..seq_len // 2`` and the long half up to ``seq_len``, and
    rounded up to ``pad_to_multiple_of``, never above ``seq_len``.
    ``ValueError`` when there is no room for the worst case at both ends and one varying step.
    """
    if seq_len < 1 or pad_to_multiple_of < 1:
        raise ValueError("seq_len and pad_to_multiple_of must be at least 1")
    if worst_case_steps < 1 or micro_steps < worst_case_steps + 2:
        raise ValueError(
            f"{micro_steps} micro steps leave no room for {worst_case_steps} worst-case steps, "
            "one varying step and the final worst case"
        )
    generator = random.Random(seed)
    half = seq_len // 2
    varying = []
    for index in range(micro_steps - worst_case_steps - 1):
        # alternately from the short half and the long half, so that even a few steps cover both
        short = index % 2 == 0 and half >= 1
        length = generator.randint(1, half) if short else generator.randint(half + 1, seq_len)
        padded = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        varying.append(min(padded, seq_len))
    return [seq_len] * worst_case_steps + varying + [seq_len]


def allocator_settings(current: str | None) -> str:
    """``PYTORCH_CUDA_ALLOC_CONF`` with :data:`ALLOCATOR_ADVICE` merged into the job's own ``current``.

    A job that already sets ``expandable_segments`` (either way) keeps its choice; other options
    are kept in their order.
    """
    options = [part.strip() for part in (current or "").split(",") if part.strip()]
    if any(option.split(":", 1)[0].strip() == "expandable_segments" for option in options):
        return ",".join(options)
    return ",".join([*options, ALLOCATOR_ADVICE])


def derived_headroom_bytes(samples: Iterable[tuple[int, int]]) -> int:
    """The headroom to keep: the largest ``reserved - allocated`` over ``samples``, up to 2 MiB.

    ``samples`` are ``(peak_reserved_bytes, peak_allocated_bytes)`` measured at the answer (the
    confirmation's steps). ``ValueError`` without samples or with allocated above reserved.
    """
    gaps = []
    for reserved, allocated in samples:
        if allocated > reserved or allocated < 0:
            raise ValueError(f"allocated {allocated} bytes cannot exceed reserved {reserved}")
        gaps.append(reserved - allocated)
    if not gaps:
        raise ValueError("no measurement to derive a headroom from")
    gap = max(gaps)
    return -(-gap // ALLOCATOR_GRANULARITY_BYTES) * ALLOCATOR_GRANULARITY_BYTES


@dataclass(frozen=True)
class ConfirmationPlan:
    """What a confirmation runs on one device kind for one request (the engine's side, no torch).

    ``lengths`` is ``None`` when no varied step runs; ``derive_headroom``: the answer must leave its
    measured reserved - allocated margin free (``cuda`` with ``headroom_bytes`` 0).
    """

    worst_case_optimizer_steps: int
    varied_optimizer_steps: int
    accumulation_steps: int
    lengths: tuple[int, ...] | None
    derive_headroom: bool

    @property
    def optimizer_steps(self) -> int:
        return self.worst_case_optimizer_steps + self.varied_optimizer_steps

    @property
    def worst_case_micro_steps(self) -> int:
        return self.worst_case_optimizer_steps * self.accumulation_steps

    @property
    def varied_lengths(self) -> tuple[int, ...]:
        """The micro-batch lengths after the worst-case steps (the final worst case included)."""
        return self.lengths[self.worst_case_micro_steps :] if self.lengths is not None else ()


def confirmation_plan(spec: ProbeSpec, device_kind: str) -> ConfirmationPlan:
    """The confirmation for ``spec`` on a device of ``device_kind`` (``cuda``, ``simulated``, ``predict``)."""
    varied = spec.confirm_varied_steps
    if varied is None:
        varied = VARIED_OPTIMIZER_STEPS.get(device_kind, 0)
    accumulation = spec.trial_accumulation_steps
    worst = spec.confirm_optimizer_steps
    lengths = None
    if varied > 0:
        lengths = tuple(
            dynamic_padding_lengths(
                spec.seq_len,
                (worst + varied) * accumulation,
                worst_case_steps=worst * accumulation,
                seed=spec.seed,
            )
        )
    return ConfirmationPlan(
        worst_case_optimizer_steps=worst,
        varied_optimizer_steps=varied,
        accumulation_steps=accumulation,
        lengths=lengths,
        derive_headroom=device_kind == "cuda" and spec.headroom_bytes == 0,
    )


def reserved_minus_allocated(trial: TrialRecord) -> int | None:
    """``peak reserved - peak allocated`` of a trial that ran, or ``None`` without both."""
    reserved, allocated = trial.peak_reserved_bytes, trial.peak_allocated_bytes
    if reserved is None or allocated is None or allocated > reserved:
        return None
    return reserved - allocated


def judge_confirmation(trial: TrialRecord, plan: ConfirmationPlan, capacity_bytes: int | None) -> TrialRecord:
    """``trial`` as the confirmation's outcome: with the derived headroom, a fit whose peak reserved plus
    its measured margin (:func:`derived_headroom_bytes`) passes the capacity is ``over_headroom``."""
    gap = reserved_minus_allocated(trial)
    if not plan.derive_headroom or trial.outcome is not Outcome.FIT or gap is None or capacity_bytes is None:
        return trial
    reserved = trial.peak_reserved_bytes or 0
    headroom = derived_headroom_bytes([(reserved, reserved - gap)])
    if reserved + headroom <= capacity_bytes:
        return trial
    message = (
        f"{DERIVED_HEADROOM_NOTE}: the peak reserved {format_bytes(reserved)} plus the measured "
        f"fragmentation margin {format_bytes(headroom)} (reserved - allocated, rounded up to 2 MiB) "
        f"passes the capacity {format_bytes(capacity_bytes)}"
    )
    return trial.model_copy(update={"outcome": Outcome.OVER_HEADROOM, "message": message})


def _failed_late(trial: TrialRecord, plan: ConfirmationPlan) -> bool:
    """A confirmation that passed its worst-case steps, then failed a varied one or the derived headroom."""
    if trial.lengths is None or trial.outcome not in (Outcome.OOM, Outcome.OVER_HEADROOM):
        return False
    if (trial.message or "").startswith(DERIVED_HEADROOM_NOTE):
        return True
    done = trial.micro_steps_done
    return trial.outcome is Outcome.OOM and done is not None and done >= plan.worst_case_micro_steps


def confirmation_report(
    plan: ConfirmationPlan, backing: TrialRecord, trials: Sequence[TrialRecord], device_kind: str
) -> Confirmation:
    """What the result says about the confirmation that backs the answer (``backing``)."""
    gap = reserved_minus_allocated(backing) if device_kind == "cuda" else None
    derived = derived_headroom_bytes([(gap, 0)]) if gap is not None and plan.derive_headroom else None
    failed = sorted(
        {t.batch_size for t in trials if t.batch_size > backing.batch_size and _failed_late(t, plan)}
    )
    return Confirmation(
        batch_size=backing.batch_size,
        worst_case_optimizer_steps=plan.worst_case_optimizer_steps,
        varied_optimizer_steps=plan.varied_optimizer_steps if backing.lengths is not None else 0,
        varied_lengths=plan.varied_lengths if backing.lengths is not None else (),
        all_fit=backing.outcome is Outcome.FIT,
        cuda_alloc_conf=backing.cuda_alloc_conf,
        reserved_minus_allocated_bytes=gap,
        derived_headroom_bytes=derived,
        failed_sizes=tuple(failed),
    )
