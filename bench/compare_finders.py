"""Side by side: maxbatch's search against Lightning's and Accelerate's batch-size finders.

For every case (model shape × sequence length × precision × checkpointing) under one memory cap:

- ``maxbatch``: the real engine path, :func:`probes.engine.run_probe` with one config per spec
  (its inspection child, search, fresh-process confirmation); trials and OOMs are counted from the
  result's trials, the confirmation included;
- ``lightning-power`` / ``lightning-binsearch``: ``Tuner(trainer).scale_batch_size(model, mode=...)``
  with Lightning's defaults;
- ``accelerate-128`` / ``accelerate-<N>``: ``find_executable_batch_size`` with its default start (128)
  and with a start a user would pick;
- ``exhaustive``: the ground truth, every ladder size from 1 up to the first failure, each in a
  fresh :class:`~probes.isolate.TrialChild`.

Each anchor runs in a fresh process per case (see :mod:`bench._anchors`: same model, same precision
and checkpointing, same ``seq_len``, the same cap enforced by the same counting mode). Every size a
finder returns is then soaked: 20 optimizer steps with accumulation 2 in a fresh trial child under
the same cap. Sizes are soaked from the largest down; once one passes, the smaller ones of that case
pass by monotonicity and are marked "implied" (``--full-soak`` soaks each).

Run from the repository root::

    .venv/bin/python -m bench.compare_finders                 # CPU: simulated device, 24 cases
    .venv/bin/python -m bench.compare_finders --profile quick # one model, one length (a smoke run)
    python -m bench.compare_finders --profile cuda            # a ~1B Llama on cuda:0

It prints a markdown report and writes it, with the raw figures as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._anchors import AnchorJob, AnchorResult, Finder, child_main, preload
from bench._search_replay import VARIANTS, replay
from bench.gpu_check import LLAMA_1B as GPU_CHECK_LLAMA_1B
from probes.engine import ConfigRun, run_probe
from probes.isolate import ProbeCancelled, TrialChild, info_from_reply, trial_from_reply
from probes.protocol import InfoRequest, TrialRequest
from probes.search import ladder_next
from probes.spec import (
    ConfigTask,
    EventKind,
    ModelSpec,
    Outcome,
    Precision,
    ProbeEvent,
    ProbeSpec,
    TrialRecord,
)
from probes.units import format_bytes, parse_bytes

MiB = 2**20
GiB = 2**30

SOAK_OPTIMIZER_STEPS = 20
ACCUMULATION_STEPS = 2
TRIAL_OPTIMIZER_STEPS = 2
"""The engine's default trial length (``ProbeSpec.trial_optimizer_steps``); the truth uses it too."""

BASELINE = "lightning-binsearch"
"""The finder whose wall time the others are compared to."""

TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": (
        "gpt2",
        {
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 2,
            "vocab_size": 1000,
            "n_positions": 512,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    "llama": (
        "llama",
        {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
            "max_position_embeddings": 512,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
    "qwen2": (
        "qwen2",
        {
            "num_hidden_layers": 2,
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
            "max_position_embeddings": 512,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
}
"""Tiny shapes for the CPU run: 2 layers, hidden 64–128, vocab 1000."""

LLAMA_1B: tuple[str, dict[str, Any]] = ("llama", GPU_CHECK_LLAMA_1B)
"""A ~0.85B-parameter Llama (TinyLlama's widths, 16 layers) for the GPU run."""


@dataclass(frozen=True)
class Profile:
    """A set of cases and the settings they run under."""

    models: dict[str, tuple[str, dict[str, Any]]]
    seq_lens: tuple[int, ...]
    precisions: tuple[Precision, ...]
    checkpointing: tuple[bool, ...]
    device: str
    memory_limit_bytes: int
    user_start: int
    finder_timeout_seconds: float
    #: the finders in the order they run (the time-boxed GPU run puts the baseline early)
    finders: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        models=TINY_MODELS,
        seq_lens=(64, 128),
        precisions=(Precision.FP32, Precision.BF16_MIXED),
        checkpointing=(False, True),
        device="simulated",
        memory_limit_bytes=40 * MiB,
        user_start=64,
        finder_timeout_seconds=300.0,
    ),
    "quick": Profile(
        models={"llama": TINY_MODELS["llama"]},
        seq_lens=(64,),
        precisions=(Precision.FP32,),
        checkpointing=(False, True),
        device="simulated",
        memory_limit_bytes=32 * MiB,
        user_start=32,
        finder_timeout_seconds=120.0,
    ),
    "cuda": Profile(
        models={"llama-1b": LLAMA_1B},
        seq_lens=(2048,),
        precisions=(Precision.BF16_MIXED, Precision.FP32),
        checkpointing=(True, False),
        device="cuda:0",
        memory_limit_bytes=24 * GiB,
        user_start=16,
        finder_timeout_seconds=240.0,
        finders=(
            "maxbatch",
            "lightning-binsearch",
            "lightning-power",
            "accelerate-128",
            "accelerate-user",
            "exhaustive",
            "maxbatch-proto",
            "maxbatch-proto2",
        ),
    ),
}


@dataclass(frozen=True)
class Case:
    model: str
    architecture: str
    config: dict[str, Any]
    seq_len: int
    precision: Precision
    checkpointing: bool
    device: str
    memory_limit_bytes: int

    @property
    def label(self) -> str:
        checkpointing = "ckpt" if self.checkpointing else "no-ckpt"
        return f"{self.model} s{self.seq_len} {self.precision.value} {checkpointing}"

    def task(self) -> ConfigTask:
        return ConfigTask(
            model=ModelSpec(architecture=self.architecture, config=self.config),
            seq_len=self.seq_len,
            precision=self.precision,
            gradient_checkpointing=self.checkpointing,
            device=self.device,
            memory_limit_bytes=self.memory_limit_bytes,
        )

    def spec(self) -> ProbeSpec:
        return ProbeSpec(
            model=ModelSpec(architecture=self.architecture, config=self.config),
            seq_len=self.seq_len,
            precisions=(self.precision,),
            gradient_checkpointing=(self.checkpointing,),
            target_effective_batch_size=256,
            device=self.device,
            memory_limit_bytes=self.memory_limit_bytes,
        )


@dataclass
class Row:
    """One finder on one case."""

    case: str
    finder: str
    found: int | None = None
    #: the largest size that ran to the end in the finder's own trials
    largest_fit: int | None = None
    trials: int = 0
    ooms: int = 0
    seconds: float | None = None
    setup_seconds: float | None = None
    sizes: list[str] = field(default_factory=list)
    soak: str = "-"
    error: str | None = None
    detail: dict[str, float] = field(default_factory=dict)
    #: wall seconds of each trial, in order (where the finder reports them)
    trial_seconds: list[float] = field(default_factory=list)
    #: exhaustive only: the peak of every ladder size tried (``None``: it failed)
    curve: dict[int, int | None] = field(default_factory=dict)
    #: exhaustive only: the sizes each search variant tries when replayed on ``curve``
    replay: dict[str, list[int]] = field(default_factory=dict)


# -- running the finders ---------------------------------------------------------------------------


def run_maxbatch(case: Case, timeout: float) -> Row:
    """The engine's path: ``run_probe`` with this one config; phases timed from its events."""
    row = Row(case=case.label, finder="maxbatch")
    marks: dict[str, float] = {}
    started = time.perf_counter()
    last = started
    phase_seconds = {"search": 0.0, "confirm": 0.0}

    def on_event(event: ProbeEvent) -> None:
        nonlocal last
        now = time.perf_counter()
        if event.kind is EventKind.CONFIG_STARTED:
            marks["inspect"] = now - started
        elif event.kind is EventKind.TRIAL and event.phase is not None:
            phase_seconds[event.phase] += now - last
            row.trial_seconds.append(round(now - last, 3))
        last = now

    cancel = threading.Event()
    timer = threading.Timer(timeout, cancel.set)
    timer.start()
    try:
        result = run_probe(case.spec(), on_event=on_event, cancel=cancel)
    except ProbeCancelled:
        row.error = f"timed out after {timeout:g} s"
        return row
    except Exception as exc:  # noqa: BLE001 - a failed finder is a row, not the end of the benchmark
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return row
    finally:
        timer.cancel()
    row.seconds = time.perf_counter() - started
    config = result.configs[0]
    row.found = config.max_batch_size
    row.trials = len(config.trials)
    row.ooms = sum(t.outcome in (Outcome.OOM, Outcome.OVER_HEADROOM) for t in config.trials)
    fits = [t.batch_size for t in config.trials if t.outcome is Outcome.FIT]
    row.largest_fit = max(fits) if fits else None
    row.sizes = [_size_mark(t.batch_size, t.outcome is Outcome.FIT) for t in config.trials]
    if config.confirmed:
        row.sizes[-1] += "c"
    if config.reason:
        row.error = config.reason
    row.detail = {"inspect": marks.get("inspect", 0.0), **phase_seconds}
    return row


def run_prototype(case: Case, label: str, confirm_steps: int | None, timeout: float) -> Row:
    """The engine's :class:`~probes.engine.ConfigRun` with one change: no separate inspection child.

    The child that answers ``info`` serves the first trials (``run_probe`` inspects in a child of
    its own). ``confirm_steps`` sets the confirmation length (``maxbatch-proto2``: 2). Trials after
    the first two run in a fresh child at the confirmation's length (marked ``f``), as in the engine.
    """
    row = Row(case=case.label, finder=label)
    spec = case.spec().model_copy(update={"trial_timeout_seconds": timeout})
    if confirm_steps is not None:
        spec = spec.model_copy(update={"confirm_optimizer_steps": confirm_steps})
    task = ConfigTask.for_config(spec, *spec.configs()[0])
    started = time.perf_counter()
    last = started

    def on_trial(_kind: EventKind, trial: TrialRecord | None, _config: object, _phase: object) -> None:
        nonlocal last
        if trial is not None:
            now = time.perf_counter()
            row.trial_seconds.append(round(now - last, 3))
            last = now

    first = TrialChild(task)
    try:
        device = info_from_reply(first.request(InfoRequest(), timeout_seconds=timeout)).device
        last = time.perf_counter()
        run = ConfigRun(
            spec=spec,
            task=task,
            capacity_bytes=device.capacity_bytes,
            emit=on_trial,
            cancel=None,
            child=first,
        )
        search, backing = run.run()
    except Exception as exc:  # noqa: BLE001 - a failed finder is a row, not the end of the benchmark
        first.close()
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return row
    row.seconds = time.perf_counter() - started
    trials = run.all_trials
    row.found = search.max_batch_size if backing is not None else None
    row.trials = len(trials)
    row.ooms = sum(t.outcome in (Outcome.OOM, Outcome.OVER_HEADROOM) for t in trials)
    fits = [t.batch_size for t in trials if t.outcome is Outcome.FIT]
    row.largest_fit = max(fits) if fits else None
    row.sizes = [
        _size_mark(t.batch_size, t.outcome is Outcome.FIT) + ("f" if i >= 2 else "")
        for i, t in enumerate(trials)
    ]
    if search.aborted_reason is not None or (backing is None and search.max_batch_size is not None):
        row.error = search.aborted_reason or f"the confirmation at {search.max_batch_size} failed"
    return row


def _size_mark(size: int, fit: bool) -> str:
    return str(size) if fit else f"{size}x"


def run_anchor(
    case: Case,
    finder: Finder,
    label: str,
    *,
    start: int | None,
    timeout: float,
    start_method: str,
    log_path: Path,
) -> Row:
    """One anchor finder in a fresh process; a hang past ``timeout`` kills it."""
    job = AnchorJob(
        finder=finder,
        task_json=case.task().model_dump_json(),
        start=start,
        accumulation_steps=ACCUMULATION_STEPS,
        optimizer_steps=TRIAL_OPTIMIZER_STEPS,
    )
    row = Row(case=case.label, finder=label)
    ctx = multiprocessing.get_context(start_method)
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=child_main, args=(job, sender, str(log_path)), daemon=True)  # type: ignore[attr-defined]
    process.start()
    sender.close()
    result: AnchorResult | None = None
    try:
        if receiver.poll(timeout):
            result = receiver.recv()
        else:
            row.error = f"timed out after {timeout:g} s"
    except EOFError:
        pass
    finally:
        if process.is_alive():
            process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)
        receiver.close()
    if result is None:
        row.error = row.error or f"the process died (exit code {process.exitcode})"
        return row
    row.found = result.found
    row.trials = len(result.trials)
    row.ooms = sum(t.outcome != "fit" for t in result.trials)
    fits = [t.batch_size for t in result.trials if t.outcome == "fit"]
    row.largest_fit = max(fits) if fits else None
    row.sizes = [_size_mark(t.batch_size, t.outcome == "fit") for t in result.trials]
    row.trial_seconds = [round(t.seconds, 3) for t in result.trials]
    row.seconds = result.seconds if result.error is None else None
    row.setup_seconds = result.setup_seconds
    row.error = result.error
    if result.oom_recognised is False:
        row.error = (row.error or "") + " (the library did not recognise the simulated OOM)"
    row.detail = {"oom_recognised": float(bool(result.oom_recognised))}
    return row


def _trial(
    task: ConfigTask, batch_size: int, optimizer_steps: int, timeout: float
) -> tuple[TrialRecord, float]:
    """One trial in a fresh child; its record and wall seconds (child start and model build included)."""
    started = time.perf_counter()
    child = TrialChild(task)
    try:
        reply = child.request(
            TrialRequest(
                batch_size=batch_size, accumulation_steps=ACCUMULATION_STEPS, optimizer_steps=optimizer_steps
            ),
            timeout_seconds=timeout,
        )
    finally:
        child.close()
    trial, _ = trial_from_reply(batch_size, reply)
    return trial, time.perf_counter() - started


def run_exhaustive(case: Case, *, jobs: int, timeout: float) -> Row:
    """Every ladder size from 1 up to the first failure, each in a fresh child (``jobs`` at a time).

    ``seconds`` is the sum of the trials' own wall times (what one worker would take).
    """
    row = Row(case=case.label, finder="exhaustive")
    task = case.task()
    outcomes: dict[int, Outcome] = {}
    peaks: dict[int, int | None] = {}
    seconds = 0.0
    size = 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            wave = [size]
            while len(wave) < jobs:
                wave.append(ladder_next(wave[-1]))
            results = list(pool.map(lambda n: _trial(task, n, TRIAL_OPTIMIZER_STEPS, timeout), wave))
            for n, (record, took) in zip(wave, results, strict=True):
                outcomes[n] = record.outcome
                peaks[n] = record.peak_bytes
                seconds += took
            failures = [n for n in wave if outcomes[n] is not Outcome.FIT]
            if failures:
                break
            size = ladder_next(wave[-1])
    first_failure = min(n for n, o in outcomes.items() if o is not Outcome.FIT)
    fits = [n for n, o in outcomes.items() if o is Outcome.FIT and n < first_failure]
    bad = outcomes[first_failure]
    if bad not in (Outcome.OOM, Outcome.OVER_HEADROOM):
        row.error = f"the trial at {first_failure} ended in {bad.value}"
    counted = sorted(n for n in outcomes if n <= first_failure)
    row.found = max(fits) if fits else None
    row.largest_fit = row.found
    row.trials = len(counted)
    row.ooms = 1
    row.sizes = [_size_mark(n, outcomes[n] is Outcome.FIT) for n in counted]
    row.seconds = seconds
    row.curve = {n: (peaks[n] if outcomes[n] is Outcome.FIT else None) for n in counted}
    return row


def soak(case: Case, rows: list[Row], *, jobs: int, full: bool, timeout: float) -> None:
    """Soak every size found in this case: 20 optimizer steps, accumulation 2, a fresh child.

    Largest first; unless ``full``, once one size passes the smaller ones are marked as implied.
    """
    task = case.task()
    sizes = sorted({r.found for r in rows if r.found is not None}, reverse=True)
    verdicts: dict[int, str] = {}
    passed: int | None = None
    pending = list(sizes)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending:
            if passed is not None and not full:
                for n in pending:
                    verdicts[n] = f"pass (implied by {passed})"
                break
            wave, pending = pending[:jobs], pending[jobs:]
            results = list(pool.map(lambda n: _trial(task, n, SOAK_OPTIMIZER_STEPS, timeout), wave))
            for n, (record, _) in zip(wave, results, strict=True):
                fit = record.outcome is Outcome.FIT
                verdicts[n] = "pass" if fit else f"FAIL ({record.outcome.value})"
                if fit and passed is None:
                    passed = n
    for row in rows:
        if row.found is not None:
            row.soak = verdicts.get(row.found, "-")


# -- one case --------------------------------------------------------------------------------------


@dataclass
class Settings:
    out: Path
    jobs: int
    full_soak: bool
    start_method: str
    user_start: int
    finder_timeout: float
    available: dict[str, bool]
    finders: tuple[str, ...]
    #: ``time.perf_counter()`` after which no further finder starts (``None``: no budget)
    deadline: float | None = None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


ALL_FINDERS = (
    "maxbatch",
    "maxbatch-proto",
    "maxbatch-proto2",
    "lightning-power",
    "lightning-binsearch",
    "accelerate-128",
    "accelerate-user",
    "exhaustive",
)


def run_finder(case: Case, name: str, settings: Settings) -> Row:
    """One finder (not the exhaustive truth) on ``case``; an absent library is a row saying so."""
    if name == "maxbatch":
        return run_maxbatch(case, settings.finder_timeout)
    if name.startswith("maxbatch-proto"):
        return run_prototype(case, name, 2 if name == "maxbatch-proto2" else None, settings.finder_timeout)
    library = "lightning" if name.startswith("lightning") else "accelerate"
    if not settings.available.get(library):
        return Row(case=case.label, finder=name, error=f"{library} is not installed")
    finder: Finder
    if library == "lightning":
        finder = "lightning-binsearch" if name == "lightning-binsearch" else "lightning-power"
        start, label = None, name
    else:
        finder = "accelerate"
        start = None if name == "accelerate-128" else settings.user_start
        label = "accelerate-128" if start is None else f"accelerate-{start}"
    return run_anchor(
        case,
        finder,
        label,
        start=start,
        timeout=settings.finder_timeout,
        start_method=settings.start_method,
        log_path=settings.out / "anchors.log",
    )


def run_truth(case: Case, settings: Settings) -> Row:
    """The exhaustive ladder and, on the simulated device, every search variant replayed on its curve."""
    try:
        truth = run_exhaustive(case, jobs=settings.jobs, timeout=settings.finder_timeout)
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        return Row(case=case.label, finder="exhaustive", error=f"{type(exc).__name__}: {exc}")
    if truth.error is None and case.device == "simulated":
        for variant, factory in VARIANTS.items():
            truth.replay[variant] = replay(truth.curve, case.memory_limit_bytes, factory)[0]
    return truth


def run_case(
    case: Case, settings: Settings, say: Callable[[str], None], emit: Callable[[list[Row]], None]
) -> list[Row]:
    """Every finder on ``case``, then the soak; ``emit`` sees each row as it is made (for partial reports)."""
    rows = _EmittingList(emit)
    finders = [name for name in settings.finders if name != "exhaustive"]
    if "exhaustive" in settings.finders:
        finders.append("exhaustive")  # the truth runs last
    for name in finders:
        if settings.out_of_time():
            rows.append(Row(case=case.label, finder=name, error="skipped: time budget reached"))
            continue
        say(f"  {name} ...")
        rows.append(run_truth(case, settings) if name == "exhaustive" else run_finder(case, name, settings))
    if settings.out_of_time():
        return rows
    say("  soak ...")
    try:
        soak(case, rows, jobs=settings.jobs, full=settings.full_soak, timeout=settings.finder_timeout)
    except Exception as exc:  # noqa: BLE001
        for row in rows:
            row.soak = f"error: {type(exc).__name__}"
    return rows


class _EmittingList(list[Row]):
    """A list of rows that shows each appended row to a callback (which writes a partial report)."""

    def __init__(self, emit: Callable[[list[Row]], None]) -> None:
        super().__init__()
        self._emit = emit

    def append(self, row: Row) -> None:
        super().append(row)
        self._emit(list(self))


# -- the report ------------------------------------------------------------------------------------


def _truths(rows: Iterable[Row]) -> dict[str, int | None]:
    return {r.case: r.found for r in rows if r.finder == "exhaustive"}


def _versus(found: int | None, truth: int | None) -> str:
    if found is None or truth is None:
        return "-"
    if found == truth:
        return "="
    return f"+{found - truth}" if found > truth else f"-{truth - found}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary_lines(rows: list[Row]) -> list[str]:
    """The headline figures: agreement with the truth, mean trials and OOMs, time against binsearch."""
    truths = _truths(rows)
    baseline = {r.case: r.seconds for r in rows if r.finder == BASELINE and r.seconds}
    finders = list(dict.fromkeys(r.finder for r in rows))
    lines = [
        "| finder | cases | = truth | above | below | mean trials | mean OOMs | total s | "
        f"time ÷ {BASELINE} (total) | (median per case) | soak pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    headline: list[str] = []
    for finder in finders:
        mine = [r for r in rows if r.finder == finder and r.error is None and r.found is not None]
        if not mine:
            lines.append(f"| {finder} | 0 | | | | | | | | | |")
            continue
        versus = [_versus(r.found, truths.get(r.case)) for r in mine]
        equal = versus.count("=")
        above = sum(v.startswith("+") for v in versus)
        below = sum(v.startswith("-") and v != "-" for v in versus)
        trials = statistics.mean(r.trials for r in mine)
        ooms = statistics.mean(r.ooms for r in mine)
        timed = [r for r in mine if r.seconds is not None and baseline.get(r.case)]
        total = sum(r.seconds or 0.0 for r in mine)
        ratio_total = ratio_median = None
        if timed:
            ratio_total = sum(r.seconds or 0.0 for r in timed) / sum(baseline[r.case] or 0.0 for r in timed)
            ratio_median = statistics.median((r.seconds or 0.0) / (baseline[r.case] or 1.0) for r in timed)
        passed = sum(r.soak.startswith("pass") for r in mine)
        lines.append(
            f"| {finder} | {len(mine)} | {equal} | {above} | {below} | {trials:.2f} | {ooms:.2f} | "
            f"{total:.1f} | "
            f"{'-' if ratio_total is None else f'{ratio_total:.2f}'} | "
            f"{'-' if ratio_median is None else f'{ratio_median:.2f}'} | {passed}/{len(mine)} |"
        )
        if finder == "maxbatch":
            cases = len({r.case for r in rows})
            headline.append(
                f"- maxbatch's size equals the exhaustive ladder truth in {equal} of {cases} cases"
                + (" (every case)." if equal == cases else ".")
            )
            headline.append(
                f"- maxbatch: {trials:.2f} trials and {ooms:.2f} OOMs per config on average (confirmation "
                f"included; goal ≤ 5 trials: {'met' if trials <= 5 else 'missed'})."
            )
            if ratio_total is not None and ratio_median is not None:
                headline.append(
                    f"- maxbatch's wall time is {ratio_total:.2f}× Lightning binsearch's in total "
                    f"(median per case {ratio_median:.2f}×; goal ≤ 0.33: "
                    f"{'met' if ratio_total <= 1 / 3 else 'missed'})."
                )
    errors = [r for r in rows if r.error]
    if errors:
        headline.append(f"- {len(errors)} finder runs reported an error (see the full table).")
    return [*headline, "", *lines]


def sizes_table(rows: list[Row]) -> list[str]:
    """One line per case: the size each finder returned, against the truth."""
    finders = [f for f in dict.fromkeys(r.finder for r in rows) if f != "exhaustive"]
    truths = _truths(rows)
    by_key = {(r.case, r.finder): r for r in rows}
    lines = [
        "| case | truth | " + " | ".join(finders) + " |",
        "|---|---|" + "---|" * len(finders),
    ]
    for case in dict.fromkeys(r.case for r in rows):
        cells = []
        for finder in finders:
            row = by_key.get((case, finder))
            if row is None or row.found is None:
                cells.append("err" if row is not None and row.error else "-")
            else:
                versus = _versus(row.found, truths.get(case))
                cells.append(f"{row.found} ({versus})" if versus != "=" else f"{row.found} (=)")
        truth = truths.get(case)
        lines.append(f"| {case} | {'-' if truth is None else truth} | " + " | ".join(cells) + " |")
    return lines


def full_table(rows: list[Row]) -> list[str]:
    truths = _truths(rows)
    baseline = {r.case: r.seconds for r in rows if r.finder == BASELINE and r.seconds}
    lines = [
        f"| case | finder | size | vs truth | trials | OOMs | wall s | ÷ {BASELINE} | soak 20 steps | "
        "sizes tried |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = baseline.get(r.case)
        ratio = f"{r.seconds / base:.2f}" if r.seconds is not None and base else "-"
        sizes = " ".join(r.sizes) if r.sizes else "-"
        if r.error:
            sizes += f" — {r.error}"
        lines.append(
            f"| {r.case} | {r.finder} | {'-' if r.found is None else r.found} | "
            f"{_versus(r.found, truths.get(r.case))} | {r.trials} | {r.ooms} | {_seconds(r.seconds)} | "
            f"{ratio} | "
            f"{r.soak} | {sizes} |"
        )
    return lines


def breakdown_lines(rows: list[Row]) -> list[str]:
    """Where maxbatch's time goes: inspection child, search trials, confirmation."""
    mine = [r for r in rows if r.finder == "maxbatch" and r.seconds]
    if not mine:
        return []
    total = sum(r.seconds or 0.0 for r in mine)
    parts = {k: sum(r.detail.get(k, 0.0) for r in mine) for k in ("inspect", "search", "confirm")}
    other = total - sum(parts.values())
    return [
        f"maxbatch's {total:.1f} s: inspection child {parts['inspect']:.1f} s "
        f"({parts['inspect'] / total:.0%}), search trials {parts['search']:.1f} s "
        f"({parts['search'] / total:.0%}), "
        f"fresh-process confirmation {parts['confirm']:.1f} s ({parts['confirm'] / total:.0%}), "
        f"other {other:.1f} s.",
    ]


def replay_lines(rows: list[Row]) -> list[str]:
    """The search replayed on each case's measured curve: shipped search and variants (search trials only)."""
    truths = [r for r in rows if r.finder == "exhaustive" and r.replay]
    if not truths:
        return []
    engine = {r.case: r for r in rows if r.finder == "maxbatch"}
    variants = list(truths[0].replay)
    lines = [
        "| case | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    totals = dict.fromkeys(variants, 0)
    failures = dict.fromkeys(variants, 0)
    agree = 0
    for truth in truths:
        first_failure = min((n for n, p in truth.curve.items() if p is None), default=None)
        cells = []
        for variant in variants:
            tried = truth.replay[variant]
            totals[variant] += len(tried)
            failures[variant] += sum(first_failure is not None and n >= first_failure for n in tried)
            cells.append(" ".join(str(n) for n in tried) + f" ({len(tried)})")
        mine = engine.get(truth.case)
        if mine is not None:
            searched = [int(s.rstrip("xc")) for s in mine.sizes if not s.endswith("c")]
            agree += searched == truth.replay.get("shipped")
        lines.append(f"| {truth.case} | " + " | ".join(cells) + " |")
    count = len(truths)
    means = ", ".join(
        f"{v}: {totals[v] / count:.2f} search trials + 1 confirmation, {failures[v] / count:.2f} OOMs"
        for v in variants
    )
    return [
        f"Replayed on the {count} measured curves (mean per config) — {means}. The shipped search's replay "
        f"matches the sizes the engine tried in {agree} of {count} cases.",
        "",
        *lines,
    ]


def report(rows: list[Row], meta: dict[str, Any]) -> str:
    out = [
        f"# compare_finders — {meta['profile']} on {meta['device']}",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        f"- memory cap: {meta['memory']}; trials: accumulation {ACCUMULATION_STEPS}; soak: "
        f"{SOAK_OPTIMIZER_STEPS} optimizer steps in a fresh process",
        f"- versions: {meta['versions']}",
        f"- wall: {meta['wall_seconds']:.0f} s for {meta['cases_run']} of {meta['cases_total']} cases"
        + (f"; {meta['note']}" if meta.get("note") else ""),
        "",
        "## Summary",
        "",
        *summary_lines(rows),
        "",
        *breakdown_lines(rows),
        "",
        "## The search replayed on the measured curves",
        "",
        *replay_lines(rows),
        "",
        "## Sizes found (against the exhaustive ladder truth)",
        "",
        *sizes_table(rows),
        "",
        "## Every run",
        "",
        "Sizes tried in order; `x` marks a failure (OOM), `c` maxbatch's fresh-process confirmation.",
        "",
        *full_table(rows),
        "",
    ]
    return "\n".join(out)


# -- the driver ------------------------------------------------------------------------------------


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("torch", "transformers", "lightning", "accelerate"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} absent")
    return ", ".join(parts)


def _machine() -> str:
    cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()} {platform.system()}, {cores} CPU cores, load average {load:.2f} at start"


def cuda_available() -> bool:
    """Whether torch sees a CUDA device, asked in a throwaway process (this one never touches CUDA)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], check=False, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_cases(profile: Profile, args: argparse.Namespace) -> list[Case]:
    models = {k: v for k, v in profile.models.items() if not args.models or k in args.models}
    seq_lens = tuple(args.seq_len) if args.seq_len else profile.seq_lens
    precisions = tuple(Precision(p) for p in args.precision) if args.precision else profile.precisions
    checkpointing = (
        tuple(c == "on" for c in args.checkpointing) if args.checkpointing else profile.checkpointing
    )
    memory = parse_bytes(args.memory) if args.memory else profile.memory_limit_bytes
    device = args.device or profile.device
    return [
        Case(
            model=name,
            architecture=arch,
            config=config,
            seq_len=seq_len,
            precision=precision,
            checkpointing=ckpt,
            device=device,
            memory_limit_bytes=memory,
        )
        for name, (arch, config) in models.items()
        for seq_len in seq_lens
        for precision in precisions
        for ckpt in checkpointing
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: cpu, or cuda")
    parser.add_argument("--device", default=None, help="simulated or cuda:N (default: the profile's)")
    parser.add_argument("--memory", default=None, help="memory cap, e.g. 64MiB (default: the profile's)")
    parser.add_argument("--models", nargs="*", default=None, help="a subset of the profile's models")
    parser.add_argument("--seq-len", nargs="*", type=int, default=None)
    parser.add_argument("--precision", nargs="*", default=None, help="e.g. 32-true bf16-mixed")
    parser.add_argument("--checkpointing", nargs="*", choices=("off", "on"), default=None)
    parser.add_argument("--finders", nargs="*", choices=ALL_FINDERS, default=None)
    parser.add_argument("--user-start", type=int, default=None, help="Accelerate's realistic start")
    parser.add_argument("--jobs", type=int, default=2, help="parallel children for the truth and the soak")
    parser.add_argument("--full-soak", action="store_true", help="soak every size (no implied passes)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later cases are skipped")
    parser.add_argument("--finder-timeout", type=float, default=None, help="seconds per finder run")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default bench/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    requested_cuda = (args.device or "").startswith("cuda") or args.profile == "cuda"
    if requested_cuda and not cuda_available():
        print(
            "compare_finders: no CUDA device is visible to torch here; run the CPU benchmark instead "
            "(python -m bench.compare_finders --profile cpu), or run this on a machine with a GPU.",
            file=sys.stderr,
        )
        return 3
    profile_name = args.profile or ("cuda" if requested_cuda else "cpu")
    profile = PROFILES[profile_name]
    cases = build_cases(profile, args)
    device = cases[0].device if cases else profile.device
    out: Path = args.out or Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_finders-{profile_name}"

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cuda = device.startswith("cuda")
    # CPU: fork anchor processes from this one after importing their libraries (no op has run, no CUDA).
    # CUDA: spawn them, so that no child inherits a driver state.
    available = preload() if not cuda else _installed()
    settings = Settings(
        out=out,
        jobs=max(1, args.jobs),
        full_soak=args.full_soak,
        start_method="spawn" if cuda else "fork",
        user_start=args.user_start or profile.user_start,
        finder_timeout=args.finder_timeout or profile.finder_timeout_seconds,
        available=available,
        finders=tuple(args.finders) if args.finders else (profile.finders or ALL_FINDERS),
        deadline=None if args.time_budget is None else started + args.time_budget,
    )
    meta: dict[str, Any] = {
        "profile": profile_name,
        "device": device,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "command": " ".join(["python -m bench.compare_finders", *(sys.argv[1:] if argv is None else argv)]),
        "memory": format_bytes(cases[0].memory_limit_bytes) if cases else "-",
        "versions": _versions(),
        "cases_total": len(cases),
        "cases_run": 0,
        "wall_seconds": 0.0,
    }
    say(f"compare_finders: {len(cases)} cases on {device}; anchors available: {available}")
    warm = time.perf_counter()
    if cases:
        _trial(cases[0].task(), 1, TRIAL_OPTIMIZER_STEPS, settings.finder_timeout)  # start the forkserver
    meta["forkserver_warmup_seconds"] = round(time.perf_counter() - warm, 2)
    warmup = meta["forkserver_warmup_seconds"]
    meta["note"] = f"the trial forkserver's one-time start ({warmup} s) is not counted"

    rows: list[Row] = []
    for index, case in enumerate(cases):
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            skipped = len(cases) - index
            meta["note"] += f"; time budget of {args.time_budget:g} s reached: {skipped} cases skipped"
            break
        say(f"[{index + 1}/{len(cases)}] {case.label}")

        def emit(case_rows: list[Row]) -> None:
            meta["wall_seconds"] = time.perf_counter() - started
            _write(out, stem, [*rows, *case_rows], meta)

        rows.extend(run_case(case, settings, say, emit))
        meta["cases_run"] = index + 1
        meta["wall_seconds"] = time.perf_counter() - started
        _write(out, stem, rows, meta)
    meta["wall_seconds"] = time.perf_counter() - started
    text = _write(out, stem, rows, meta)
    log = out / "anchors.log"
    if log.exists() and log.stat().st_size == 0:
        log.unlink()  # the libraries said nothing worth keeping
    print(text)
    say(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    return 0


def _installed() -> dict[str, bool]:
    from importlib.util import find_spec

    return {name: find_spec(name) is not None for name in ("lightning", "accelerate")}


def _write(out: Path, stem: str, rows: list[Row], meta: dict[str, Any]) -> str:
    text = report(rows, meta)
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
