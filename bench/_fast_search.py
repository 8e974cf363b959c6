"""A prototype of a cheaper config run, to measure what two engine changes would save.

The engine (``probes.engine._ConfigRun``) spends a config's time on: an inspection child (once per
probe), the search trials (children reused after a fit) and a confirmation: the chosen size re-run
in a fresh child for ``confirm_optimizer_steps`` steps. This prototype drives the same pure search
(:class:`probes.search.LadderSearch`) and the same trial children (:class:`probes.isolate.TrialChild`)
with two changes:

1. **no inspection child**: the first trial child answers ``info`` and then serves the first trials;
2. **speculative confirmation**: every trial after the first two (the line-predicted jump and what
   follows it) runs in a fresh child for the confirmation's number of optimizer steps. When the
   search closes on a size whose passing trial was such a run, that run *is* the confirmation (a
   fresh process, the full length) and nothing is re-run; otherwise the engine's confirmation runs.
   (Reusing the child after a fit instead, as the engine does, measured worse: more separate
   confirmations, 4.83 trials per config against 4.54, for a child start of ~0.07 s saved.)

``confirm_steps`` sets the confirmation length (the engine's default is 4; on the deterministic
simulated and predict devices a 2-step trial already holds the steady peak, AdamW state included).
The answer is the engine's: the same search, the same bracket, fresh-process confirmed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from probes.isolate import TrialChild, info_from_reply, trial_from_reply
from probes.protocol import InfoRequest, TrialRequest
from probes.search import LadderSearch
from probes.spec import ConfigTask, Outcome, ProbeSpec, TrialRecord


@dataclass
class ProtoResult:
    max_batch_size: int | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    #: which trials ran in a fresh child for the confirmation's length
    confirming: list[bool] = field(default_factory=list)
    confirmed_by_search: bool = False
    #: wall seconds of each trial (child start and model build included where it had a new child)
    trial_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def run_config(spec: ProbeSpec, *, confirm_steps: int | None = None, timeout: float = 600.0) -> ProtoResult:
    """Search and confirm ``spec``'s first config as described in the module docstring."""
    precision, checkpointing = spec.configs()[0]
    task = ConfigTask.for_config(spec, precision, checkpointing)
    steps = confirm_steps if confirm_steps is not None else spec.confirm_optimizer_steps
    result = ProtoResult()
    started = time.perf_counter()
    first = TrialChild(task)
    child: TrialChild | None = first
    try:
        device = info_from_reply(first.request(InfoRequest(), timeout_seconds=timeout)).device
        limit = device.memory_limit_bytes or device.total_memory_bytes
        search = LadderSearch(
            capacity_bytes=device.capacity_bytes,
            upper_limit=spec.max_batch_size_limit,
        )
        confirmed: dict[int, bool] = {}

        def trial(size: int, optimizer_steps: int, *, fresh: bool) -> TrialRecord:
            nonlocal child
            if fresh and child is not None:
                child.close()
                child = None
            began = time.perf_counter()
            started_fresh = child is None
            if child is None:
                child = TrialChild(task)
            reply = child.request(
                TrialRequest(
                    batch_size=size,
                    accumulation_steps=spec.trial_accumulation_steps,
                    optimizer_steps=optimizer_steps,
                ),
                timeout_seconds=timeout,
            )
            record, discard = trial_from_reply(size, reply)
            if discard:
                child.close()
                child = None
            result.trials.append(record)
            result.trial_seconds.append(round(time.perf_counter() - began, 3))
            result.confirming.append(started_fresh and optimizer_steps >= steps)
            return record

        for _ in range(3):
            while (size := search.next_size()) is not None:
                speculative = len(search.trials) >= 2
                record = trial(size, steps if speculative else spec.trial_optimizer_steps, fresh=speculative)
                confirmed[size] = speculative and record.outcome is Outcome.FIT
                search.record(record)
            best = search.max_batch_size
            if best is None or search.aborted_reason is not None:
                result.error = search.aborted_reason
                break
            if confirmed.get(best):
                result.max_batch_size = best
                result.confirmed_by_search = True
                break
            check = trial(best, steps, fresh=True)
            if check.outcome is Outcome.FIT:
                result.max_batch_size = best
                break
            search.reject(best, check)
            if check.outcome not in (Outcome.OOM, Outcome.OVER_HEADROOM):
                result.error = f"confirmation at {best} ended in {check.outcome.value}"
                break
    finally:
        if child is not None:
            child.close()
    result.seconds = time.perf_counter() - started
    return result
