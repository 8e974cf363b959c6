"""Predict-seeded search: the device confirms a predicted bracket; the ladder search takes over if not.

Pure ask/tell, like :class:`probes.search.LadderSearch` (no torch, no processes). A ``predict`` run
of the same config, for the target device's capacity, gives a bracket ``(max, first_failing)``.
:class:`SeededSearch` then asks the device for:

1. the predicted ``max`` (expected to fit),
2. the ladder size after it (expected to fail; skipped when it is above the request's limit).

When both come out as predicted, the bracket is closed: two trials, the same answer the
exhaustive ladder search would give, because both ends were measured on the device. When the
device disagrees, the prediction was off by the device's overhead more often than by much, so the
search measures the neighbouring ladder size on the side the disagreement points to (one below a
failed ``max``, one above a passed ``first_failing``), and from then on the ordinary
:class:`~probes.search.LadderSearch` continues from everything measured (its line, floor and
lower bounds included). A prediction that nothing fits (``max`` ``None``, ``first_failing`` 1) is
checked by one trial at size 1.

The answer is always the ladder search's on the device: only the device's trials move the bracket.
``prediction_right`` says, afterwards, whether the device agreed with the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.search import LadderSearch, is_ladder_size, ladder_next, ladder_prev
from probes.spec import Outcome, TrialRecord

_PASS = frozenset({Outcome.FIT})
_FAIL = frozenset({Outcome.OOM, Outcome.OVER_HEADROOM})


@dataclass(frozen=True)
class PredictedBracket:
    """What ``predict`` found for a config: the largest fitting ladder size and the first failing one.

    ``max_batch_size`` ``None`` with ``first_failing_batch_size`` 1: nothing fits.
    ``first_failing_batch_size`` ``None``: the request's limit was reached.
    """

    max_batch_size: int | None
    first_failing_batch_size: int | None

    def __post_init__(self) -> None:
        for name, value in (
            ("max_batch_size", self.max_batch_size),
            ("first_failing_batch_size", self.first_failing_batch_size),
        ):
            if value is not None and not is_ladder_size(value):
                raise ValueError(f"{name} {value} is not on the ladder")
        if self.max_batch_size is None and self.first_failing_batch_size != 1:
            raise ValueError("a bracket without a fitting size must fail at batch size 1")
        if (
            self.max_batch_size is not None
            and self.first_failing_batch_size is not None
            and self.first_failing_batch_size != ladder_next(self.max_batch_size)
        ):
            raise ValueError(
                f"the bracket ({self.max_batch_size}, {self.first_failing_batch_size}) is not closed: "
                "the first failing size must be the ladder size after the largest fitting one"
            )


def seed_sizes(prediction: PredictedBracket, upper_limit: int | None = None) -> list[int]:
    """The sizes the device confirms, in order: the predicted max, then the next ladder size.

    The next size is left out when it is above ``upper_limit``; a prediction that nothing fits is
    confirmed at 1 alone.
    """
    if prediction.max_batch_size is None:
        return [1]
    sizes = [prediction.max_batch_size]
    after = ladder_next(prediction.max_batch_size)
    if upper_limit is None or after <= upper_limit:
        sizes.append(after)
    return sizes


class SeededSearch:
    """:class:`~probes.search.LadderSearch` whose first trials confirm a predicted bracket.

    Same interface as the search the engine drives (``next_size``, ``record``, ``reject``,
    ``max_batch_size``, ``first_failing_batch_size``, ``trials``, ``aborted_reason``), plus
    ``prediction_right``. The arguments other than ``prediction`` go to the inner search.
    """

    def __init__(
        self,
        prediction: PredictedBracket,
        *,
        capacity_bytes: int | None,
        upper_limit: int | None = None,
        floor_bytes: int | None = None,
    ) -> None:
        self.prediction = prediction
        self.search = LadderSearch(
            capacity_bytes=capacity_bytes, upper_limit=upper_limit, floor_bytes=floor_bytes
        )
        self._pending = seed_sizes(prediction, upper_limit)
        self._expected: dict[int, bool] = {size: size == prediction.max_batch_size for size in self._pending}
        self._disagreed = False

    # -- the answer, as the inner search has it ---------------------------------------

    @property
    def max_batch_size(self) -> int | None:
        return self.search.max_batch_size

    @property
    def first_failing_batch_size(self) -> int | None:
        return self.search.first_failing_batch_size

    @property
    def trials(self) -> tuple[TrialRecord, ...]:
        return self.search.trials

    @property
    def aborted_reason(self) -> str | None:
        return self.search.aborted_reason

    @property
    def prediction_right(self) -> bool | None:
        """``True`` when the device agreed with every seed it measured and the answer is the
        predicted bracket; ``False`` after a disagreement; ``None`` while undecided or aborted."""
        if self._disagreed:
            return False
        if self.search.aborted_reason is not None or self.search.next_size() is not None:
            return None
        return (
            self.max_batch_size == self.prediction.max_batch_size
            and self.first_failing_batch_size == self.prediction.first_failing_batch_size
        )

    # -- ask / tell -------------------------------------------------------------------

    def next_size(self) -> int | None:
        """The next seed while the device agrees, then whatever the ladder search asks."""
        if self.search.next_size() is None:
            return None
        while self._pending:
            size = self._pending[0]
            if self._undecided(size):
                return size
            self._pending.pop(0)
        return self.search.next_size()

    def record(self, trial: TrialRecord) -> None:
        """Learn from one trial (see :meth:`LadderSearch.record`); a seed that comes out otherwise
        than predicted ends the seeding and queues its neighbour on the side it points to."""
        self.search.record(trial)
        size = trial.batch_size
        if self._pending and self._pending[0] == size:
            self._pending.pop(0)
        expected = self._expected.pop(size, None)
        if expected is None or trial.outcome not in _PASS | _FAIL:
            return
        passed = trial.outcome in _PASS
        if passed == expected:
            return
        self._disagreed = True
        self._expected.clear()
        if passed:
            self._pending = [ladder_next(size)]
        else:
            self._pending = [ladder_prev(size)] if size > 1 else []

    def reject(self, batch_size: int, trial: TrialRecord) -> None:
        """A confirmation of ``batch_size`` failed (see :meth:`LadderSearch.reject`): the size below
        it is measured next, then the ladder search continues."""
        self.search.reject(batch_size, trial)
        self._pending = [ladder_prev(batch_size)] if batch_size > 1 else []
        self._expected.clear()
        self._disagreed = True

    def _undecided(self, size: int) -> bool:
        """Whether ``size`` is still open in the inner search's bracket and within its limit."""
        largest = self.search.max_batch_size
        failing = self.search.first_failing_batch_size
        if largest is not None and size <= largest:
            return False
        if failing is not None and size >= failing:
            return False
        limit = self.search.upper_limit
        return limit is None or size <= limit
