"""The batch-size search on the ladder, as a pure ask/tell object (no torch, no processes).

The ladder is 1, 2, 4, 8, 16, 24, 32, … : 1, 2 and 4 below 8, then every multiple of 8.
:class:`LadderSearch` proposes the next size to try (``next_size``) and learns from each
trial's outcome (``record``); the engine runs each trial in a child process, tests feed
scripted memory curves. Fit is assumed monotone in batch size, so the search keeps a
bracket: the largest passing size and the smallest failing one. Only measurements move the
bracket; a line fitted through measured peaks only chooses where to measure next.

How the next size is chosen:

1. the first trial is at ``start`` (1 by default), then sizes grow by doubling on the ladder;
2. once two passing trials carry peaks and the capacity is known, a line through the two
   largest passing points predicts where the peak reaches the capacity; the search jumps to
   the ladder floor of that boundary (at most :data:`MAX_JUMP_FACTOR` times the largest pass),
   and when the prediction says the next size up would fail, that size is measured anyway;
3. when a failure is already known and the line offers nothing inside the bracket (it
   overshot, or there is no line), the search interpolates between the bracket ends when the
   failure carries a peak (it ran, but over the headroom) or a lower bound of one (an
   out-of-memory trial's bytes in use plus bytes requested, ``needed_bytes``), steps
   one size down after a rejected confirmation, and otherwise bisects the ladder between the
   bracket ends.

What the floor adds (``floor_bytes``: what is live at the activation peak whatever the batch —
weights, gradients, optimizer state; see :func:`training_state_bytes`): at small sizes the peak
is often the optimizer step's, the same at 1 and 2, and a line through two such peaks is flat; it
would send the search to :data:`MAX_JUMP_FACTOR` times the largest pass and back down. With a
floor ``F``, the peak at ``n`` above ``F`` is at most all batch-dependent, so the peak at
``m >= n`` is at most ``F + (peak(n) - F) m / n``: the size where that bound meets the capacity
(``n (C - F) / (peak(n) - F)``) fits whenever every batch-dependent part is affine in the batch
with its batch-free part at least ``F``. The search measures there (at least
:data:`PLATEAU_GROWTH` times the largest pass) instead of trusting the line whenever the line is
*flat*: its slope under :data:`FLAT_SLOPE_RATIO` of ``(peak(n) - F) / n``, the slope if all of the
bytes above the floor grew with the batch. Either way only measurements move the bracket.

The answer equals an exhaustive search of the ladder for every monotone curve, because the
search stops only when no ladder size lies strictly between the two bracket ends.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

from probes.spec import Outcome, Precision, TrialRecord

MAX_JUMP_FACTOR = 256
"""A predicted jump goes at most this many times beyond the largest passing size.

Extrapolating from batch sizes 1 and 2 amplifies any error in the measured slope; a nearly
flat line (a memory floor, allocator rounding) would otherwise send the first jump to an
absurd size, and the bisection after the failure would be long.
"""

FLAT_SLOPE_RATIO = Fraction(1, 256)
"""A fitted line is *flat* when its slope is under this share of the floor's slope bound.

On the optimizer step's plateau only the batch's token tensors grow with the batch (24 bytes a
token), against the activations' kilobytes a token: the ratio is ~1e-4 there. A real line whose
batch-free part is well above the floor also has a small ratio at small sizes (1/20 and less), so
the threshold sits well below that. Chosen on synthetic curve families (``tests/probes/test_search.py``
budgets): 1/256 keeps the plain-line cost of the search without a floor.
"""

PLATEAU_GROWTH = 4
"""On a flat line the floor's aim is at least this many times the largest passing size.

The floor's bound is a lower bound of the boundary and grows by ``(C - F) / (plateau - F)`` per
trial along a plateau, slowly when the optimizer step's temporaries are large; a plateau says
nothing about the slope beyond it, so the search grows at least this fast (measured on the
plateau family in the tests: fewer trials than 1 or 2, fewer out-of-memory trials than 8).
"""

ADAMW_STATE_BYTES_PER_WEIGHT_BYTE = 2
"""AdamW keeps two moments per parameter, each in the parameter's dtype."""

_PASS = frozenset({Outcome.FIT})
_FAIL = frozenset({Outcome.OOM, Outcome.OVER_HEADROOM})


def _index(size: int) -> int:
    """Position of a ladder size on the ladder (1 → 0, 2 → 1, 4 → 2, 8 → 3, 16 → 4, …)."""
    if size < 8:
        return {1: 0, 2: 1, 4: 2}[size]
    return size // 8 + 2


def _at(index: int) -> int:
    """The ladder size at ``index`` (the inverse of :func:`_index`)."""
    return 2**index if index < 3 else 8 * (index - 2)


def is_ladder_size(n: int) -> bool:
    """True for 1, 2, 4 and every positive multiple of 8."""
    return n in (1, 2, 4) or (n >= 8 and n % 8 == 0)


def ladder(upper: int) -> list[int]:
    """Every ladder size ``≤ upper``, ascending (empty when ``upper < 1``)."""
    if upper < 1:
        return []
    return [_at(i) for i in range(_index(ladder_floor(upper)) + 1)]


def ladder_floor(n: int) -> int:
    """The largest ladder size ``≤ n`` (``n ≥ 1``)."""
    if n < 1:
        raise ValueError(f"no ladder size is at or below {n}; the ladder starts at 1")
    if n < 8:
        return 4 if n >= 4 else (2 if n >= 2 else 1)
    return n - n % 8


def ladder_ceil(n: int) -> int:
    """The smallest ladder size ``≥ n`` (1 for any ``n ≤ 1``)."""
    return n if n >= 1 and is_ladder_size(n) else ladder_next(n)


def ladder_next(n: int) -> int:
    """The smallest ladder size ``> n`` (1 for any ``n < 1``)."""
    return 1 if n < 1 else _at(_index(ladder_floor(n)) + 1)


def ladder_prev(n: int) -> int:
    """The largest ladder size ``< n`` (``n ≥ 2``)."""
    if n < 2:
        raise ValueError(f"no ladder size is below {n}; the ladder starts at 1")
    return ladder_floor(n - 1)


def training_state_bytes(
    parameter_count: int,
    precision: Precision,
    *,
    trainable_parameter_count: int | None = None,
    optimizer: str = "adamw_torch",
) -> int | None:
    """Weights, gradients and optimizer state: a floor for :class:`LadderSearch`, or ``None``.

    Every trainable parameter has a gradient in the weight's dtype: fp32 weights (``32-true``,
    ``16-mixed``, ``bf16-mixed``: 4 bytes, mixed precision keeps fp32 master weights and
    gradients) or bf16 (``bf16-true``: 2 bytes). The optimizer's state per trainable parameter,
    ``optimizer`` in HF ``optim`` names: torch's AdamW (``adamw_torch``, ``adamw_torch_fused``) two
    moments in the weight's dtype; bitsandbytes' 8-bit AdamW two 1-byte moments (at least: it keeps
    some in 32 bits); SGD without momentum and Adafactor's factored moments are counted as none —
    the floor must stay a lower bound. With accumulation >= 2 all of it is live during the second
    micro-step's forward and backward from the second optimizer step on, where the activation peak
    is, so it is a lower bound of that peak's batch-free part. Raw sizes, without the allocator's
    rounding: the bound stays a bound. ``None`` for an optimizer this does not know (the search then
    works without a floor).
    """
    state = _STATE_BYTES.get(str(optimizer))
    if state is None:
        return None
    if parameter_count < 0:
        raise ValueError(f"parameter_count must be at least 0, got {parameter_count}")
    trainable = parameter_count if trainable_parameter_count is None else trainable_parameter_count
    if not 0 <= trainable <= parameter_count:
        raise ValueError(f"trainable_parameter_count must be within 0..{parameter_count}, got {trainable}")
    weight_bytes = 2 if precision is Precision.BF16_TRUE else 4
    return weight_bytes * (parameter_count + trainable) + trainable * state(weight_bytes)


_STATE_BYTES: dict[str, Callable[[int], int]] = {
    "adamw": lambda weight: ADAMW_STATE_BYTES_PER_WEIGHT_BYTE * weight,
    "adamw_torch": lambda weight: ADAMW_STATE_BYTES_PER_WEIGHT_BYTE * weight,
    "adamw_torch_fused": lambda weight: ADAMW_STATE_BYTES_PER_WEIGHT_BYTE * weight,
    "adamw_bnb_8bit": lambda _: 2,
    "sgd": lambda _: 0,
    "adafactor": lambda _: 0,
}
"""Optimizer state bytes per trainable parameter, given the weight's bytes (a lower bound)."""


class LadderSearch:
    """Ask/tell search for the largest ladder batch size that fits.

    ``capacity_bytes`` is the peak a passing trial may reach (the limit less the headroom)
    when known; it is used only to predict where to measure next. ``upper_limit`` caps the
    sizes tried (the request's ``max_batch_size_limit``); ``start`` is the first size tried
    (floored onto the ladder and capped by the limit). ``floor_bytes``, when known, is a lower
    bound of the batch-free bytes at the activation peak (:func:`training_state_bytes`); it
    only changes where the search measures (see the module docstring), never the answer.
    """

    def __init__(
        self,
        *,
        capacity_bytes: int | None,
        upper_limit: int | None = None,
        start: int = 1,
        floor_bytes: int | None = None,
    ) -> None:
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if upper_limit is not None and upper_limit < 1:
            raise ValueError(f"upper_limit must be at least 1, got {upper_limit}")
        if start < 1:
            raise ValueError(f"start must be at least 1, got {start}")
        if floor_bytes is not None and floor_bytes < 0:
            raise ValueError(f"floor_bytes must be at least 0, got {floor_bytes}")
        self._capacity = capacity_bytes
        self._floor = floor_bytes
        self._cap = ladder_floor(upper_limit) if upper_limit is not None else None
        self._start = ladder_floor(start if self._cap is None else min(start, self._cap))
        self._trials: list[TrialRecord] = []
        self._passes: dict[int, int | None] = {}
        self._failure_peaks: dict[int, int | None] = {}
        self._failure_bounds: dict[int, int | None] = {}
        self._first_failing: int | None = None
        self._aborted_reason: str | None = None
        self._rejected: int | None = None

    # -- the bracket -------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int | None:
        """The largest passing size below the first failing one (``None`` while none passed)."""
        below = [n for n in self._passes if self._below_failure(n)]
        return max(below) if below else None

    @property
    def first_failing_batch_size(self) -> int | None:
        """The smallest failing size (``None`` when nothing failed, e.g. the limit was reached)."""
        return self._first_failing

    @property
    def trials(self) -> tuple[TrialRecord, ...]:
        """Every trial recorded or rejected, in order."""
        return tuple(self._trials)

    @property
    def upper_limit(self) -> int | None:
        """The largest size the search may try (the limit floored onto the ladder), if any."""
        return self._cap

    @property
    def aborted_reason(self) -> str | None:
        """Why the search stopped early (an error, timeout or crash), else ``None``."""
        return self._aborted_reason

    @property
    def done(self) -> bool:
        """True when the bracket is closed or the search was aborted."""
        return self.next_size() is None

    def _below_failure(self, n: int) -> bool:
        return self._first_failing is None or n < self._first_failing

    def _open_range(self) -> tuple[int, int] | None:
        """Ladder indices ``(low, high)``: sizes strictly between them are still undecided.

        ``None`` when the bracket is closed.
        """
        largest = self.max_batch_size
        low = -1 if largest is None else _index(largest)
        if self._first_failing is not None:
            high = _index(self._first_failing)
        elif self._cap is not None:
            high = _index(self._cap) + 1
        else:
            return (low, low + 2**62)
        return (low, high) if high - low >= 2 else None

    # -- ask ---------------------------------------------------------------------------

    def next_size(self) -> int | None:
        """The next batch size to try, or ``None`` when the bracket is closed or aborted."""
        if self._aborted_reason is not None:
            return None
        bracket = self._open_range()
        if bracket is None:
            return None
        low, high = bracket
        if not self._trials:
            return self._start
        largest = self.max_batch_size
        if largest is None:
            # Even the first size tried failed: bisect below it.
            return _at((low + high) // 2)
        aimed = self._aimed_size(largest)
        if aimed is not None and _index(aimed) < high:
            return aimed
        if self._first_failing is None:
            # No failure yet and no usable prediction: double (on the ladder, within the cap).
            grown = ladder_ceil(2 * largest)
            return min(grown, _at(high - 1))
        middle = _at((low + high) // 2)
        between = self._interpolated_size(largest, self._first_failing, middle)
        if between is not None:
            return between
        if self._rejected == self._first_failing:
            # A size that passed its trial failed a longer run: the boundary is just below it.
            return _at(high - 1)
        return middle

    def _aimed_size(self, largest: int) -> int | None:
        """Where to measure next: the line's aim, or the floor's when the line is flat."""
        line = self._predicted_size(largest)
        floor_aim = self._floor_size(largest) if len(self._passing_points()) >= 2 else None
        if floor_aim is not None and (line is None or self._line_is_flat()):
            return floor_aim
        return line

    def _passing_points(self) -> list[tuple[int, int]]:
        return sorted(
            (n, peak) for n, peak in self._passes.items() if peak is not None and self._below_failure(n)
        )

    def _interpolated_size(self, largest: int, failing: int, middle: int) -> int | None:
        """The ladder size where the chord from the largest pass to the first failure meets the capacity.

        Only when the failure carries a peak (it ran to the end, over the headroom) or a lower
        bound of one (an out-of-memory trial's bytes in use plus bytes requested). A chord to a
        lower bound can only lie too low, its crossing too far right, so it is used only when it
        points at or below the bisection's ``middle``.
        """
        low_peak = self._passes.get(largest)
        high_peak = self._failure_peaks.get(failing)
        exact = high_peak is not None
        if high_peak is None:
            high_peak = self._failure_bounds.get(failing)
        if self._capacity is None or low_peak is None or high_peak is None or high_peak <= low_peak:
            return None
        boundary = largest + Fraction(self._capacity - low_peak, high_peak - low_peak) * (failing - largest)
        size = min(max(ladder_floor(max(1, int(boundary))), ladder_next(largest)), ladder_prev(failing))
        if not exact and size > middle:
            return None
        return size

    def _predicted_size(self, largest: int) -> int | None:
        """The ladder size the fitted line points at, kept above ``largest`` and within the cap.

        ``None`` without a capacity, without two passing peaks, or when the line does not rise.
        """
        if self._capacity is None:
            return None
        points = self._passing_points()
        if len(points) < 2:
            return None
        (n1, p1), (n2, p2) = points[-2:]
        slope = Fraction(p2 - p1, n2 - n1)
        if slope <= 0:
            return None
        boundary = n2 + (self._capacity - p2) / slope
        return self._reach(largest, int(boundary))

    def _floor_size(self, largest: int) -> int | None:
        """The ladder size where the floor's bound ``F + (peak(n) - F) m / n`` meets the capacity.

        The best (largest) such size over the passing points, at least :data:`PLATEAU_GROWTH`
        times ``largest`` while nothing failed, kept above ``largest`` and within the cap. ``None``
        without a floor or a capacity, or when a passing peak is at or below the floor (then it is
        no floor of this curve).
        """
        floor, capacity = self._floor, self._capacity
        if floor is None or capacity is None or capacity <= floor:
            return None
        points = self._passing_points()
        if not points or any(peak <= floor for _, peak in points):
            return None
        bound = int(max(Fraction(n * (capacity - floor), peak - floor) for n, peak in points))
        if self._first_failing is None:
            bound = max(bound, PLATEAU_GROWTH * largest)
        return self._reach(largest, bound)

    def _line_is_flat(self) -> bool:
        """Whether the line through the two largest passes rises slower than the floor says it may.

        The floor's bound has slope ``(peak - F) / n`` at the largest pass: the slope if every
        byte above the floor grew with the batch. A line under :data:`FLAT_SLOPE_RATIO` of that
        has (at least) its lower point on a batch-free plateau, such as the optimizer step's.
        """
        points = self._passing_points()
        if self._floor is None or len(points) < 2:
            return True
        (n1, p1), (n2, p2) = points[-2:]
        return Fraction(p2 - p1, n2 - n1) < FLAT_SLOPE_RATIO * Fraction(p2 - self._floor, n2)

    def _reach(self, largest: int, boundary: int) -> int:
        """``boundary`` as the next size to measure: on the ladder, above ``largest``, within the limits."""
        reach = min(boundary, largest * MAX_JUMP_FACTOR)
        if self._cap is not None:
            reach = min(reach, self._cap)
        if reach <= largest:
            return ladder_next(largest)
        return max(ladder_floor(reach), ladder_next(largest))

    # -- tell --------------------------------------------------------------------------

    def record(self, trial: TrialRecord) -> None:
        """Learn from one trial: a pass raises the bracket's floor, a failure lowers its ceiling.

        ``error``, ``timeout`` and ``crash`` abort the search (``aborted_reason`` says why).
        ``ValueError`` when the size is off the ladder, already decided, or the search is over.
        """
        n = trial.batch_size
        self._check_open(n)
        self._trials.append(trial)
        self._rejected = None
        if trial.outcome in _PASS:
            self._passes[n] = trial.peak_bytes
        elif trial.outcome in _FAIL:
            self._first_failing = n
            self._failure_peaks[n] = trial.peak_bytes
            self._failure_bounds[n] = trial.needed_bytes
        else:
            detail = f": {trial.message}" if trial.message else ""
            self._aborted_reason = f"the trial at batch size {n} ended in {trial.outcome.value}{detail}"

    def reject(self, batch_size: int, trial: TrialRecord) -> None:
        """A later check of ``batch_size`` (the confirmation run) failed: treat it as failing.

        The trial is recorded; the bracket reopens below ``batch_size`` (passes at or above it
        no longer count) and ``next_size`` proposes sizes again.
        """
        if self._aborted_reason is not None:
            raise ValueError("the search was aborted; nothing can be rejected")
        if not is_ladder_size(batch_size):
            raise ValueError(f"batch size {batch_size} is not on the ladder")
        self._trials.append(trial)
        if self._first_failing is None or batch_size < self._first_failing:
            self._first_failing = batch_size
            self._failure_peaks[batch_size] = trial.peak_bytes
            self._failure_bounds[batch_size] = trial.needed_bytes
            self._rejected = batch_size

    def _check_open(self, n: int) -> None:
        if self._aborted_reason is not None:
            raise ValueError(f"the search was aborted ({self._aborted_reason}); no more trials")
        if not is_ladder_size(n):
            raise ValueError(f"batch size {n} is not on the ladder (1, 2, 4, then multiples of 8)")
        if self._cap is not None and n > self._cap:
            raise ValueError(f"batch size {n} is above the upper limit {self._cap}")
        largest = self.max_batch_size
        if (largest is not None and n <= largest) or not self._below_failure(n):
            raise ValueError(f"batch size {n} is already decided by earlier trials")
