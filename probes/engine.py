"""Run a whole probe: every config's search in trial children, confirmation, plans, recommendation.

This is the parent side and imports no torch, so the service and the CLI can call it directly.
Per config the pure :class:`probes.search.LadderSearch` proposes batch sizes (aimed by the floor:
weights, gradients and optimizer state); each trial runs in a :class:`probes.isolate.TrialChild`
that keeps the model built between passing trials and is replaced after any other outcome (an OOM
can leave the allocator fragmented; an error can leave a CUDA context poisoned). The chosen size is
then re-run in a fresh child for ``confirm_optimizer_steps`` optimizer steps, and then at varying
dynamic-padding lengths (``probes.confirmation``), before it is reported as safe; a failed
confirmation reopens the search below it.

With ``predict_seeding`` on ``cuda`` and ``simulated``, each config is first measured on
``predict`` for the device's capacity (``probes.curve`` in a CPU child: timelines at 2 and 3, the
whole curve); :class:`probes.seeding.SeededSearch` then asks the device for the predicted max (as
the confirmation: fresh child, confirmation steps) and the next ladder size, and falls back to the
ladder search where the device disagrees. The result reports both devices' trials.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from probes.confirmation import ConfirmationPlan, confirmation_plan, confirmation_report, judge_confirmation
from probes.deep_predict import DepthAnswer, answer_from_depths, depth_result, request_curve
from probes.errors import DeviceUnavailable, ProbeInputError
from probes.finetuning_spec import memory_floor_bytes
from probes.isolate import ProbeCancelled, TrialChild, info_from_reply, trial_from_reply
from probes.plan import make_plan
from probes.protocol import InfoReply, InfoRequest, TrialRequest
from probes.recipe.support import skip_reason
from probes.recommend import recommend
from probes.search import LadderSearch
from probes.seeding import PredictedBracket, SeededSearch
from probes.shortfall import explain_shortfalls, min_batch_need, single_rank_warning
from probes.spec import (
    FLEET_DEVICE,
    ConfigResult,
    ConfigStatus,
    ConfigTask,
    Confirmation,
    DepthExtrapolation,
    DeviceInfo,
    EventKind,
    Optimizer,
    Outcome,
    Phase,
    Precision,
    ProbeEvent,
    ProbeResult,
    ProbeSpec,
    Seeding,
    Strategy,
    TrialRecord,
)
from probes.trial_memo import TrialMemo

EventSink = Callable[[ProbeEvent], None]

_INFO_TIMEOUT_SECONDS = 600.0
MAX_CONFIRMATION_ROUNDS = 3


def _skip_reason(spec: ProbeSpec, precision: Precision, strategy: Strategy, context: InfoReply) -> str | None:
    device = context.device
    if precision.needs_bf16 and not device.bf16_supported:
        capability = device.compute_capability or "unknown"
        return (
            f"{device.name} has no native bf16 (compute capability {capability} < 8.0); "
            "use 16-mixed or 32-true"
        )
    return skip_reason(
        strategy=strategy,
        optimizer=spec.optimizer,
        attn_implementation=spec.attn_implementation,
        device=device,
        support=context.recipe,
        finetuning=spec.finetuning_spec,
    )


_OPTIMIZER_STATES = {Optimizer.ADAMW_TORCH: 2, Optimizer.ADAMW_TORCH_FUSED: 2}
"""Full-size states per trainable weight; the other optimizers count none (a lower bound)."""


def _memory_floor(spec: ProbeSpec, precision: Precision, strategy: Strategy, context: InfoReply) -> int:
    """One rank's need before any activation: weights, a gradient and the optimizer's states per
    trainable weight (FSDP: a 1/world_size share)."""
    method = spec.finetuning_spec
    if method.uses_adapters:
        if context.finetuning is None:
            return 0
        trainable = context.finetuning.trainable_parameters
        frozen = context.finetuning.frozen_parameters
    else:
        trainable, frozen = context.model.parameter_count, 0
    return memory_floor_bytes(
        method,
        precision,
        trainable_parameters=trainable,
        frozen_parameters=frozen,
        optimizer_states=_OPTIMIZER_STATES.get(spec.optimizer, 0),
        shards=spec.world_size if strategy is Strategy.FSDP else 1,
    )


def _fp16_warnings(trials: list[TrialRecord]) -> tuple[str, ...]:
    flagged = [t for t in trials if t.loss_flag]
    if not flagged:
        return ()
    first = flagged[0]
    return (
        f"fp16 loss was {first.loss_flag} at batch size {first.batch_size}: the loss scale cannot "
        "hold this model's range; train in bf16-mixed (where supported) or 32-true",
    )


@dataclass
class ConfigRun:
    """One config's search, driven trial by trial through replaceable children.

    ``child``, when given, serves the first trials (a child that already answered ``info``, say);
    the run closes whatever child it holds when it ends. ``emit`` hears every trial with its phase.
    """

    spec: ProbeSpec
    task: ConfigTask
    #: the device's, as the first child reported it (``None``: unknown, the search then only climbs)
    capacity_bytes: int | None
    emit: Callable[[EventKind, TrialRecord | None, ConfigResult | None, Phase | None], None]
    cancel: threading.Event | None
    confirm: bool = True
    child: TrialChild | None = None
    all_trials: list[TrialRecord] = field(default_factory=list)
    #: weights + gradients + optimizer state (``probes.search.training_state_bytes``), if known
    floor_bytes: int | None = None
    #: ``predict``'s bracket for this device: the search confirms it first
    seed: PredictedBracket | None = None
    #: fits lent between the cards of a multi-card ``predict`` request (``probes.cards``)
    memo: TrialMemo | None = None
    #: what a confirmation runs after its worst-case steps (``probes.confirmation``); ``None``: only those
    confirmation: ConfirmationPlan | None = None

    def _trial(
        self, batch_size: int, optimizer_steps: int, phase: Phase, *, fresh: bool, confirming: bool = False
    ) -> TrialRecord:
        """One trial; a child that died without reporting (``crash``) is replaced and the trial
        run once more, since its death says nothing about the batch size. Both are recorded.
        ``confirming``: the trial runs as the confirmation plan says and is judged by it."""
        lengths = None
        plan = self.confirmation if confirming else None
        if plan is not None:
            optimizer_steps, lengths = plan.optimizer_steps, plan.lengths
        trial = self._run_trial(batch_size, optimizer_steps, fresh=fresh, lengths=lengths)
        if trial.outcome is Outcome.CRASH:
            self._record(trial, phase)
            trial = self._run_trial(batch_size, optimizer_steps, fresh=True, lengths=lengths)
        if plan is not None:
            trial = judge_confirmation(trial, plan, self.capacity_bytes)
        self._record(trial, phase)
        return trial

    def _record(self, trial: TrialRecord, phase: Phase) -> None:
        self.all_trials.append(trial)
        self.emit(EventKind.TRIAL, trial, None, phase)

    def _request(
        self, batch_size: int, optimizer_steps: int, lengths: tuple[int, ...] | None
    ) -> TrialRequest:
        """The trial request to send (a seam: tests add ``oom_at_micro_step`` here)."""
        return TrialRequest(
            batch_size=batch_size,
            accumulation_steps=self.spec.trial_accumulation_steps,
            optimizer_steps=optimizer_steps,
            lengths=lengths,
        )

    def _run_trial(
        self, batch_size: int, optimizer_steps: int, *, fresh: bool, lengths: tuple[int, ...] | None = None
    ) -> TrialRecord:
        request = self._request(batch_size, optimizer_steps, lengths)
        if self.memo is not None and (lent := self.memo.recall(self.task, request, self.capacity_bytes)):
            return lent
        if fresh and self.child is not None:
            self.child.close()
            self.child = None
        if self.child is None:
            self.child = TrialChild(self.task, cancel=self.cancel)
        reply = self.child.request(request, timeout_seconds=self.spec.trial_timeout_seconds)
        trial, discard = trial_from_reply(batch_size, reply)
        if discard:
            self.child.close()
            self.child = None
        if self.memo is not None:
            self.memo.remember(self.task, request, trial)
        return trial

    def run(self) -> tuple[LadderSearch | SeededSearch, TrialRecord | None]:
        """Search, then confirm; returns the search and the passing trial that backs the answer.

        Every search trial after the first two runs *speculatively as a confirmation*: in a fresh
        child for ``confirm_optimizer_steps``. When the search closes on such a trial, it is the
        confirmation and nothing is re-run (on the CPU benchmark this saved one trial in most
        configs); otherwise the answer is re-run in a fresh child. When ``confirm`` is off, the
        search's own trial at the answer backs it. With a ``seed``, its predicted max is the first
        trial and runs as the confirmation.
        """
        spec = self.spec
        search: LadderSearch | SeededSearch
        if self.seed is not None:
            search = SeededSearch(
                self.seed,
                capacity_bytes=self.capacity_bytes,
                upper_limit=spec.max_batch_size_limit,
                floor_bytes=self.floor_bytes,
            )
        else:
            search = LadderSearch(
                capacity_bytes=self.capacity_bytes,
                upper_limit=spec.max_batch_size_limit,
                floor_bytes=self.floor_bytes,
            )
        seeded_max = self.seed.max_batch_size if self.seed is not None else None
        confirming: dict[int, TrialRecord] = {}
        try:
            for _ in range(MAX_CONFIRMATION_ROUNDS):
                while (size := search.next_size()) is not None:
                    speculative = self.confirm and (len(search.trials) >= 2 or size == seeded_max)
                    steps = spec.confirm_optimizer_steps if speculative else spec.trial_optimizer_steps
                    trial = self._trial(size, steps, "search", fresh=speculative, confirming=speculative)
                    if speculative and trial.outcome is Outcome.FIT:
                        confirming[size] = trial
                    search.record(trial)
                best = search.max_batch_size
                if best is None or search.aborted_reason is not None:
                    return search, None
                if not self.confirm:
                    return search, _last_fit(search.trials, best)
                if best in confirming:
                    return search, confirming[best]
                confirmation = self._trial(
                    best, spec.confirm_optimizer_steps, "confirm", fresh=True, confirming=True
                )
                if confirmation.outcome is Outcome.FIT:
                    return search, confirmation
                search.reject(best, confirmation)
                if confirmation.outcome not in (Outcome.OOM, Outcome.OVER_HEADROOM):
                    return search, None
            return search, None
        finally:
            if self.child is not None:
                self.child.close()
                self.child = None


def _last_fit(trials: tuple[TrialRecord, ...], batch_size: int) -> TrialRecord:
    return next(t for t in reversed(trials) if t.batch_size == batch_size and t.outcome is Outcome.FIT)


def _config_result(
    spec: ProbeSpec,
    precision: Precision,
    checkpointing: bool,
    strategy: Strategy,
    search: LadderSearch | SeededSearch,
    backing: TrialRecord | None,
    trials: list[TrialRecord],
    *,
    confirmed: bool,
    capacity_bytes: int | None,
    floor_bytes: int | None = None,
    seeding: Seeding | None = None,
    confirmation: Confirmation | None = None,
) -> ConfigResult:
    common = {
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "strategy": strategy,
        "trials": tuple(trials),
        "first_failing_batch_size": search.first_failing_batch_size,
        "warnings": _fp16_warnings(trials) + single_rank_warning(strategy, spec.world_size),
        "seeding": seeding,
    }
    if search.aborted_reason is not None:
        return ConfigResult(status=ConfigStatus.FAILED, reason=search.aborted_reason, **common)
    best = search.max_batch_size
    if best is None:
        need = min_batch_need(trials, capacity_bytes, floor_bytes)
        return ConfigResult(
            status=ConfigStatus.OK,
            reason=need.sentence,
            min_batch_needs_bytes=need.bytes,
            min_batch_need_is_lower_bound=need.lower_bound,
            **common,
        )
    if backing is None:
        last = trials[-1]
        return ConfigResult(
            status=ConfigStatus.FAILED,
            reason=f"the confirmation run at batch size {last.batch_size} failed: {last.outcome.value}"
            + (f" ({last.message})" if last.message else ""),
            **common,
        )
    samples_per_second = tokens_per_second = None
    if backing.step_seconds:
        samples_per_second = best * spec.trial_accumulation_steps / backing.step_seconds
        tokens_per_second = samples_per_second * spec.seq_len
    return ConfigResult(
        status=ConfigStatus.OK,
        max_batch_size=best,
        peak_memory_bytes=backing.peak_bytes,
        samples_per_second=samples_per_second,
        tokens_per_second=tokens_per_second,
        confirmed=confirmed,
        confirmation=confirmation,
        plan=make_plan(
            max_batch_size=best, target=spec.target_effective_batch_size, world_size=spec.world_size
        ),
        **common,
    )


def _predict_seed(
    spec: ProbeSpec, task: ConfigTask, capacity: int, cancel: threading.Event | None
) -> tuple[PredictedBracket | None, Seeding]:
    """``predict``'s bracket for ``task`` at the device's ``capacity``, from its curve (a CPU child)."""
    predict_task = task.model_copy(
        update={"device": "predict", "memory_limit_bytes": capacity, "headroom_bytes": 0, "gpu": None}
    )
    reply = request_curve(spec, predict_task, cancel, require_depth_extrapolation=False)
    seeding = Seeding(
        predicted_max_batch_size=reply.max_batch_size,
        predicted_first_failing_batch_size=reply.first_failing_batch_size,
        predict_trials=reply.trials,
        reason=reply.reason if not reply.has_bracket else None,
    )
    if not reply.has_bracket:
        return None, seeding
    try:
        return PredictedBracket(reply.max_batch_size, reply.first_failing_batch_size), seeding
    except ValueError as exc:
        return None, seeding.model_copy(update={"reason": f"unusable prediction: {exc}"})


def _search_config(
    spec: ProbeSpec,
    task: ConfigTask,
    context: InfoReply,
    emit: Callable[[EventKind, TrialRecord | None, ConfigResult | None, Phase | None], None],
    stop: threading.Event,
    memo: TrialMemo | None = None,
    *,
    depth_extrapolation: bool = True,
    prefetched_seed: Future[tuple[PredictedBracket | None, Seeding]] | None = None,
) -> ConfigResult:
    """One config that is not skipped: seeded by ``predict`` where asked, searched, confirmed.

    ``prefetched_seed``: the prediction already under way (:class:`SeedPrefetch`); without it a
    seeded config asks ``predict`` itself, just before its first trial on the device.

    On ``predict`` a deep model is first answered from its base depths (``probes.deep_predict``);
    where that does not apply, the search runs at full depth and the result says why.
    """
    device = context.device
    depth_note: DepthExtrapolation | None = None
    if device.predicted and depth_extrapolation:
        attempt = answer_from_depths(spec, task, context, stop)
        if isinstance(attempt, DepthAnswer):
            for trial in attempt.trials:
                emit(EventKind.TRIAL, trial, None, "search")
            return depth_result(
                spec,
                task,
                attempt,
                lambda trials: _fp16_warnings(trials) + single_rank_warning(task.strategy, spec.world_size),
                floor_bytes=_memory_floor(spec, task.precision, task.strategy, context) or None,
            )
        depth_note = attempt
    capacity = device.capacity_bytes  # the device computed it, in the child
    confirm = not device.predicted
    seed: PredictedBracket | None = None
    seeding: Seeding | None = None
    if prefetched_seed is not None:
        seed, seeding = prefetched_seed.result()
    elif spec.predict_seeding and not device.predicted and capacity is not None:
        seed, seeding = _predict_seed(spec, task, capacity, stop)
    floor = _memory_floor(spec, task.precision, task.strategy, context)
    plan = confirmation_plan(spec, device.kind) if confirm else None
    run = ConfigRun(
        spec=spec,
        task=task,
        capacity_bytes=capacity,
        emit=emit,
        cancel=stop,
        confirm=confirm,
        floor_bytes=floor or None,
        seed=seed,
        memo=memo,
        confirmation=plan,
    )
    search, backing = run.run()
    report = None
    if plan is not None and backing is not None:
        report = confirmation_report(plan, backing, run.all_trials, device.kind)
    if seeding is not None:
        right = search.prediction_right if isinstance(search, SeededSearch) else None
        seeding = seeding.model_copy(update={"device_trials": len(run.all_trials), "prediction_right": right})
    result = _config_result(
        spec,
        task.precision,
        task.gradient_checkpointing,
        task.strategy,
        search,
        backing,
        run.all_trials,
        confirmed=confirm,
        capacity_bytes=capacity,
        floor_bytes=floor,
        seeding=seeding,
        confirmation=report,
    )
    return result if depth_note is None else result.model_copy(update={"depth_extrapolation": depth_note})


def prefetches_seeds(device: DeviceInfo) -> bool:
    """Whether the predictions that seed the searches start together, before the first device trial:
    on ``cuda``, where configs run one at a time, so the CPU predicts the later configs while the
    GPU measures the first (on ``simulated`` the configs already use both cores)."""
    return device.kind == "cuda"


class SeedPrefetch:
    """Every seeded config's ``predict`` run (:func:`_predict_seed`), started at once on a pool of
    CPU workers (one per core, two at most), so that no config holds the GPU idle while its
    prediction is made. Empty where :func:`prefetches_seeds` says no."""

    def __init__(
        self,
        spec: ProbeSpec,
        configs: list[tuple[Precision, bool, Strategy]],
        context: InfoReply,
        stop: threading.Event,
        *,
        allow_remote_code: bool,
    ) -> None:
        self.futures: dict[int, Future[tuple[PredictedBracket | None, Seeding]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        capacity = context.device.capacity_bytes
        if not spec.predict_seeding or not prefetches_seeds(context.device) or capacity is None:
            return
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(2, os.cpu_count() or 1)), thread_name_prefix="seed"
        )
        for index, (precision, checkpointing, strategy) in enumerate(configs):
            if _skip_reason(spec, precision, strategy, context) is None:
                task = ConfigTask.for_config(
                    spec, precision, checkpointing, strategy, allow_remote_code=allow_remote_code
                )
                self.futures[index] = self._pool.submit(_predict_seed, spec, task, capacity, stop)

    def close(self) -> None:
        """Drop the predictions not started; wait for the running ones (``stop`` ends their children)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _inspect(task: ConfigTask, cancel: threading.Event | None) -> InfoReply:
    """What a first child learns: the device, the versions, the model, the transformers API."""
    child = TrialChild(task, cancel=cancel)
    try:
        return info_from_reply(child.request(InfoRequest(), timeout_seconds=_INFO_TIMEOUT_SECONDS))
    finally:
        child.close()


def concurrent_configs(device: DeviceInfo) -> int:
    """How many configs run at once: one on a GPU (trials must not share it), else one per core
    (two at most: each config's child runs one intra-op thread, and the counted bytes are the
    same whatever runs beside it)."""
    if device.kind == "cuda":
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _refuse_elsewhere(spec: ProbeSpec) -> None:
    """A request this function does not run: fleet placement, a comparison of cards."""
    if spec.cards:
        raise ProbeInputError("a request that compares cards runs through probes.cards.run_request")
    if spec.device == FLEET_DEVICE:
        raise DeviceUnavailable(
            "device 'gpu' (with gpu_type) asks a maxbatch service to place the probe on a kind of GPU; "
            "to run it on this machine, name the GPU: cuda:N"
        )


def run_probe(
    spec: ProbeSpec,
    *,
    on_event: EventSink | None = None,
    cancel: threading.Event | None = None,
    allow_remote_code: bool = False,
    max_concurrent_configs: int | None = None,
    trial_memo: TrialMemo | None = None,
    depth_extrapolation: bool = True,
) -> ProbeResult:
    """Probe every config of ``spec``; raises :mod:`probes.errors` for bad input.

    ``depth_extrapolation`` off makes ``predict`` search every config at full depth (the tests
    compare the two).

    Configs run :func:`concurrent_configs` at a time unless ``max_concurrent_configs`` lowers it.

    ``on_event`` is called for every config start, trial and config end, one call at a time (from
    the engine's worker threads when configs run concurrently; each event names its config).
    Setting ``cancel`` kills the running children and raises :class:`probes.isolate.ProbeCancelled`.
    On ``predict`` the answer is not re-run in a fresh process: fake tensors give the same bytes
    every time, so a confirmation would only repeat the search's trial (``confirmed`` stays false).
    ``trial_memo`` lends fits between the cards of a multi-card request (:mod:`probes.cards` runs
    those, one ``run_probe`` per card; a spec with a list of cards is refused here).
    """
    _refuse_elsewhere(spec)
    started = time.monotonic()
    configs = spec.configs()
    first = ConfigTask.for_config(spec, *configs[0], allow_remote_code=allow_remote_code)
    context = _inspect(first, cancel)
    device = context.device
    stop = threading.Event()
    event_lock = threading.Lock()
    prefetch = SeedPrefetch(spec, configs, context, stop, allow_remote_code=allow_remote_code)

    def probe_config(
        index: int, precision: Precision, checkpointing: bool, strategy: Strategy
    ) -> ConfigResult:
        def emit(
            kind: EventKind, trial: TrialRecord | None, config: ConfigResult | None, phase: Phase | None
        ) -> None:
            if on_event is None:
                return
            event = ProbeEvent(
                kind=kind,
                precision=precision,
                gradient_checkpointing=checkpointing,
                strategy=strategy,
                config_index=index,
                config_count=len(configs),
                trial=trial,
                config=config,
                phase=phase,
            )
            with event_lock:
                on_event(event)

        emit(EventKind.CONFIG_STARTED, None, None, None)
        skip = _skip_reason(spec, precision, strategy, context)
        if skip is not None:
            result = ConfigResult(
                precision=precision,
                gradient_checkpointing=checkpointing,
                strategy=strategy,
                status=ConfigStatus.SKIPPED,
                reason=skip,
            )
        else:
            task = ConfigTask.for_config(
                spec, precision, checkpointing, strategy, allow_remote_code=allow_remote_code
            )
            result = _search_config(
                spec,
                task,
                context,
                emit,
                stop,
                trial_memo,
                depth_extrapolation=depth_extrapolation,
                prefetched_seed=prefetch.futures.get(index),
            )
        emit(EventKind.CONFIG_DONE, None, result, None)
        return result

    workers = min(concurrent_configs(device), max_concurrent_configs or len(configs))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="probe") as pool:
        futures = [pool.submit(probe_config, i, p, c, s) for i, (p, c, s) in enumerate(configs)]
        try:
            while not all(f.done() for f in futures):
                if cancel is not None and cancel.is_set():
                    stop.set()
                if any(f.done() and f.exception() is not None for f in futures):
                    stop.set()  # one config failed unexpectedly: end the others' children too
                wait(futures, timeout=0.1)
        finally:
            if stop.is_set():
                for future in futures:
                    future.cancel()
            prefetch.close()
        errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
        real = [e for e in errors if not isinstance(e, ProbeCancelled)]
        if real:
            raise real[0]
        if errors or (cancel is not None and cancel.is_set()):
            raise ProbeCancelled("the probe was cancelled")
        results = explain_shortfalls([f.result() for f in futures], sync_each_batch=spec.sync_each_batch)

    return ProbeResult(
        spec=spec,
        device=device,
        configs=tuple(results),
        recommendation=recommend(
            results,
            spec=spec,
            device=device,
            support=context.training_args,
            model=context.model,
            finetuning=context.finetuning,
        ),
        versions=context.versions,
        elapsed_seconds=round(time.monotonic() - started, 3),
        timing_note=None
        if device.timings_are_gpu_times
        else f"times were measured on the {device.kind} device's CPU, not on a GPU: compare them "
        "with each other only",
    )
