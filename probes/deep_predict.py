"""``predict`` of a deep model: answer a config from the model cut to a few layers, where that is exact.

The parent side (no torch). For a config on the ``predict`` device, :func:`answer_from_depths`
asks a trial child for the config's curve with ``require_depth_extrapolation``
(:func:`probes.curve.measure_curve`): timelines at batch sizes 2 and 3 of the model cut to its
base depths (3, 4 and 5 layers for a uniform stack), the affine fit per depth, the per-layer edit
checked across the three depths (``probes.depth``), and its extrapolation to the model's own depth;
batch size 1 on its own where 2 does not fit. The ladder bracket of that curve for the device's
capacity is what the full-depth search finds, and the curve's peak at the answer is the search's
peak there, to the byte (``tests/probes/test_deep_predict.py`` compares them through the engine).

Where batch size 1 does not fit, the answer is the same (no size fits, 1 fails); what it needs is
stated exactly (the curve's peak at 1) where the full-depth search states a lower bound (the bytes
in use when its trial ran out), or, when weights, gradients and optimizer state alone exceed the
capacity and no trial ran, as that floor (a lower bound, as the search's).

Where it does not apply, it answers with the sentence that says why, and the engine runs today's
full-depth search:

- the model type is not in :data:`probes.depth.EXACT_FAMILIES`, or its layers do not repeat with a
  short period, or it is no deeper than the base depths (``probes.depth.depth_plan``);
- the steps at batch sizes 2 and 3 differ in shape, or the layers' edit does not repeat
  (``ShapeMismatch``/``DepthMismatch`` in the child), or a base-depth trial did not fit.

``single``, ``ddp`` and ``fsdp`` (full fine-tuning and LoRA) are covered. Under ``ddp`` the
Reducer's gradient buckets, used-parameter map and bucket rebuild are sized by the whole model, not
by a layer's edit: the child takes them from the full model wrapped in DDP, with no step run
(``probes.ddp_depth``), and puts them where the base depths allocate theirs. Under ``fsdp`` a
process's second trial differs in shape from its first (FSDP2 keeps the unsharded-parameter
storages it allocated and resizes them), so each base point runs as the first trial of its own session
(``probes.curve.FIRST_TRIAL_STRATEGIES``): the timelines at batch sizes 2 and 3 then fit one affine
timeline, and the extrapolation equals the full-depth search's answer, whose trials (later ones in
a reused child, or first ones after an out-of-memory trial) peak at the same bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from probes.depth import BASE_DEPTHS, EXACT_FAMILIES
from probes.isolate import TrialChild, curve_from_reply
from probes.plan import make_plan
from probes.protocol import CurveReply, CurveRequest, InfoReply
from probes.shortfall import exact_need, min_batch_need
from probes.spec import (
    ConfigResult,
    ConfigStatus,
    ConfigTask,
    DepthExtrapolation,
    ProbeSpec,
    TrialRecord,
)
from probes.timeline import PeakCurve

CURVE_TRIALS_AT_MOST = 9
"""Trials a curve runs at most (2 and 3, and 1 where 2 does not fit, at three base depths)."""


@dataclass(frozen=True)
class DepthAnswer:
    """A config answered from its base depths: the bracket, the peak at the answer, the trials.

    Without a fitting size, ``peak_bytes`` is the peak at batch size 1 when the curve has it
    (``None`` when the floor alone ruled every size out and no trial ran).
    """

    max_batch_size: int | None
    first_failing_batch_size: int | None
    peak_bytes: int | None
    trials: tuple[TrialRecord, ...]
    extrapolation: DepthExtrapolation
    capacity_bytes: int | None = None


def request_curve(
    spec: ProbeSpec, task: ConfigTask, cancel: threading.Event | None, *, require_depth_extrapolation: bool
) -> CurveReply:
    """``task``'s curve (``probes.curve.measure_curve``) from a fresh trial child, with the spec's
    trial settings; a child that fails becomes a reply without a bracket."""
    child = TrialChild(task, cancel=cancel)
    try:
        request = CurveRequest(
            accumulation_steps=spec.trial_accumulation_steps,
            optimizer_steps=spec.trial_optimizer_steps,
            upper_limit=spec.max_batch_size_limit,
            require_depth_extrapolation=require_depth_extrapolation,
        )
        return curve_from_reply(
            child.request(request, timeout_seconds=spec.trial_timeout_seconds * CURVE_TRIALS_AT_MOST)
        )
    finally:
        child.close()


def answer_from_depths(
    spec: ProbeSpec, task: ConfigTask, context: InfoReply, stop: threading.Event | None
) -> DepthAnswer | DepthExtrapolation:
    """The config's answer from its base depths, or (no answer) why the search must run at full depth.

    The returned :class:`DepthExtrapolation` of a fallback has ``extrapolated`` false and its
    ``note`` says why and how many base-depth trials the attempt spent; those trials are not in the
    config's ``trials`` (a cut model's batch size 1 must not state the full model's need).
    """
    layers = context.model.layers

    def full_depth(why: str) -> DepthExtrapolation:
        return DepthExtrapolation(extrapolated=False, layers=layers, note=f"searched at full depth: {why}")

    model_type = context.model.model_type
    if model_type not in EXACT_FAMILIES:
        return full_depth(f"depth extrapolation is not shown exact for {model_type} models")
    if layers is not None and layers <= BASE_DEPTHS[-1]:
        return full_depth(f"{layers} layers: no deeper than the base depths {BASE_DEPTHS}")
    reply = request_curve(spec, task, stop, require_depth_extrapolation=True)
    layers = reply.layers if reply.layers is not None else layers
    spent = f" ({reply.trials} trials at base depths {reply.depths} were spent)" if reply.trials else ""
    if reply.nothing_fits:
        return DepthAnswer(
            max_batch_size=None,
            first_failing_batch_size=1,
            peak_bytes=None,
            trials=(),
            capacity_bytes=reply.capacity_bytes,
            extrapolation=DepthExtrapolation(
                extrapolated=True,
                layers=layers,
                note=f"no trial ran: {reply.reason}",
            ),
        )
    if reply.curve is None or not reply.depths or not reply.has_bracket:
        return full_depth((reply.reason or "the depth extrapolation gave no curve") + spent)
    try:
        curve = PeakCurve.from_wire(reply.curve)
        peak = curve.peak(reply.max_batch_size if reply.max_batch_size is not None else 1)
    except ValueError as exc:
        return full_depth(f"the extrapolated curve cannot be read: {exc}" + spent)
    depths = ", ".join(str(d) for d in reply.depths[:-1]) + f" and {reply.depths[-1]}"
    return DepthAnswer(
        max_batch_size=reply.max_batch_size,
        first_failing_batch_size=reply.first_failing_batch_size,
        peak_bytes=peak,
        trials=reply.trial_records,
        capacity_bytes=reply.capacity_bytes,
        extrapolation=DepthExtrapolation(
            extrapolated=True,
            layers=layers,
            base_depths=reply.depths,
            note=f"depth-extrapolated from {depths} layers to {layers}: the trials ran at those depths",
        ),
    )


def depth_result(
    spec: ProbeSpec,
    task: ConfigTask,
    answer: DepthAnswer,
    warnings: Callable[[list[TrialRecord]], tuple[str, ...]],
    *,
    floor_bytes: int | None,
) -> ConfigResult:
    """The config's result from a :class:`DepthAnswer`: the bracket, the peak, the plan, the trials
    that ran (at their depths). No step time: no trial ran the model at its own depth.

    ``floor_bytes`` (the engine's floor for this config) states the need where no trial ran."""
    common = {
        "precision": task.precision,
        "gradient_checkpointing": task.gradient_checkpointing,
        "strategy": task.strategy,
        "first_failing_batch_size": answer.first_failing_batch_size,
        "warnings": warnings(list(answer.trials)),
        "trials": answer.trials,
        "depth_extrapolation": answer.extrapolation,
    }
    if answer.max_batch_size is None:
        need = (
            exact_need(answer.peak_bytes, answer.capacity_bytes)
            if answer.peak_bytes is not None
            else min_batch_need([], answer.capacity_bytes, floor_bytes)
        )
        return ConfigResult(
            status=ConfigStatus.OK,
            reason=need.sentence,
            min_batch_needs_bytes=need.bytes,
            min_batch_need_is_lower_bound=need.lower_bound,
            **common,
        )
    return ConfigResult(
        status=ConfigStatus.OK,
        max_batch_size=answer.max_batch_size,
        peak_memory_bytes=answer.peak_bytes,
        confirmed=False,
        plan=make_plan(
            max_batch_size=answer.max_batch_size,
            target=spec.target_effective_batch_size,
            world_size=spec.world_size,
        ),
        **common,
    )
