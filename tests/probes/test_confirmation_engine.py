"""The confirmation in the engine: the varied lengths run in the confirming child, an out-of-memory
error in one of them sends the search down, and the child runs with the job's allocator settings.

Real trials in child processes on the simulated device (a tiny GPT-2, 64 MiB), as in
``test_engine.py``; the injected error goes through the trial protocol's test seam
(``TrialRequest.oom_at_micro_step``), so the child raises the device's typed out-of-memory error
at that micro-batch and everything after it is the engine's ordinary path.
"""

from __future__ import annotations

import pytest

from probes.confirmation import confirmation_plan
from probes.engine import ConfigRun, run_probe
from probes.protocol import TrialRequest
from probes.search import ladder_next
from probes.spec import ConfigStatus, EventKind, ModelSpec, Outcome, ProbeEvent, ProbeResult, ProbeSpec

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}


def _spec(**fields: object) -> ProbeSpec:
    base: dict[str, object] = {
        "model": ModelSpec(architecture="gpt2", config=TINY_GPT2),
        "seq_len": 128,
        "target_effective_batch_size": 256,
        "device": "simulated",
        "memory_limit_bytes": 64 * 2**20,
        "precisions": ["32-true"],
        "gradient_checkpointing": [False],
        "predict_seeding": False,
    }
    return ProbeSpec.model_validate({**base, **fields})


Plain = tuple[ProbeSpec, list[ProbeEvent], ProbeResult]


@pytest.fixture(scope="module")
def plain() -> Plain:
    spec = _spec()
    events: list[ProbeEvent] = []
    return spec, events, run_probe(spec, on_event=events.append)


def test_the_confirmation_runs_the_varied_lengths_after_the_worst_case(
    plain: Plain,
) -> None:
    spec, events, _ = plain
    config = next(e.config for e in events if e.kind is EventKind.CONFIG_DONE)
    assert config is not None
    assert config.status is ConfigStatus.OK
    plan = confirmation_plan(spec, "simulated")
    assert plan.lengths is not None
    # the trial events: the backing confirmation ran every micro-batch at the plan's lengths
    confirmations = [
        e.trial
        for e in events
        if e.kind is EventKind.TRIAL and e.trial is not None and e.trial.lengths is not None
    ]
    backing = [t for t in confirmations if t.batch_size == config.max_batch_size and t.outcome is Outcome.FIT]
    assert len(backing) == 1
    trial = backing[0]
    assert trial.lengths == plan.lengths
    assert trial.micro_steps_done == len(plan.lengths) == (4 + 2) * spec.trial_accumulation_steps
    assert trial.optimizer_steps == spec.confirm_optimizer_steps + 2
    varied = trial.lengths[plan.worst_case_micro_steps :]
    assert min(varied) <= spec.seq_len // 2
    assert max(varied) == spec.seq_len
    # the result says so
    report = config.confirmation
    assert report is not None
    assert report.batch_size == config.max_batch_size
    assert report.varied_lengths == varied
    assert (report.worst_case_optimizer_steps, report.varied_optimizer_steps) == (4, 2)
    assert report.all_fit
    assert report.failed_sizes == ()
    # not measurable on a counting device: no number is invented
    assert report.reserved_minus_allocated_bytes is None
    assert report.derived_headroom_bytes is None


def test_the_child_runs_with_the_jobs_allocator_settings_and_the_recommendation_says_so(
    plain: Plain,
) -> None:
    spec, events, result = plain
    trials = [e.trial for e in events if e.kind is EventKind.TRIAL and e.trial is not None]
    # read from os.environ inside each trial child
    assert {t.cuda_alloc_conf for t in trials} == {"expandable_segments:True"}
    (config,) = result.configs
    report = config.confirmation
    assert report is not None
    assert report.cuda_alloc_conf == "expandable_segments:True"
    recommendation = result.recommendation
    assert recommendation is not None
    assert recommendation.env == {"PYTORCH_CUDA_ALLOC_CONF": spec.cuda_alloc_conf}


def test_a_request_names_its_own_allocator_settings() -> None:
    spec = _spec(
        cuda_alloc_conf="max_split_size_mb:128,garbage_collection_threshold:0.8", confirm_varied_steps=0
    )
    result = run_probe(spec)
    (config,) = result.configs
    assert {t.cuda_alloc_conf for t in config.trials} == {spec.cuda_alloc_conf}
    assert config.confirmation is not None
    assert config.confirmation.varied_optimizer_steps == 0
    assert config.confirmation.varied_lengths == ()
    assert all(t.lengths is None for t in config.trials)
    assert result.recommendation is not None
    assert result.recommendation.env == {"PYTORCH_CUDA_ALLOC_CONF": spec.cuda_alloc_conf}


def test_an_out_of_memory_error_at_a_short_varied_length_sends_the_search_down(
    plain: Plain, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _, result = plain
    answer = result.configs[0].max_batch_size
    assert answer is not None
    assert answer > 1
    plan = confirmation_plan(spec, "simulated")
    assert plan.lengths is not None
    at = plan.worst_case_micro_steps  # the first varied micro-batch: a short one
    assert plan.lengths[at] <= spec.seq_len // 2
    original = ConfigRun._request

    def injecting(
        self: ConfigRun, batch_size: int, steps: int, lengths: tuple[int, ...] | None
    ) -> TrialRequest:
        request = original(self, batch_size, steps, lengths)
        if lengths is not None and batch_size == answer:
            return request.model_copy(update={"oom_at_micro_step": at})
        return request

    monkeypatch.setattr(ConfigRun, "_request", injecting)
    (config,) = run_probe(spec).configs
    assert config.status is ConfigStatus.OK
    assert config.max_batch_size is not None
    assert config.max_batch_size < answer
    assert config.first_failing_batch_size == answer
    failed = [t for t in config.trials if t.batch_size == answer and t.lengths is not None]
    assert failed
    assert all(t.outcome is Outcome.OOM and t.micro_steps_done == at for t in failed)
    assert config.confirmation is not None
    assert config.confirmation.all_fit
    assert config.confirmation.failed_sizes == (answer,)
    assert ladder_next(config.max_batch_size) == answer
