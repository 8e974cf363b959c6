"""A confirmation that holds for the whole job: dynamic padding, the job's allocator settings, headroom.

The search's trials and today's confirmation repeat the worst-case shape (every sequence at
``seq_len``), which keeps CUDA's caching allocator in its easiest state: the same block sizes every
step. A job with dynamic padding (``DataCollatorWithPadding``: each batch padded to its longest
sequence) asks for new sizes every step, splits cached segments and fragments the cache; "the found
size runs out of memory later" is what that looks like. Three pieces, pure Python (no torch), for
the engine and the trial child:

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
"""

from __future__ import annotations

import random
from collections.abc import Iterable

MiB = 2**20

ALLOCATOR_GRANULARITY_BYTES = 2 * MiB
"""CUDA's caching allocator rounds large segments to 2 MiB."""

ALLOCATOR_ADVICE = "expandable_segments:True"
"""What the recommendation adds to ``PYTORCH_CUDA_ALLOC_CONF`` (torch's own advice in its OOM message)."""

ALLOC_CONF_VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"

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

    The varying lengths are drawn uniformly from ``1..seq_len`` by a generator seeded with ``seed``
    (the same list every time) and rounded up to ``pad_to_multiple_of``, never above ``seq_len``.
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
    varying = []
    for _ in range(micro_steps - worst_case_steps - 1):
        length = generator.randint(1, seq_len)
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
