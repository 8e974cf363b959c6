"""``predict`` at any depth: the step of a deep decoder from the steps of three shallow ones.

A decoder stack repeats one block, so one more layer adds the same events to a training step's
memory timeline at the same places: its weights and optimizer state, its forward activations,
its backward, its share of the optimizer's and the gradient clipping's per-tensor loops. A few
allocations change size with depth instead (``torch.stack`` of the per-tensor gradient norms: 4
bytes a parameter tensor). This module learns that edit from the affine timelines
(``probes.timeline``) of two consecutive depths, checks that it turns the second into the third
exactly (every event, op and size line), and applies it as many times as the real depth needs.
The result is the affine timeline of the full-depth step, so its peak at any batch size is the
full-depth prediction to the byte — where it holds. Where the edit does not repeat (layers that
alternate, a pattern with a longer period, buckets that do not follow layers), :class:`DepthMismatch`
says where, and the caller runs the full depth.

How the edit is found: a diff of the two token sequences (an allocation or release, its op and its
size line in the batch), then, inside each changed stretch (and its short equal surroundings),
a second diff that ignores the constant part of the sizes: what it pairs grew with depth, what it
adds is inserted; anything removed, or a batch-dependent part that changed, is no repeatable edit.

Which model types are covered: :data:`EXACT_FAMILIES` lists those whose extrapolated peaks the
tests compare with full-depth predictions, to the byte (``tests/probes/test_depth.py``). Base
depths: 3, 4 and 5 (:data:`BASE_DEPTHS`): with checkpointing the first layers differ from the rest
at small depths (measured on tiny Llama: affine from 3 layers on).

Pure Python: no torch (the parent may extrapolate what children measured).
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from probes.timeline import ALLOC, AffineTimeline, ShapeMismatch

BASE_DEPTHS = (3, 4, 5)
"""The depths measured for a uniform stack: the edit from 3 to 4 must turn 4 into 5 exactly."""

MAX_PATTERN = 4
"""The longest repeat of per-layer settings (``layer_types`` …) extrapolated; longer ones run full depth."""

EXACT_FAMILIES: frozenset[str] = frozenset(
    {
        "cohere",
        "falcon",
        "gemma",
        "gemma2",
        "gpt2",
        "gpt_neox",
        "granite",
        "llama",
        "mistral",
        "mixtral",
        "olmo2",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "stablelm",
        "starcoder2",
    }
)
"""Model types whose extrapolated steps equal the full-depth steps in the tests, event for event.

``tests/probes/test_depth.py`` checks each (8 layers from 3, 4 and 5 — GPT-2, Llama, Mistral and
Qwen2 in every precision with and without checkpointing, the others in ``bf16-mixed`` with it;
Gemma 2 at 10 layers from 4, 6 and 8); ``bench/depth_families.py`` runs any family in every config
at any depth. Not here, so run at full depth: Gemma 3 (its attention pattern repeats every 6
layers), SmolLM3 (RoPE off every 4th layer; not tested deep enough), and every type not tested.
"""

DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Config keys that hold the number of decoder layers, in the order they are looked for."""


class DepthMismatch(ShapeMismatch):
    """The timelines of consecutive depths do not differ by one repeatable edit."""


Item = tuple[str, int, int]
"""One allocation's kind: its op, its bytes per sample and its batch-free bytes."""


@dataclass(frozen=True)
class Run:
    """A stretch of allocations (``sign`` ``+``) or of releases (``-``) with nothing between them.

    The order inside a run cannot change a peak: live bytes only rise through a run of
    allocations (its peak is at its end) and only fall through a run of releases. So a run is a
    multiset of items (``items``: ``(item, count)`` sorted), and a step is a sequence of runs of
    alternating sign. (Inside a run the order does change between depths: the autocast cache of
    weight copies is released in the order of a hash table.)
    """

    sign: str
    items: tuple[tuple[Item, int], ...]

    @classmethod
    def of(cls, sign: str, counts: Counter[Item]) -> Run:
        return cls(sign, tuple(sorted((item, n) for item, n in counts.items() if n)))

    def counts(self) -> Counter[Item]:
        return Counter(dict(self.items))


def _runs(timeline: AffineTimeline) -> list[Run]:
    """The step's events as runs (a resize is a release then an allocation: the same peaks)."""
    if not timeline.ops:
        raise DepthMismatch("the timeline does not name the ops of its allocations")
    ops, intercepts, slopes = timeline.ops, timeline.intercepts, timeline.slopes
    signed: list[tuple[str, Item]] = []
    made = 0
    for event in timeline.events:
        if event >= 0:
            signed.append(("-", (ops[event], slopes[event], intercepts[event])))
            continue
        if event != ALLOC:
            old = -event - 2
            signed.append(("-", (ops[old], slopes[old], intercepts[old])))
        signed.append(("+", (ops[made], slopes[made], intercepts[made])))
        made += 1
    return _merge(signed)


def _merge(signed: Sequence[tuple[str, Item]]) -> list[Run]:
    runs: list[Run] = []
    sign: str | None = None
    counts: Counter[Item] = Counter()
    for item_sign, item in signed:
        if item_sign != sign:
            if sign is not None:
                runs.append(Run.of(sign, counts))
            sign, counts = item_sign, Counter()
        counts[item] += 1
    if sign is not None:
        runs.append(Run.of(sign, counts))
    return runs


def _flatten(runs: Sequence[Run]) -> list[tuple[str, Item]]:
    return [(run.sign, item) for run in runs for item, n in run.items for _ in range(n)]


@dataclass(frozen=True)
class RunGrowth:
    """What one more layer does to one run: items added, and batch-free sizes that grow."""

    added: tuple[tuple[Item, int], ...]
    resized: tuple[tuple[Item, int], ...]
    """``(item at the shallower depth, bytes added to its batch-free size per layer)``."""

    def apply(self, run: Run, times: int) -> Run:
        counts = run.counts()
        for item, n in self.added:
            counts[item] += n * times
        for (op, slope, intercept), delta in self.resized:
            n = counts.pop((op, slope, intercept))
            counts[(op, slope, intercept + delta * times)] += n
        return Run.of(run.sign, counts)


@dataclass(frozen=True)
class DepthEdit:
    """What one more layer does to the runs of the shallower step.

    ``inserts[i]``: runs inserted before run ``i`` (``i == len`` for the end); ``growth[i]``: how
    run ``i`` grows.
    """

    base: tuple[Run, ...]
    inserts: Mapping[int, tuple[Run, ...]]
    growth: Mapping[int, RunGrowth]

    def apply(self, times: int) -> list[Run]:
        """The runs of the step ``times`` layers deeper (adjacent runs of one sign merged)."""
        out: list[Run] = []
        for index, run in enumerate(self.base):
            out.extend(self.inserts.get(index, ()) * times)
            grow = self.growth.get(index)
            out.append(run if grow is None else grow.apply(run, times))
        out.extend(self.inserts.get(len(self.base), ()) * times)
        return _merge(_flatten(out))


def _growth(old: Run, new: Run, index: int) -> RunGrowth:
    """How run ``index`` grew into ``new``: added items, and items whose batch-free size changed.

    An item gone from the run must pair with exactly one new item of the same op and batch slope
    (its size grew with depth); otherwise the layers do not simply repeat.
    """
    if old.sign != new.sign:
        raise DepthMismatch(f"run {index} changes from allocations to releases one layer deeper")
    before, after = old.counts(), new.counts()
    gone, added = before - after, after - before
    resized: list[tuple[Item, int]] = []
    for item, n in sorted(gone.items()):
        op, slope, intercept = item
        partners = [other for other in added if other[0] == op and other[1] == slope]
        if len(partners) != 1 or added[partners[0]] != n:
            raise DepthMismatch(
                f"run {index} loses {n} x {op} ({intercept} + {slope} b bytes) one layer deeper: "
                "the layers do not simply repeat"
            )
        partner = partners[0]
        del added[partner]
        resized.append((item, partner[2] - intercept))
    return RunGrowth(added=tuple(sorted(added.items())), resized=tuple(resized))


def learn_edit(shallow: AffineTimeline, deeper: AffineTimeline) -> DepthEdit:
    """The edit that turns the step at one depth into the step one layer deeper.

    A diff of the two run sequences: runs that are new are inserted; a run of the shallower step
    that changed must have a counterpart one layer deeper (a changed stretch of equal length,
    paired in order) that holds its items plus some, with batch-free sizes grown at most.
    :class:`DepthMismatch` otherwise.
    """
    if shallow.granularity_bytes != deeper.granularity_bytes:
        raise DepthMismatch("the timelines were counted with different granularities")
    return _learn_runs(_runs(shallow), _runs(deeper))


def _learn_runs(old: list[Run], new: list[Run]) -> DepthEdit:
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    inserts: dict[int, tuple[Run, ...]] = {}
    growth: dict[int, RunGrowth] = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "insert":
            inserts[i1] = tuple(new[j1:j2])
        elif tag == "replace" and i2 - i1 == j2 - j1:
            for offset in range(i2 - i1):
                growth[i1 + offset] = _growth(old[i1 + offset], new[j1 + offset], i1 + offset)
        elif tag != "equal":
            raise DepthMismatch(
                f"runs {i1}..{i2 - 1} of the shallower step have no counterpart one layer deeper "
                f"({i2 - i1} runs become {j2 - j1}): the layers do not simply repeat"
            )
    return DepthEdit(base=tuple(old), inserts=inserts, growth=growth)


def _to_affine(runs: Sequence[Run], template: AffineTimeline) -> AffineTimeline:
    """Runs back to an affine timeline: each release takes the latest live allocation of its kind."""
    events: list[int] = []
    intercepts: list[int] = []
    slopes: list[int] = []
    ops: list[str] = []
    live: dict[Item, list[int]] = {}
    for sign, item in _flatten(runs):
        op, slope, intercept = item
        if sign == "+":
            live.setdefault(item, []).append(len(intercepts))
            events.append(ALLOC)
            intercepts.append(intercept)
            slopes.append(slope)
            ops.append(op)
        else:
            stack = live.get(item)
            if not stack:
                raise DepthMismatch(f"a release of {op} finds no live allocation of its size")
            events.append(stack.pop())
    return AffineTimeline(
        granularity_bytes=template.granularity_bytes,
        events=tuple(events),
        intercepts=tuple(intercepts),
        slopes=tuple(slopes),
        min_batch_size=template.min_batch_size,
        ops=tuple(ops),
    )


def extrapolate_depth(
    timelines: Mapping[int, AffineTimeline], depth: int, whole_model: Mapping[str, int] | None = None
) -> AffineTimeline:
    """The affine timeline of the step at ``depth`` from those of three or more shallower depths.

    ``timelines`` maps evenly spaced depths (``d``, ``d + k``, ``d + 2k``, …: ``k`` layers make one
    repeat of the stack's pattern, 1 for a uniform stack) to their affine timelines (same batch
    sizes, precision and settings). The edit from the first to the second must turn the first into
    every further one exactly; then it is applied ``(depth - d) / k`` times. :class:`DepthMismatch`
    otherwise; ``ValueError`` for fewer than three or unevenly spaced depths, or a ``depth`` below
    them or off their spacing.

    ``whole_model`` maps labels (op names of ``probes.devices.counting.labelled_allocations``) to
    bytes: allocations sized by the whole model, which no layer's edit gives (DDP's gradient
    buckets). At each depth their items are taken as one placeholder per point of the step
    (:func:`_collapse`); the extrapolated step gets, at that point, the label's bytes at full depth
    (each a sum of allocations the counter rounded: the replay charges them as they are).
    """
    depths = sorted(timelines)
    if len(depths) < 3:
        raise ValueError(f"three or more depths are needed, got {depths}")
    first, step = depths[0], depths[1] - depths[0]
    if depths != list(range(first, first + step * len(depths), step)):
        raise ValueError(f"the depths must be evenly spaced, got {depths}")
    if depth < first or (depth - first) % step:
        raise ValueError(f"depth {depth} is not {first} plus a multiple of {step} layers")
    if len({timelines[d].min_batch_size for d in depths}) != 1:
        raise ValueError("the timelines were fitted from different batch sizes")
    if len({timelines[d].granularity_bytes for d in depths}) != 1:
        raise DepthMismatch("the timelines were counted with different granularities")
    groups = dict(whole_model or {})
    runs = {d: _collapse(_runs(timelines[d]), groups) for d in depths}
    edit = _learn_runs(runs[first], runs[first + step])
    for measured in depths[1:]:
        if edit.apply((measured - first) // step) != runs[measured]:
            raise DepthMismatch(
                f"the edit of {step} layer(s), learnt from depths {first} and {first + step}, does not give "
                f"the step at depth {measured}: the layers do not simply repeat"
            )
    return _to_affine(_sized(edit.apply((depth - first) // step), groups), timelines[first])


def _collapse(runs: Sequence[Run], groups: Mapping[str, int]) -> list[Run]:
    """Each run's allocations (or releases) named by a label of ``groups`` as one item of that label
    and no size: where the step makes them is what the depths must agree on, not how big they are.

    :class:`DepthMismatch` where a label's items grow with the batch size, or where a label is
    allocated (or released) at more than one point of the step, or not at all.
    """
    if not groups:
        return list(runs)
    points: Counter[tuple[str, str]] = Counter()
    out: list[Run] = []
    for run in runs:
        counts = run.counts()
        for label in groups:
            found = [item for item in counts if item[0] == label]
            if not found:
                continue
            if any(slope for _, slope, _ in found):
                raise DepthMismatch(f"{label} grows with the batch size")
            points[(run.sign, label)] += 1
            for item in found:
                del counts[item]
            counts[(label, 0, 0)] = 1
        out.append(Run.of(run.sign, counts))
    for label in groups:
        if points[("+", label)] != 1 or points[("-", label)] > 1:
            raise DepthMismatch(
                f"{label} is allocated at {points[('+', label)]} points of the step and released at "
                f"{points[('-', label)]}: one of each at most is extrapolated"
            )
    return out


def _sized(runs: Sequence[Run], groups: Mapping[str, int]) -> list[Run]:
    """The placeholders of :func:`_collapse` given the bytes of their label at full depth."""
    if not groups:
        return list(runs)
    sized: list[Run] = []
    for run in runs:
        counts = run.counts()
        for label, nbytes in groups.items():
            n = counts.pop((label, 0, 0), 0)
            if n:
                counts[(label, 0, nbytes)] += n
        sized.append(Run.of(run.sign, counts))
    return sized


# -- which depths to measure, and configs of reduced depth ------------------------------------------


def model_depth(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """``(key, layers)`` of a config dict (``PretrainedConfig.to_dict()``), or ``None``."""
    for key in DEPTH_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def _period(values: Sequence[Any]) -> int:
    """The shortest period ``p`` with ``values[i] == values[i % p]`` for every ``i``."""
    for period in range(1, len(values) + 1):
        if all(values[i] == values[i % period] for i in range(len(values))):
            return period
    return len(values)


@dataclass(frozen=True)
class DepthPlan:
    """How to predict a model's step from shallower ones: the depths to measure, and the real one."""

    key: str
    layers: int
    base_depths: tuple[int, ...]

    @property
    def step(self) -> int:
        return self.base_depths[1] - self.base_depths[0]


def depth_plan(model_type: str, config: Mapping[str, Any]) -> DepthPlan | str:
    """The depths to measure to predict this model, or a sentence saying why it runs at full depth.

    Covered: a model type in :data:`EXACT_FAMILIES` whose per-layer settings repeat with a period
    of at most :data:`MAX_PATTERN` layers (``layer_types`` and any other list with one entry per
    layer; no ``mlp_only_layers``, ``decoder_sparse_step`` 1) and which is deeper than the third
    base depth. The base depths are the first multiple of the period from 3 on and the next two
    (3, 4, 5 for a uniform stack); the real depth must be one of them plus whole periods.
    """
    if model_type not in EXACT_FAMILIES:
        return f"depth extrapolation is not shown exact for {model_type} models"
    found = model_depth(config)
    if found is None:
        return "the config states no layer count"
    key, layers = found
    if config.get("mlp_only_layers"):
        return "some layers are dense and others sparse (mlp_only_layers)"
    if config.get("decoder_sparse_step", 1) != 1:
        return "only every decoder_sparse_step-th layer is sparse"
    period = 1
    for value in config.values():
        if isinstance(value, list) and len(value) == layers:
            period = math.lcm(period, _period(value))
    if period > MAX_PATTERN:
        return f"the layers repeat only every {period} layers"
    first = -(-BASE_DEPTHS[0] // period) * period
    bases = (first, first + period, first + 2 * period)
    if layers <= bases[-1]:
        return f"{layers} layers: no deeper than the base depths {bases}"
    if (layers - first) % period:
        return f"{layers} layers are not a whole number of {period}-layer repeats past {first}"
    return DepthPlan(key=key, layers=layers, base_depths=bases)


def reduced_depth_overrides(config: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """Config overrides that make the same model ``depth`` layers deep.

    The depth key, and every list the config holds one entry per layer in (``layer_types`` and the
    like) cut to its first ``depth`` entries. ``ValueError`` when the config states no depth, or
    ``depth`` is not below it.
    """
    found = model_depth(config)
    if found is None:
        raise ValueError(f"the config states no layer count (looked for {', '.join(DEPTH_KEYS)})")
    key, layers = found
    if not 1 <= depth < layers:
        raise ValueError(f"depth {depth} must be between 1 and the model's {layers} layers, exclusive")
    overrides: dict[str, Any] = {key: depth}
    for name, value in config.items():
        if isinstance(value, list) and len(value) == layers and name not in overrides:
            overrides[name] = value[:depth]
    return overrides


def same_step(one: AffineTimeline, other: AffineTimeline) -> bool:
    """Whether two affine timelines are the same step run for run (every peak equal at every batch size)."""
    return _runs(one) == _runs(other)
