"""Measure a config's whole peak curve on a counting device (``predict``, ``simulated``): few trials.

What :func:`measure_curve` does, in the trial child (it runs models), for one config:

1. If weights + gradients + optimizer state alone (``probes.search.training_state_bytes``) exceed
   the capacity, no batch size fits: no trial runs (full fine-tuning; with LoRA/QLoRA adapters
   only the adapters train, and the trial's own weights check stands in).
2. If the model type and config are covered by depth extrapolation (``probes.depth.depth_plan``),
   the trials run on the same model cut to the three base depths (3, 4, 5 layers for a uniform
   stack); otherwise on the model itself.
3. At each depth, trials at batch sizes 2 and 3 record their timelines (``probes.timeline``); the
   affine fit gives every ``b >= 2``; the depth extrapolation (where used) gives the real depth.
   Under ``ddp`` and ``fsdp`` each trial is the first of its own session
   (:data:`FIRST_TRIAL_STRATEGIES`); otherwise one session per depth runs them in turn. Under
   ``ddp`` the Reducer's allocations, sized by the whole model, come from the full model wrapped
   (no step), its gradient order from the base depths' (``probes.ddp_depth``).
4. When batch size 2 does not fit the capacity, batch size 1 (its own path through the step) is
   measured the same way.

The answer (``PeakCurve.ladder_bracket``) is what the exhaustive ladder search on the same device
would find, to the byte of every peak — where the shapes agree. Where they do not (the steps at 2
and 3 differ, the layers do not repeat, a trial did not run to the end), :class:`CurveOutcome`
carries no curve and says why: the caller searches with trials as before.

The engine calls it in a trial child twice: to seed ``cuda``/``simulated`` searches
(``probes.engine._predict_seed``), and on ``predict`` itself to answer a deep model from its base
depths (``probes.deep_predict``, with ``require_depth_extrapolation``: no trials where the depth
plan does not apply, the engine then searches at full depth). ``bench/depth_predict.py`` calls it
directly.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

from probes.ddp_depth import check_labels, full_ready_order, ready_order, reducer_bytes
from probes.depth import DepthPlan, depth_plan, extrapolate_depth, model_depth, reduced_depth_overrides
from probes.models import inspect_model, load_config
from probes.search import training_state_bytes
from probes.spec import ConfigTask, Outcome, Strategy, TrialRecord
from probes.timeline import AffineTimeline, PeakCurve, ShapeMismatch, Timeline, constant_timeline, fit_affine
from probes.trial import TrialSession

BASE_BATCH_SIZES = (2, 3)
"""The two batch sizes whose timelines give every other (``b = 1`` takes another path)."""

FIRST_TRIAL_STRATEGIES = frozenset({Strategy.DDP, Strategy.FSDP})
"""Strategies whose step depends on the process's history: each point is the first trial of its
own session (a fresh model, wrapper and process group), as a real job's first steps are.

Measured (tiny Llama, 2 ranks, 2026-12-02): a session's second trial differs in shape from its
first (FSDP2 keeps the unsharded-parameter storages it allocated in the first trial and resizes
them in later ones; DDP's Reducer rebuilds its buckets after the first iteration), so 2 and 3 run
in one session fit no affine timeline; as first trials they do. The peaks were the same either way
in every config measured (the first trial's covers its own later steps)."""


@dataclass
class CurveOutcome:
    """A measured curve, or why there is none; and what it cost."""

    curve: PeakCurve | None = None
    reason: str | None = None
    nothing_fits: bool = False
    #: the peak a passing trial may reach on the task's device (what the bracket is for)
    capacity_bytes: int | None = None
    depths: tuple[int, ...] = ()
    #: ``(max_batch_size, first_failing_batch_size)`` on the ladder for ``capacity_bytes``
    bracket: tuple[int | None, int | None] | None = None
    trials: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: every trial run, with ``layers`` set where it ran on the model cut to a base depth
    records: list[TrialRecord] = field(default_factory=list)
    #: the model's own decoder layers, where its config states them
    layers: int | None = None


class _NoCurve(Exception):
    """A trial or a fit that ends the measurement; the message is the outcome's reason."""


def measure_curve(
    task: ConfigTask,
    *,
    accumulation_steps: int = 2,
    optimizer_steps: int = 2,
    extrapolate_depth_allowed: bool = True,
    upper_limit: int | None = None,
    require_depth_extrapolation: bool = False,
) -> CurveOutcome:
    """The peak at every batch size of ``task``'s config, from a few timelines (see the module docstring).

    ``bracket`` is the curve's ladder answer for the device's capacity, within ``upper_limit``.
    ``require_depth_extrapolation``: where the depth plan does not apply, run no trial and say why.
    """
    started = time.perf_counter()
    outcome = CurveOutcome()
    config = load_config(task.model, allow_remote_code=task.allow_remote_code)
    facts = inspect_model(task.model, task.seq_len, allow_remote_code=task.allow_remote_code)
    # Every parameter trains only in full fine-tuning: with adapters the weights' own check
    # (``TrialSession``, ``probes.weights_fit``) is the floor.
    floor = (
        None
        if task.finetuning.uses_adapters
        else training_state_bytes(
            _rank_parameters(task, facts.parameter_count), task.precision, optimizer=task.optimizer
        )
    )
    with ExitStack() as stack:
        probe = stack.enter_context(TrialSession(task))
        capacity = probe.device.capacity_bytes
        outcome.capacity_bytes = capacity
        probe.close()
        if floor is not None and floor > capacity:
            outcome.nothing_fits = True
            outcome.bracket = (None, 1)
            outcome.reason = (
                f"weights, gradients and optimizer state alone take {floor} bytes, more than the "
                f"{capacity} bytes a trial may use"
            )
            outcome.seconds = time.perf_counter() - started
            return outcome
        found = model_depth(config.to_dict())
        outcome.layers = found[1] if found is not None else None
        plan = depth_plan(str(config.model_type), config.to_dict()) if extrapolate_depth_allowed else None
        if isinstance(plan, str):
            outcome.notes.append(f"full depth: {plan}")
        if require_depth_extrapolation and not isinstance(plan, DepthPlan):
            outcome.reason = plan if isinstance(plan, str) else "depth extrapolation is switched off"
            outcome.seconds = time.perf_counter() - started
            return outcome
        depths: tuple[int | None, ...] = plan.base_depths if isinstance(plan, DepthPlan) else (None,)
        outcome.depths = tuple(d for d in depths if d is not None)
        points = _Points(task, config.to_dict(), stack, accumulation_steps, optimizer_steps, outcome)
        try:
            affine = _combine({depth: points.fit(depth, BASE_BATCH_SIZES) for depth in depths}, plan, points)
            curve = PeakCurve(affine=affine)
            if curve.peak(BASE_BATCH_SIZES[0]) > capacity:
                one = _combine({depth: points.fit(depth, (1,)) for depth in depths}, plan, points)
                curve = PeakCurve(affine=affine, peak_at_one=one.peak(1))
            outcome.curve = curve
            outcome.bracket = curve.ladder_bracket(capacity, upper_limit=upper_limit)
        except _NoCurve as exc:
            outcome.reason = str(exc)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _rank_parameters(task: ConfigTask, parameter_count: int) -> int:
    """The parameters one rank keeps: all of them, or its FSDP shard (at least ``count // ranks``)."""
    if task.strategy is Strategy.FSDP:
        return parameter_count // task.world_size
    return parameter_count


def _at_depth(task: ConfigTask, config: dict[str, object], depth: int | None) -> ConfigTask:
    if depth is None:
        return task
    overrides = {**task.model.config, **reduced_depth_overrides(config, depth)}
    return task.model_copy(update={"model": task.model.model_copy(update={"config": overrides})})


class _Points:
    """Where each (depth, batch size) point's trial runs: in one session per depth, or in a fresh
    session of its own where a process's history changes the step (:data:`FIRST_TRIAL_STRATEGIES`)."""

    def __init__(
        self,
        task: ConfigTask,
        config: dict[str, object],
        stack: ExitStack,
        accumulation_steps: int,
        optimizer_steps: int,
        outcome: CurveOutcome,
    ) -> None:
        self._task = task
        self._config = config
        self._stack = stack
        self._steps = (accumulation_steps, optimizer_steps)
        self._outcome = outcome
        self._fresh = task.strategy in FIRST_TRIAL_STRATEGIES
        self._sessions: dict[int | None, TrialSession] = {}
        #: under ``ddp``, per base depth: the order the gradients arrived in (``probes.ddp_depth``)
        self.ready_orders: dict[int, tuple[str, ...] | None] = {}
        self._reducer_bytes: dict[str, int] | None = None

    def fit(self, depth: int | None, batch_sizes: tuple[int, ...]) -> AffineTimeline:
        timelines = [self._timeline(depth, batch_size) for batch_size in batch_sizes]
        try:
            return constant_timeline(timelines[0]) if len(timelines) == 1 else fit_affine(*timelines)
        except ShapeMismatch as exc:
            raise _NoCurve(str(exc)) from exc

    def _timeline(self, depth: int | None, batch_size: int) -> Timeline:
        accumulation_steps, optimizer_steps = self._steps
        task = _at_depth(self._task, self._config, depth)
        if self._fresh:
            with TrialSession(task) as session:
                record, timeline = session.run_with_timeline(
                    batch_size, accumulation_steps=accumulation_steps, optimizer_steps=optimizer_steps
                )
                if depth is not None and self._task.strategy is Strategy.DDP and timeline is not None:
                    self._note_order(depth, session)
        else:
            if depth not in self._sessions:
                self._sessions[depth] = self._stack.enter_context(TrialSession(task))
            record, timeline = self._sessions[depth].run_with_timeline(
                batch_size, accumulation_steps=accumulation_steps, optimizer_steps=optimizer_steps
            )
        self._outcome.trials += 1
        if depth is not None:
            record = record.model_copy(update={"layers": depth})
        self._outcome.records.append(record)
        if record.outcome is not Outcome.FIT or timeline is None:
            raise _NoCurve(
                f"the trial at batch size {batch_size} ended in {record.outcome.value}"
                + (f" ({record.message})" if record.message else "")
            )
        return timeline

    def _note_order(self, depth: int, session: TrialSession) -> None:
        try:
            order = ready_order(session)
        except ShapeMismatch as exc:
            raise _NoCurve(str(exc)) from exc
        if self.ready_orders.setdefault(depth, order) != order:
            raise _NoCurve(f"the gradients at depth {depth} arrived in different orders in two trials")

    def whole_model(self, plan: DepthPlan) -> dict[str, int]:
        """What the full model's DDP Reducer allocates, per label (``probes.ddp_depth``); nothing
        for the other strategies. Measured once, on the first call."""
        if self._task.strategy is not Strategy.DDP:
            return {}
        if self._reducer_bytes is None:
            try:
                order = full_ready_order(self.ready_orders, plan.base_depths, plan.layers)
                self._reducer_bytes = reducer_bytes(self._task, order)
            except ShapeMismatch as exc:
                raise _NoCurve(str(exc)) from exc
        return self._reducer_bytes


def _combine(
    fits: dict[int | None, AffineTimeline], plan: DepthPlan | str | None, points: _Points
) -> AffineTimeline:
    if not isinstance(plan, DepthPlan):
        return fits[None]
    timelines = {depth: fit for depth, fit in fits.items() if depth is not None}
    whole_model = points.whole_model(plan)
    try:
        if whole_model:
            check_labels(timelines, whole_model)
        return extrapolate_depth(timelines, plan.layers, whole_model)
    except ShapeMismatch as exc:
        raise _NoCurve(str(exc)) from exc
