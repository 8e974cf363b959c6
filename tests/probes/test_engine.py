"""The whole probe on the simulated device: every config, the exhaustive-search check, isolation.

These run real trials in child processes on tiny models (2 layers, 64 wide, vocabulary 1000)
under a 64 MiB cap, so that a config's search finishes in a few seconds on two cores.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from probes import engine
from probes.engine import ConfigRun, run_probe
from probes.isolate import ChildDied, ProbeCancelled, trial_child, trial_from_reply
from probes.protocol import TrialReply, TrialRequest
from probes.search import ladder_next
from probes.spec import (
    ConfigStatus,
    ConfigTask,
    EventKind,
    ModelSpec,
    Outcome,
    Precision,
    ProbeEvent,
    ProbeResult,
    ProbeSpec,
    TrialRecord,
)

TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    },
}
CAP = 64 * 2**20


def tiny_spec(architecture: str, **fields: object) -> ProbeSpec:
    base: dict[str, object] = {
        "model": ModelSpec(architecture=architecture, config=TINY[architecture]),
        "seq_len": 128,
        "target_effective_batch_size": 256,
        "device": "simulated",
        "memory_limit_bytes": CAP,
    }
    base.update(fields)
    return ProbeSpec.model_validate(base)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def full_run(request: pytest.FixtureRequest) -> tuple[ProbeResult, list[ProbeEvent]]:
    events: list[ProbeEvent] = []
    result = run_probe(tiny_spec(request.param), on_event=events.append)
    return result, events


def test_every_config_comes_back_with_a_confirmed_bracket(
    full_run: tuple[ProbeResult, list[ProbeEvent]],
) -> None:
    result, _ = full_run
    assert [
        (c.precision, c.gradient_checkpointing, c.strategy) for c in result.configs
    ] == result.spec.configs()
    assert len(result.configs) == 8
    for config in result.configs:
        assert config.status is ConfigStatus.OK, config.reason
        assert config.max_batch_size is not None
        assert config.confirmed
        # Equal to exhaustive ladder search (fit is monotone): the answer fits, the next rung fails.
        assert config.first_failing_batch_size == ladder_next(config.max_batch_size)
        outcomes = {(t.batch_size, t.outcome) for t in config.trials}
        assert (config.max_batch_size, Outcome.FIT) in outcomes
        assert (config.first_failing_batch_size, Outcome.OOM) in outcomes
        assert config.peak_memory_bytes is not None
        assert config.peak_memory_bytes <= CAP
        assert config.plan is not None
        assert config.plan.per_device_train_batch_size <= config.max_batch_size


def test_memory_saving_settings_raise_the_max(full_run: tuple[ProbeResult, list[ProbeEvent]]) -> None:
    result, _ = full_run
    best = {(c.precision, c.gradient_checkpointing): c.max_batch_size or 0 for c in result.configs}
    for precision in Precision:
        assert best[precision, True] > best[precision, False]
    for checkpointing in (False, True):
        assert best[Precision.BF16_TRUE, checkpointing] >= best[Precision.FP32, checkpointing]


def test_search_is_cheap(full_run: tuple[ProbeResult, list[ProbeEvent]]) -> None:
    result, _ = full_run
    trials = [len(c.trials) for c in result.configs]  # the confirmation included
    ooms = [sum(t.outcome is Outcome.OOM for t in c.trials) for c in result.configs]
    assert sum(trials) / len(trials) <= 5
    assert sum(ooms) / len(ooms) <= 1


def test_events_tell_the_whole_story(full_run: tuple[ProbeResult, list[ProbeEvent]]) -> None:
    result, events = full_run
    started = [e for e in events if e.kind is EventKind.CONFIG_STARTED]
    done = [e for e in events if e.kind is EventKind.CONFIG_DONE]
    trials = [e for e in events if e.kind is EventKind.TRIAL]
    assert len(started) == len(done) == 8
    # Configs may run concurrently: events interleave, but each names its config.
    assert [e.config for e in sorted(done, key=lambda e: e.config_index)] == list(result.configs)
    for event in trials:
        assert result.spec.configs()[event.config_index] == (
            event.precision,
            event.gradient_checkpointing,
            event.strategy,
        )
    assert len(trials) == sum(len(c.trials) for c in result.configs)
    assert {e.phase for e in trials} <= {"search", "confirm"}
    for config in result.configs:
        # The answer is backed by a fresh-process run of the confirmation's length: a separate
        # confirmation, or a search trial that ran as one.
        assert any(
            t.batch_size == config.max_batch_size
            and t.outcome is Outcome.FIT
            and t.optimizer_steps >= result.spec.confirm_optimizer_steps
            for t in config.trials
        )


def test_recommendation_is_a_planned_config(full_run: tuple[ProbeResult, list[ProbeEvent]]) -> None:
    result, _ = full_run
    rec = result.recommendation
    assert rec is not None
    chosen = next(
        c
        for c in result.configs
        if (c.precision, c.gradient_checkpointing) == (rec.precision, rec.gradient_checkpointing)
    )
    assert chosen.plan == rec.plan
    assert rec.training_arguments["per_device_train_batch_size"] == rec.plan.per_device_train_batch_size
    assert result.timing_note is not None


def _without_timings(result: ProbeResult) -> dict[str, object]:
    data = result.model_dump(mode="json", exclude={"elapsed_seconds"})
    for config in data["configs"]:
        config.pop("samples_per_second")
        config.pop("tokens_per_second")
        for trial in config["trials"]:
            trial.pop("step_seconds")
    return data


def test_two_runs_are_identical_apart_from_timings() -> None:
    spec = tiny_spec("gpt2", precisions=["32-true"], gradient_checkpointing=[True])
    first, second = run_probe(spec), run_probe(spec)
    assert _without_timings(first) == _without_timings(second)


def test_exhaustive_ladder_sweep_agrees() -> None:
    """Run every rung up to two past the answer in one child: the answer is the largest that fits."""
    spec = tiny_spec("gpt2", precisions=["32-true"], gradient_checkpointing=[False])
    searched = run_probe(spec).configs[0]
    assert searched.max_batch_size is not None
    fits: dict[int, bool] = {}
    size = 1
    while size <= ladder_next(ladder_next(searched.max_batch_size)):
        with trial_child(ConfigTask.for_config(spec, Precision.FP32, False)) as child:
            reply = child.request(
                TrialRequest(
                    batch_size=size,
                    accumulation_steps=spec.trial_accumulation_steps,
                    optimizer_steps=spec.trial_optimizer_steps,
                ),
                timeout_seconds=120,
            )
        trial, _ = trial_from_reply(size, reply)
        fits[size] = trial.outcome is Outcome.FIT
        size = ladder_next(size)
    assert max(s for s, ok in fits.items() if ok) == searched.max_batch_size
    assert all(fits[s] == (s <= searched.max_batch_size) for s in fits)


def test_a_hung_trial_becomes_a_timeout_not_a_hang() -> None:
    spec = tiny_spec(
        "gpt2", precisions=["32-true"], gradient_checkpointing=[False], trial_timeout_seconds=0.01
    )
    config = run_probe(spec).configs[0]
    assert config.status is ConfigStatus.FAILED
    assert config.trials[-1].outcome is Outcome.TIMEOUT
    assert config.reason is not None
    assert "timeout" in config.reason


def _trial_children() -> list[int]:
    server = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds trial children through /proc")
def test_a_killed_child_is_retried_once_in_a_fresh_child() -> None:
    """A child that dies without reporting says nothing about the batch size: run it again once."""
    killed: list[int] = []

    def kill_after_first_trial(event: ProbeEvent) -> None:
        if event.kind is EventKind.TRIAL and event.config_index == 0 and not killed:
            for pid in _trial_children():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    # the ordinary search (its second trial, at 2, fits); seeded, the killed trial is the size after
    # the predicted max, whose retry runs out of memory as it should
    spec = tiny_spec(
        "gpt2", precisions=["32-true"], gradient_checkpointing=[False, True], predict_seeding=False
    )
    result = run_probe(spec, on_event=kill_after_first_trial, max_concurrent_configs=1)
    assert killed
    retried, other = result.configs
    crashes = [t for t in retried.trials if t.outcome is Outcome.CRASH]
    assert len(crashes) == 1
    assert crashes[0].message is not None
    assert "SIGKILL" in crashes[0].message
    after = retried.trials[retried.trials.index(crashes[0]) + 1]
    assert after.batch_size == crashes[0].batch_size
    assert after.outcome is Outcome.FIT
    assert retried.status is ConfigStatus.OK
    assert retried.max_batch_size is not None
    assert retried.confirmed
    assert other.status is ConfigStatus.OK
    assert other.confirmed


class ScriptedChild:
    """Stands in for a trial child: answers trials from a script (``None``: the child died)."""

    script: ClassVar[list[Outcome | None]] = []
    started: ClassVar[int] = 0

    def __init__(self, task: ConfigTask, *, cancel: threading.Event | None = None) -> None:
        type(self).started += 1

    def request(self, message: TrialRequest, *, timeout_seconds: float) -> TrialReply | ChildDied:
        outcome = type(self).script.pop(0)
        if outcome is None:
            return ChildDied(Outcome.CRASH, "the child process exited with code 255 without reporting")
        trial = TrialRecord(batch_size=message.batch_size, outcome=outcome, peak_allocated_bytes=1)
        return TrialReply(trial=trial)

    def close(self) -> None:
        return None


def _config_run(monkeypatch: pytest.MonkeyPatch, script: list[Outcome | None]) -> ConfigRun:
    monkeypatch.setattr(engine, "TrialChild", ScriptedChild)
    ScriptedChild.script = list(script)
    ScriptedChild.started = 0
    spec = tiny_spec("gpt2", precisions=["32-true"], gradient_checkpointing=[False])
    task = ConfigTask.for_config(spec, Precision.FP32, False)
    return ConfigRun(
        spec=spec, task=task, capacity_bytes=None, emit=lambda *_: None, cancel=None, confirm=False
    )


def test_a_crash_then_a_fit_is_a_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _config_run(monkeypatch, [None, Outcome.OOM])
    search, _ = run.run()
    assert [t.outcome for t in run.all_trials] == [Outcome.CRASH, Outcome.OOM]
    assert ScriptedChild.started == 2  # the retry ran in a fresh child
    assert search.aborted_reason is None
    assert search.max_batch_size is None  # batch size 1 did not fit: an answer, not a failure


def test_two_crashes_in_a_row_fail_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _config_run(monkeypatch, [Outcome.FIT, None, None])
    search, _ = run.run()
    assert [t.outcome for t in run.all_trials] == [Outcome.FIT, Outcome.CRASH, Outcome.CRASH]
    assert search.aborted_reason is not None
    assert "crash" in search.aborted_reason


def test_cancel_stops_every_running_config() -> None:
    cancel = threading.Event()

    def cancel_on_third_trial(event: ProbeEvent, seen: list[ProbeEvent] = []) -> None:  # noqa: B006
        if event.kind is EventKind.TRIAL:
            seen.append(event)
            if len(seen) == 3:
                cancel.set()

    spec = tiny_spec("gpt2", precisions=["32-true"], gradient_checkpointing=[False, True])
    with pytest.raises(ProbeCancelled):
        run_probe(spec, on_event=cancel_on_third_trial, cancel=cancel)
    deadline = time.monotonic() + 10
    while _trial_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _trial_children() == []


@pytest.mark.slow  # 4 configs probed twice, with and without seeding
def test_predict_seeding_confirms_the_prediction_with_two_trials_and_the_same_answers() -> None:
    spec = tiny_spec("llama", precisions=["32-true", "bf16-mixed"])
    seeded = run_probe(spec)
    plain = run_probe(spec.model_copy(update={"predict_seeding": False}))
    for with_seed, without in zip(seeded.configs, plain.configs, strict=True):
        assert (with_seed.max_batch_size, with_seed.first_failing_batch_size) == (
            without.max_batch_size,
            without.first_failing_batch_size,
        )
        assert without.seeding is None
        seeding = with_seed.seeding
        assert seeding is not None
        assert seeding.reason is None
        assert (seeding.predicted_max_batch_size, seeding.predicted_first_failing_batch_size) == (
            with_seed.max_batch_size,
            with_seed.first_failing_batch_size,
        )
        assert seeding.prediction_right is True
        assert seeding.predict_trials >= 2
        # the predicted max ran as the confirmation (fresh child, its length), then the next size
        assert seeding.device_trials == len(with_seed.trials) == 2
        first, second = with_seed.trials
        assert (first.batch_size, first.outcome) == (with_seed.max_batch_size, Outcome.FIT)
        assert first.optimizer_steps >= spec.confirm_optimizer_steps
        assert second.outcome is not Outcome.FIT
        assert with_seed.confirmed
    assert sum(len(c.trials) for c in seeded.configs) < sum(len(c.trials) for c in plain.configs)


def test_on_a_gpu_every_prediction_starts_before_the_first_config_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cuda runs one config at a time: the later configs' predictions run on the CPU meanwhile.
    The simulated device stands for cuda here (``prefetches_seeds``), one config at a time."""
    spec = tiny_spec("gpt2", precisions=["32-true"], gradient_checkpointing=[False, True])
    inline = run_probe(spec, max_concurrent_configs=1)
    started: list[tuple[float, str]] = []
    real_seed = engine._predict_seed

    def timed_seed(*args: object, **kwargs: object) -> object:
        started.append((time.monotonic(), threading.current_thread().name))
        return real_seed(*args, **kwargs)  # type: ignore[arg-type]

    done: list[float] = []

    def on_event(event: ProbeEvent) -> None:
        if event.kind is EventKind.CONFIG_DONE:
            done.append(time.monotonic())

    monkeypatch.setattr(engine, "prefetches_seeds", lambda device: device.kind in ("cuda", "simulated"))
    monkeypatch.setattr(engine, "_predict_seed", timed_seed)
    prefetched = run_probe(spec, max_concurrent_configs=1, on_event=on_event)
    assert len(started) == 2
    assert all(name.startswith("seed") for _, name in started)
    assert max(at for at, _ in started) < min(done)
    for a, b in zip(inline.configs, prefetched.configs, strict=True):
        assert (a.max_batch_size, a.first_failing_batch_size, a.peak_memory_bytes) == (
            b.max_batch_size,
            b.first_failing_batch_size,
            b.peak_memory_bytes,
        )
        assert a.seeding is not None
        assert b.seeding is not None
        assert a.seeding.model_dump() == b.seeding.model_dump()


def test_a_prediction_that_cannot_be_made_leaves_the_ordinary_search() -> None:
    spec = tiny_spec(
        "gpt2", precisions=["32-true"], gradient_checkpointing=[False], trial_timeout_seconds=0.01
    )
    config = run_probe(spec).configs[0]
    assert config.seeding is not None
    assert config.seeding.prediction_right is None
    assert config.seeding.reason is not None
    assert "timeout" in config.seeding.reason
