"""DDP's Reducer at full depth, for ``predict``'s depth extrapolation (``probes.depth``).

Under ``ddp`` the step of a model cut to 3, 4 and 5 layers differs from the full model's by more
than layers: the Reducer's gradient buckets (torch's assignment: a first bucket limit of 1 MiB,
then 25 MiB; a larger tensor takes a bucket of its own), its
used-parameter map (one int32 per parameter, without checkpointing) and, with checkpointing, the
rebuild of the buckets in the order the gradients became ready are sized by the whole model. On
``predict`` :class:`probes.recipe.ddp.ShapeReducer` makes these allocations, named
(:data:`probes.recipe.ddp.REDUCER_LABELS`), so:

1. each base-depth trial reports the order its gradients became ready (:func:`ready_order`), by
   parameter name;
2. :func:`extrapolate_ready_order` checks that those orders are one layer block repeated (the
   last layer's gradients first) between the same first and last names at every base depth, and
   writes the full model's order;
3. :func:`reducer_bytes` builds the full model and its DDP wrapper (no step runs), rebuilds its
   buckets in that order under a recording, and sums what each label allocated, as the counter
   charges it;
4. ``probes.depth.extrapolate_depth`` puts those sums where the base depths allocate (and release)
   each label.

The result equals the full-depth search's, to the byte (``tests/probes/test_deep_predict.py``).
Anything that does not fit this shape raises :class:`probes.depth.DepthMismatch`, and the caller
searches at full depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from probes.depth import DepthMismatch
from probes.devices.counting import CountingMode
from probes.recipe.ddp import REDUCER_LABELS, ShapeReducer
from probes.spec import ConfigTask
from probes.timeline import AffineTimeline, round_up
from probes.trial import TrialSession


def _reducer(session: TrialSession) -> ShapeReducer:
    reducer = getattr(session.recipe.model, "reducer", None)
    if not isinstance(reducer, ShapeReducer):
        raise DepthMismatch("the DDP wrapper has no shape reducer (only predict's is read)")
    return reducer


def _names(session: TrialSession, reducer: ShapeReducer) -> list[str]:
    """The reducer's parameters' names, in its order."""
    model = session.recipe.inner
    assert model is not None
    by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    names = [by_id.get(id(parameter)) for parameter in reducer.parameters]
    if None in names:
        raise DepthMismatch("a parameter DDP reduces has no name in the model")
    return [name for name in names if name is not None]


def ready_order(session: TrialSession) -> tuple[str, ...] | None:
    """The names of the gradients in the order the bucket rebuild took them (after a trial), or
    ``None`` where the buckets were not rebuilt (DDP finding unused parameters)."""
    reducer = _reducer(session)
    if reducer.rebuilt_order is None:
        return None
    names = _names(session, reducer)
    return tuple(names[index] for index in reducer.rebuilt_order)


@dataclass(frozen=True)
class _OrderShape:
    """An order as first names, the stack's blocks (one per layer, in turn), last names."""

    first: tuple[str, ...]
    stack: str
    block: tuple[str, ...]
    descending: bool
    last: tuple[str, ...]

    def names(self, depth: int) -> tuple[str, ...]:
        layers = range(depth - 1, -1, -1) if self.descending else range(depth)
        blocks = [f"{self.stack}.{layer}.{rest}" for layer in layers for rest in self.block]
        return (*self.first, *blocks, *self.last)


def _split(name: str) -> tuple[str, int, str] | None:
    """``(stack path, layer, rest)`` at the name's first numeric part, or ``None`` (no layer)."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:position]), int(part), ".".join(parts[position + 1 :])
    return None


def _shape(order: Sequence[str], depth: int) -> _OrderShape:
    first: list[str] = []
    last: list[str] = []
    blocks: list[tuple[int, list[str]]] = []
    stacks: set[str] = set()
    for name in order:
        split = _split(name)
        if split is None:
            (last if blocks else first).append(name)
            continue
        if last:
            raise DepthMismatch(f"{name}'s gradient comes after a name outside the layers")
        stack, layer, rest = split
        stacks.add(stack)
        if not blocks or blocks[-1][0] != layer:
            blocks.append((layer, []))
        blocks[-1][1].append(rest)
    layers = [layer for layer, _ in blocks]
    descending = layers == list(range(depth - 1, -1, -1))
    if len(stacks) != 1 or not (descending or layers == list(range(depth))):
        raise DepthMismatch(f"the gradients at depth {depth} do not arrive one whole layer after another")
    if len({tuple(rest) for _, rest in blocks}) != 1:
        raise DepthMismatch(f"the layers' gradients at depth {depth} do not arrive in one repeated order")
    return _OrderShape(tuple(first), stacks.pop(), tuple(blocks[0][1]), descending, tuple(last))


def extrapolate_ready_order(orders: Mapping[int, Sequence[str]], depth: int) -> tuple[str, ...]:
    """The full model's gradient order from the base depths' (see the module docstring)."""
    shapes = {_shape(order, layers) for layers, order in orders.items()}
    if len(shapes) != 1:
        raise DepthMismatch("the base depths' gradients arrive in orders that differ beyond their layers")
    return shapes.pop().names(depth)


def full_ready_order(
    orders: Mapping[int, Sequence[str] | None], base_depths: Sequence[int], layers: int
) -> tuple[str, ...] | None:
    """The full model's gradient order from every base depth's (``None``: none rebuilt its buckets)."""
    if set(orders) != set(base_depths):
        raise DepthMismatch("a base depth reported no gradient order")
    rebuilt = {depth: order for depth, order in orders.items() if order is not None}
    if not rebuilt:
        return None
    if len(rebuilt) != len(orders):
        raise DepthMismatch("the buckets were rebuilt at some base depths and not at others")
    return extrapolate_ready_order(rebuilt, layers)


def reducer_bytes(task: ConfigTask, order: Sequence[str] | None) -> dict[str, int]:
    """What the Reducer of ``task``'s model (at its own depth) allocates, per label, as charged.

    ``order``: the gradient names for the bucket rebuild (``None``: no rebuild). The model is built
    and wrapped on the task's device (``predict``), under its cap; a build that does not succeed
    raises :class:`DepthMismatch` with its outcome (the full-depth search then says what it says).
    """
    with TrialSession(task) as session:
        failure = session.prepare()
        if failure is not None:
            raise DepthMismatch(f"the full model's DDP wrapper was not built: {failure[1]}")
        mode = getattr(session.device, "mode", None)
        if not isinstance(mode, CountingMode):
            raise DepthMismatch("the device does not count its bytes")
        reducer = _reducer(session)
        with mode.recording() as recording:
            if order is not None:
                index = {name: position for position, name in enumerate(_names(session, reducer))}
                missing = [name for name in order if name not in index]
                if missing or len(order) != len(index):
                    raise DepthMismatch("the gradient order does not name the model's parameters")
                with session.device.step_context():
                    reducer.rebuild_in_order([index[name] for name in order])
        totals: dict[str, int] = {}
        for size, op in zip(recording.sizes, recording.ops, strict=True):
            label = recording.op_names[op]
            if label in REDUCER_LABELS:
                totals[label] = totals.get(label, 0) + round_up(size, mode.granularity_bytes)
        return totals


def check_labels(timelines: Mapping[int, AffineTimeline], totals: Mapping[str, int]) -> None:
    """:class:`DepthMismatch` unless every base depth allocates the labels the full model's Reducer
    allocated, and no other."""
    wanted = set(totals)
    for depth, timeline in timelines.items():
        found = set(timeline.ops) & set(REDUCER_LABELS)
        if found != wanted:
            raise DepthMismatch(
                f"the Reducer at depth {depth} allocates {sorted(found)}, the full model's {sorted(wanted)}"
            )
