"""Replay the ladder search on a measured memory curve: the trials a search variant would spend.

The exhaustive truth records the peak of every ladder size up to the first failure; fit is monotone,
so every larger size fails, without a peak (as an OOM reports none in the engine). Feeding those
outcomes to :class:`probes.search.LadderSearch` replays the engine's search without running a model
(a check: its sizes must equal those the engine tried), and feeding them to a variant shows what a
change to ``probes/search.py`` would save, on the same curves. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Callable

from probes.search import LadderSearch, ladder_prev
from probes.spec import Outcome, TrialRecord

SearchFactory = Callable[[int], LadderSearch]


class FlatGuard(LadderSearch):
    """No line-predicted jump while the last two passing peaks differ by less than ``RISE`` of the smaller.

    At batch sizes 1 and 2 the peak can sit on the optimizer step's floor (AdamW's ``foreach``
    temporaries: the same at any batch size); the line through two such points is nearly flat and
    sends the jump to its cap (256 times the largest pass), after which a long bisection follows.
    Doubling instead until the peak rises gives the line real slope.
    """

    RISE = 0.05

    def _predicted_size(self, largest: int) -> int | None:
        points = sorted(
            (n, peak) for n, peak in self._passes.items() if peak is not None and self._below_failure(n)
        )
        if len(points) >= 2:
            (_, low), (_, high) = points[-2:]
            if high - low < self.RISE * low:
                return None
        return super()._predicted_size(largest)


class StepDownAfterFailedJump(LadderSearch):
    """When the first failure is a line-predicted jump, try one ladder step below it before bisecting."""

    def __init__(self, *, capacity_bytes: int | None, upper_limit: int | None = None, start: int = 1) -> None:
        super().__init__(capacity_bytes=capacity_bytes, upper_limit=upper_limit, start=start)
        self._stepped = False

    def next_size(self) -> int | None:
        proposed = super().next_size()
        trials = self.trials
        failing = self.first_failing_batch_size
        largest = self.max_batch_size
        if (
            proposed is None
            or self._stepped
            or failing is None
            or largest is None
            or len(trials) < 3
            or trials[-1].batch_size != failing
        ):
            return proposed
        self._stepped = True
        below = ladder_prev(failing)
        return below if below > largest else proposed


class FlatGuardStepDown(FlatGuard, StepDownAfterFailedJump):
    """Both changes together."""


VARIANTS: dict[str, SearchFactory] = {
    "shipped": lambda capacity: LadderSearch(capacity_bytes=capacity),
    "step-down": lambda capacity: StepDownAfterFailedJump(capacity_bytes=capacity),
    "flat-guard": lambda capacity: FlatGuard(capacity_bytes=capacity),
    "flat-guard+step-down": lambda capacity: FlatGuardStepDown(capacity_bytes=capacity),
}


def replay(
    curve: dict[int, int | None], capacity: int, factory: SearchFactory
) -> tuple[list[int], int | None]:
    """The sizes a search tries on ``curve`` (size → peak, ``None`` for a failure), and its answer.

    Sizes beyond the curve fail (monotone fit). The confirmation is not part of the search.
    """
    failures = [n for n, peak in curve.items() if peak is None]
    first_failure = min(failures) if failures else None
    search = factory(capacity)
    tried: list[int] = []
    while (size := search.next_size()) is not None:
        tried.append(size)
        peak = curve.get(size)
        fits = peak is not None and (first_failure is None or size < first_failure)
        search.record(
            TrialRecord(
                batch_size=size,
                outcome=Outcome.FIT if fits else Outcome.OOM,
                peak_allocated_bytes=peak if fits else None,
            )
        )
        if len(tried) > 64:
            raise RuntimeError("the search did not close within 64 trials")
    return tried, search.max_batch_size
