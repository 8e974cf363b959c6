"""A trial's memory timeline, and the whole peak curve from the timelines of two batch sizes.

The counting mode (``probes.devices.counting``) can record, while a trial runs, every allocation
(its raw ``nbytes``, before the allocator's rounding) and every release, in order: a
:class:`Timeline`. Replaying it (each allocation rounded up to the granularity, as the counter
charges it) gives the live bytes after every event, and so the trial's peak, to the byte.

Why two timelines give every batch size (the lead of issue 11, measured on tiny Llama and GPT-2):
once ``b >= 2`` the training step runs the same ops in the same order whatever ``b`` is, and each
tensor's size is affine in ``b`` (``b × seq × hidden``, ``b × seq × vocab``, or no ``b`` at all).
So the timelines at two batch sizes have the same events, and each allocation's size is a line
through its two sizes. :func:`fit_affine` checks that the two timelines have the same shape and
builds that :class:`AffineTimeline`; its :meth:`~AffineTimeline.peak` replays the lines at any
``b`` with the rounding applied to each allocation (never to sums), so the predicted peak is what
the counting mode would count. ``b = 1`` takes another path in some models (a few more ops), so it
is never a base point. Where the shapes differ, :class:`ShapeMismatch` says how, and the caller
falls back to searching with trials.

The event encoding (compact, and cheap to append in the counting mode's hot path):

- :data:`ALLOC` (``-1``): the next allocation (the next entry of ``sizes``) becomes live;
- ``k >= 0``: allocation ``k`` is released;
- ``-(k + 2)`` (``<= -2``): allocation ``k`` is resized in place into the next allocation (the
  storage grew: ``resize_`` or an ``out=`` argument); ``k`` is no longer live, the new one is.

:meth:`Timeline.to_wire` packs a timeline into a JSON-able dict (zlib over varint-coded deltas,
base64), small enough to travel in a trial child's reply; :meth:`Timeline.from_wire` reads it.

Pure Python: no torch (the parent that searches imports none).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from probes.search import ladder_floor, ladder_next

ALLOC = -1
"""Event code: the next allocation becomes live."""

LIVE_AT_START = "(live at start)"
"""The op name of the allocations that stand for what was live when the window opened."""

WIRE_FORMAT = "maxbatch-timeline/1"
AFFINE_WIRE_FORMAT = "maxbatch-affine-timeline/1"


class ShapeMismatch(ValueError):
    """Two timelines do not describe the same sequence of events (no affine prediction)."""


def round_up(nbytes: int, granularity: int) -> int:
    """``nbytes`` as the counting mode charges it: rounded up to a multiple of ``granularity``."""
    return -(-nbytes // granularity) * granularity


def _replay_peak(events: Sequence[int], charged: Sequence[int]) -> int:
    """The largest running total of ``charged`` bytes over ``events`` (0 for no events)."""
    live = peak = 0
    n = 0
    for event in events:
        if event == ALLOC:
            live += charged[n]
            n += 1
            peak = max(peak, live)
        elif event >= 0:
            live -= charged[event]
        else:
            live += charged[n] - charged[-event - 2]
            n += 1
            peak = max(peak, live)
    return peak


def _check_events(events: Sequence[int], allocations: int) -> None:
    """``ValueError`` unless ``events`` is a valid encoding over ``allocations`` allocations."""
    made = 0
    live: set[int] = set()
    for position, event in enumerate(events):
        if event == ALLOC or event <= -2:
            if event <= -2:
                old = -event - 2
                if old not in live:
                    raise ValueError(f"event {position} resizes allocation {old}, which is not live")
                live.discard(old)
            live.add(made)
            made += 1
        elif event in live:
            live.discard(event)
        else:
            raise ValueError(f"event {position} releases allocation {event}, which is not live")
    if made != allocations:
        raise ValueError(f"the events make {made} allocations, but {allocations} sizes were given")


@dataclass(frozen=True)
class Timeline:
    """What one trial allocated and released, in order (see the module docstring for ``events``).

    ``sizes[k]`` is the raw ``nbytes`` of allocation ``k``; ``granularity_bytes`` the rounding the
    counter applied; ``batch_size`` the trial's. The first allocations are what was already live
    when the window opened (the weights, the optimizer's state of an earlier step…), so a replay
    starts from zero. ``ops[k]`` indexes ``op_names``: the op that made allocation ``k`` (both
    empty when unknown); they align steps of different depths (``probes.depth``).
    """

    batch_size: int
    granularity_bytes: int
    sizes: tuple[int, ...]
    events: tuple[int, ...]
    ops: tuple[int, ...] = ()
    op_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.granularity_bytes < 1:
            raise ValueError("granularity_bytes must be at least 1")
        if any(size < 0 for size in self.sizes):
            raise ValueError("allocation sizes cannot be negative")
        if self.ops and len(self.ops) != len(self.sizes):
            raise ValueError("ops must name the op of every allocation, or be empty")
        if any(not 0 <= op < len(self.op_names) for op in self.ops):
            raise ValueError("an op index is outside op_names")

    def op_of(self) -> list[str]:
        """The op name of every allocation (empty when the ops were not recorded)."""
        names = self.op_names
        return [names[op] for op in self.ops]

    def validate(self) -> Timeline:
        """Check that every release and resize refers to a live allocation; returns ``self``."""
        _check_events(self.events, len(self.sizes))
        return self

    @property
    def allocations(self) -> int:
        return len(self.sizes)

    def charged(self) -> list[int]:
        """Every allocation's size as the counter charges it (rounded up)."""
        granularity = self.granularity_bytes
        return [-(-size // granularity) * granularity for size in self.sizes]

    def peak_bytes(self) -> int:
        """The peak the counting mode saw in this window: the replay's largest live total."""
        return _replay_peak(self.events, self.charged())

    def live_curve(self) -> Iterator[int]:
        """The live bytes after each event, in order."""
        charged = self.charged()
        live = n = 0
        for event in self.events:
            if event == ALLOC:
                live += charged[n]
                n += 1
            elif event >= 0:
                live -= charged[event]
            else:
                live += charged[n] - charged[-event - 2]
                n += 1
            yield live

    # -- the wire form -----------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict: the counts in clear, ``sizes`` and ``events`` packed (see :func:`_pack`)."""
        return {
            "format": WIRE_FORMAT,
            "batch_size": self.batch_size,
            "granularity_bytes": self.granularity_bytes,
            "allocations": len(self.sizes),
            "event_count": len(self.events),
            "sizes": _pack(_deltas(self.sizes)),
            "events": _pack(_event_codes(self.events)),
            "ops": _pack(self.ops),
            "op_names": list(self.op_names),
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Timeline:
        """The timeline :meth:`to_wire` packed; ``ValueError`` for anything else."""
        if wire.get("format") != WIRE_FORMAT:
            raise ValueError(f"not a timeline in {WIRE_FORMAT} (format {wire.get('format')!r})")
        try:
            sizes = tuple(_undeltas(_unpack(wire["sizes"])))
            events = tuple(_event_values(_unpack(wire["events"])))
            timeline = cls(
                batch_size=int(wire["batch_size"]),
                granularity_bytes=int(wire["granularity_bytes"]),
                sizes=sizes,
                events=events,
                ops=tuple(_unpack(wire["ops"])),
                op_names=tuple(str(name) for name in wire["op_names"]),
            )
        except (KeyError, TypeError, zlib.error, binascii.Error) as exc:
            raise ValueError(f"cannot read the timeline: {exc}") from exc
        if len(sizes) != wire["allocations"] or len(events) != wire["event_count"]:
            raise ValueError("the timeline's packed lists do not have the stated lengths")
        return timeline.validate()


# -- packing: zigzag varints, deltas, zlib -----------------------------------------------------


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzigzag(value: int) -> int:
    return value // 2 if value % 2 == 0 else -(value + 1) // 2


def _pack(values: Iterable[int]) -> str:
    """Signed integers as zigzag LEB128 varints, zlib-compressed, base64 text."""
    out = bytearray()
    for value in values:
        code = _zigzag(value)
        while code >= 0x80:
            out.append((code & 0x7F) | 0x80)
            code >>= 7
        out.append(code)
    return base64.b64encode(zlib.compress(bytes(out), 9)).decode("ascii")


def _unpack(text: str) -> list[int]:
    data = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    values: list[int] = []
    code = shift = 0
    for byte in data:
        code |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            continue
        values.append(_unzigzag(code))
        code = shift = 0
    if shift:
        raise ValueError("the packed list ends inside a number")
    return values


def _deltas(values: Sequence[int]) -> Iterator[int]:
    previous = 0
    for value in values:
        yield value - previous
        previous = value


def _undeltas(deltas: Iterable[int]) -> Iterator[int]:
    total = 0
    for delta in deltas:
        total += delta
        yield total


def _event_codes(events: Sequence[int]) -> Iterator[int]:
    """Events relative to the allocation count: a release of a recent allocation is a small number.

    An allocation is coded 0; a release of allocation ``k`` when ``n`` allocations exist is
    ``2 (n - k) - 1`` (odd, ≥ 1); a resize of ``k`` is ``2 (n - k)`` (even, ≥ 2). A step's repeated
    layers then repeat the same codes, which zlib compresses well.
    """
    made = 0
    for event in events:
        if event == ALLOC:
            yield 0
            made += 1
        elif event >= 0:
            yield 2 * (made - event) - 1
        else:
            yield 2 * (made - (-event - 2))
            made += 1


def _event_values(codes: Iterable[int]) -> Iterator[int]:
    made = 0
    for code in codes:
        if code == 0:
            yield ALLOC
            made += 1
        elif code % 2 == 1:
            yield made - (code + 1) // 2
        else:
            yield -(made - code // 2) - 2
            made += 1


# -- the affine fit ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineTimeline:
    """One event sequence whose allocation sizes are lines in the batch size.

    ``sizes_at(b)[k] = intercepts[k] + slopes[k] * b``; valid for ``b >= min_batch_size`` (the
    smaller base point: below it the step may run other ops). ``ops`` names each allocation's op
    (empty when unknown).
    """

    granularity_bytes: int
    events: tuple[int, ...]
    intercepts: tuple[int, ...]
    slopes: tuple[int, ...]
    min_batch_size: int
    ops: tuple[str, ...] = ()

    def sizes_at(self, batch_size: int) -> list[int]:
        """Every allocation's raw size at ``batch_size``."""
        self._check(batch_size)
        return [a + s * batch_size for a, s in zip(self.intercepts, self.slopes, strict=True)]

    def timeline_at(self, batch_size: int) -> Timeline:
        """The timeline a trial at ``batch_size`` would record."""
        names = tuple(dict.fromkeys(self.ops))
        index = {name: i for i, name in enumerate(names)}
        return Timeline(
            batch_size=batch_size,
            granularity_bytes=self.granularity_bytes,
            sizes=tuple(self.sizes_at(batch_size)),
            events=self.events,
            ops=tuple(index[name] for name in self.ops),
            op_names=names,
        )

    def peak(self, batch_size: int) -> int:
        """The counted peak at ``batch_size``: the replay of each allocation's line, rounded."""
        granularity = self.granularity_bytes
        return _replay_peak(
            self.events, [-(-size // granularity) * granularity for size in self.sizes_at(batch_size)]
        )

    def max_fitting(self, capacity_bytes: int, *, upper_limit: int = 1 << 20) -> int | None:
        """The largest ``b`` in ``[min_batch_size, upper_limit]`` whose peak is within the capacity.

        ``None`` when even ``min_batch_size`` does not fit. Peaks never fall as ``b`` grows (every
        slope is ≥ 0), so an exponential then binary search replays the timeline ~2 log2(b) times.
        """
        low = self.min_batch_size
        if upper_limit < low:
            raise ValueError(f"upper_limit {upper_limit} is below the smallest valid batch size {low}")
        if self.peak(low) > capacity_bytes:
            return None
        high = low
        while True:
            step = min(max(high, 1) * 2, upper_limit)
            if step == high:
                return high
            if self.peak(step) > capacity_bytes:
                break
            low = high = step
        failing = step
        while failing - low > 1:
            middle = (low + failing) // 2
            if self.peak(middle) > capacity_bytes:
                failing = middle
            else:
                low = middle
        return low

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict, packed like :meth:`Timeline.to_wire` (a curve travels in a child's reply)."""
        names = tuple(dict.fromkeys(self.ops))
        index = {name: i for i, name in enumerate(names)}
        return {
            "format": AFFINE_WIRE_FORMAT,
            "granularity_bytes": self.granularity_bytes,
            "min_batch_size": self.min_batch_size,
            "allocations": len(self.intercepts),
            "event_count": len(self.events),
            "intercepts": _pack(_deltas(self.intercepts)),
            "slopes": _pack(_deltas(self.slopes)),
            "events": _pack(_event_codes(self.events)),
            "ops": _pack(index[name] for name in self.ops),
            "op_names": list(names),
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> AffineTimeline:
        """The affine timeline :meth:`to_wire` packed; ``ValueError`` for anything else."""
        if wire.get("format") != AFFINE_WIRE_FORMAT:
            raise ValueError(
                f"not an affine timeline in {AFFINE_WIRE_FORMAT} (format {wire.get('format')!r})"
            )
        try:
            names = [str(name) for name in wire["op_names"]]
            affine = cls(
                granularity_bytes=int(wire["granularity_bytes"]),
                events=tuple(_event_values(_unpack(wire["events"]))),
                intercepts=tuple(_undeltas(_unpack(wire["intercepts"]))),
                slopes=tuple(_undeltas(_unpack(wire["slopes"]))),
                min_batch_size=int(wire["min_batch_size"]),
                ops=tuple(names[i] for i in _unpack(wire["ops"])),
            )
        except (KeyError, TypeError, IndexError, zlib.error, binascii.Error) as exc:
            raise ValueError(f"cannot read the affine timeline: {exc}") from exc
        if len(affine.intercepts) != wire["allocations"] or len(affine.events) != wire["event_count"]:
            raise ValueError("the affine timeline's packed lists do not have the stated lengths")
        if len(affine.slopes) != len(affine.intercepts) or (
            affine.ops and len(affine.ops) != len(affine.slopes)
        ):
            raise ValueError("the affine timeline's lists disagree in length")
        _check_events(affine.events, len(affine.intercepts))
        return affine

    def _check(self, batch_size: int) -> None:
        if batch_size < self.min_batch_size:
            raise ValueError(
                f"batch size {batch_size} is below {self.min_batch_size}, the smallest base point: "
                "the step may run other ops there"
            )


def canonical_events(events: Sequence[int]) -> tuple[int, ...]:
    """``events`` with every run of consecutive releases sorted by allocation.

    Releases between two allocations only lower the live bytes, so their order cannot change a
    peak; it does change between runs of the same step: autocast's cache of weight copies is
    released in the order of a hash table keyed by tensor addresses.
    """
    out: list[int] = []
    run: list[int] = []
    for event in events:
        if event >= 0:
            run.append(event)
            continue
        out.extend(sorted(run))
        run.clear()
        out.append(event)
    out.extend(sorted(run))
    return tuple(out)


def fit_affine(low: Timeline, high: Timeline) -> AffineTimeline:
    """The affine timeline through two timelines of the same step at two batch sizes.

    Raises :class:`ShapeMismatch` when they cannot be one: different event sequences (runs of
    releases compared in :func:`canonical_events` order), different ops, a size that is not a
    whole number of bytes per sample, or a size that shrinks as the batch grows.
    """
    if low.batch_size == high.batch_size:
        raise ValueError("two different batch sizes are needed")
    if low.batch_size > high.batch_size:
        low, high = high, low
    if low.granularity_bytes != high.granularity_bytes:
        raise ShapeMismatch("the timelines were counted with different granularities")
    events = canonical_events(low.events)
    if len(low.sizes) != len(high.sizes) or events != canonical_events(high.events):
        raise ShapeMismatch(_first_difference(low, high))
    ops = low.op_of()
    if ops != high.op_of():
        raise ShapeMismatch(
            f"the step at batch size {low.batch_size} and at {high.batch_size} make their allocations "
            "with different ops"
        )
    span = high.batch_size - low.batch_size
    intercepts: list[int] = []
    slopes: list[int] = []
    for k, (small, large) in enumerate(zip(low.sizes, high.sizes, strict=True)):
        slope, remainder = divmod(large - small, span)
        if remainder:
            raise ShapeMismatch(
                f"allocation {k} grows by {large - small} bytes over {span} samples: not a whole "
                "number of bytes per sample"
            )
        if slope < 0:
            raise ShapeMismatch(f"allocation {k} shrinks as the batch grows ({small} -> {large} bytes)")
        slopes.append(slope)
        intercepts.append(small - slope * low.batch_size)
    return AffineTimeline(
        granularity_bytes=low.granularity_bytes,
        events=events,
        intercepts=tuple(intercepts),
        slopes=tuple(slopes),
        min_batch_size=low.batch_size,
        ops=tuple(ops),
    )


def _first_difference(low: Timeline, high: Timeline) -> str:
    low_events, high_events = canonical_events(low.events), canonical_events(high.events)
    where = next(
        (i for i, (a, b) in enumerate(zip(low_events, high_events, strict=False)) if a != b),
        min(len(low.events), len(high.events)),
    )
    return (
        f"the steps at batch size {low.batch_size} and at {high.batch_size} differ: "
        f"{len(low.events)} vs {len(high.events)} events ({len(low.sizes)} vs {len(high.sizes)} "
        f"allocations), first different at event {where}"
    )


def constant_timeline(timeline: Timeline) -> AffineTimeline:
    """One batch size's timeline as an affine one valid at that size only (every slope 0).

    ``b = 1`` takes its own path through the step, so it is measured on its own; this lets the
    depth extrapolation (``probes.depth``) carry it as well.
    """
    return AffineTimeline(
        granularity_bytes=timeline.granularity_bytes,
        events=canonical_events(timeline.events),
        intercepts=timeline.sizes,
        slopes=(0,) * len(timeline.sizes),
        min_batch_size=timeline.batch_size,
        ops=tuple(timeline.op_of()),
    )


@dataclass(frozen=True)
class PeakCurve:
    """The counted peak at every batch size of one config: what the search would measure, predicted.

    ``affine`` gives every ``b >= affine.min_batch_size`` (2); ``peak_at_one`` is the peak at
    ``b = 1``, measured on its own (``None`` when it was not needed).
    """

    affine: AffineTimeline
    peak_at_one: int | None = None

    def peak(self, batch_size: int) -> int:
        if batch_size == 1 and self.affine.min_batch_size > 1:
            if self.peak_at_one is None:
                raise ValueError("the peak at batch size 1 was not measured")
            return self.peak_at_one
        return self.affine.peak(batch_size)

    def to_wire(self) -> dict[str, Any]:
        """A JSON-ready form: the affine timeline's wire form and the peak at 1."""
        return {"affine": self.affine.to_wire(), "peak_at_one": self.peak_at_one}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> PeakCurve:
        """The curve :meth:`to_wire` wrote; ``ValueError`` for anything else."""
        peak_at_one = wire.get("peak_at_one")
        if not isinstance(wire.get("affine"), dict) or not (
            peak_at_one is None or (isinstance(peak_at_one, int) and peak_at_one >= 0)
        ):
            raise ValueError("not a peak curve's wire form")
        return cls(affine=AffineTimeline.from_wire(wire["affine"]), peak_at_one=peak_at_one)

    def ladder_bracket(
        self, capacity_bytes: int, *, upper_limit: int | None = None
    ) -> tuple[int | None, int | None]:
        """``(max_batch_size, first_failing_batch_size)`` on the ladder, as the exhaustive search finds them.

        Fit is taken as monotone in the batch size, as the search takes it. ``ValueError`` when
        the answer needs the peak at 1 and it was not measured.
        """
        low = self.affine.min_batch_size
        cap = ladder_floor(upper_limit) if upper_limit is not None else None
        if cap is not None and cap < low:
            return self._below_base(capacity_bytes, cap)
        largest = self.affine.max_fitting(capacity_bytes, upper_limit=cap if cap is not None else 1 << 20)
        if largest is None:
            return self._below_base(capacity_bytes, cap)
        best = ladder_floor(largest)
        following = ladder_next(best)
        return best, None if cap is not None and following > cap else following

    def _below_base(self, capacity_bytes: int, cap: int | None) -> tuple[int | None, int | None]:
        fits_one = self.peak(1) <= capacity_bytes
        if not fits_one:
            return None, 1
        return 1, None if cap == 1 else 2
