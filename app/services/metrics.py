"""The service's Prometheus metrics, on prometheus-client and each app's own registry.

Names carry the ``maxbatch_`` prefix and base units (``_seconds``, ``_total``). Everything is
read at scrape time by :class:`StateCollector` from a :class:`ServiceState` snapshot of the store
and the dispatcher, so nothing is counted in memory and nothing resets when the service restarts:

- gauges describe stored state (jobs by status, queue depth, busy workers);
- the counters and the histogram count rows that are never deleted: every stored trial
  (``maxbatch_trials_total``) and every probe child run the store recorded
  (``maxbatch_probe_runs_total``, ``maxbatch_probe_duration_seconds``).

Every :class:`Metrics` has its own :class:`~prometheus_client.CollectorRegistry` (never the global
default), so two apps in one process report apart. The exposition has no ``_created`` series: the
text format 0.0.4 gives them no meaning, and a counter derived from the store has no creation time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app.store import RunDurations


def _go_float(value: float) -> str:
    """A bucket bound as prometheus-client writes it (``1.0``, ``+Inf``), as its Histogram did."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


DURATION_BUCKETS_SECONDS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""``text/plain; version=0.0.4; charset=utf-8``: what :meth:`Metrics.exposition` writes."""


@dataclass(frozen=True)
class ServiceState:
    """What the metrics show, read from the store and the dispatcher at scrape time."""

    #: status → jobs in the store (every status should be present, zeros included)
    jobs_by_status: Mapping[str, int] = field(default_factory=dict)
    #: queue → jobs waiting in it
    queued_by_queue: Mapping[str, int] = field(default_factory=dict)
    #: queue → id of the job running there now
    running_by_queue: Mapping[str, str] = field(default_factory=dict)
    #: queues to show even when empty (``cpu`` and one per GPU)
    queues: tuple[str, ...] = ()
    #: outcome → trials stored with it
    trials_by_outcome: Mapping[str, int] = field(default_factory=dict)
    #: how a probe child run ended → runs recorded so
    runs_by_status: Mapping[str, int] = field(default_factory=dict)
    #: the runs' wall times over :data:`DURATION_BUCKETS_SECONDS`
    durations: RunDurations = field(
        default_factory=lambda: RunDurations(0, 0.0, (0,) * len(DURATION_BUCKETS_SECONDS))
    )


class StateCollector(Collector):
    """The families of :class:`ServiceState`, computed at each scrape from ``read_state()``."""

    def __init__(self, read_state: Callable[[], ServiceState], *, trial_outcomes: Iterable[str] = ()) -> None:
        self._read_state = read_state
        self._trial_outcomes = tuple(trial_outcomes)

    def describe(self) -> Iterable[Metric]:
        """The families without samples: lets the registry refuse a second collector of these names."""
        return self._families(ServiceState())

    def collect(self) -> Iterable[Metric]:
        return self._families(self._read_state())

    def _families(self, state: ServiceState) -> list[Metric]:
        jobs = GaugeMetricFamily("maxbatch_jobs", "Probe jobs in the store, by status.", labels=["status"])
        for status, count in sorted(state.jobs_by_status.items()):
            jobs.add_metric([status], count)
        depth = GaugeMetricFamily(
            "maxbatch_queue_depth", "Jobs waiting for a worker, by queue (device).", labels=["queue"]
        )
        busy = GaugeMetricFamily(
            "maxbatch_workers_busy", "1 while a queue's worker runs a probe.", labels=["queue"]
        )
        for queue in sorted(set(state.queues) | set(state.queued_by_queue) | set(state.running_by_queue)):
            depth.add_metric([queue], state.queued_by_queue.get(queue, 0))
            busy.add_metric([queue], int(queue in state.running_by_queue))
        return [jobs, depth, busy, *self._counters(state)]

    def _counters(self, state: ServiceState) -> list[Metric]:
        trials = CounterMetricFamily(
            "maxbatch_trials", "Probe trials finished (every stored trial), by outcome.", labels=["outcome"]
        )
        for outcome in sorted(set(self._trial_outcomes) | set(state.trials_by_outcome)):  # zeros show
            trials.add_metric([outcome], state.trials_by_outcome.get(outcome, 0))
        runs = CounterMetricFamily(
            "maxbatch_probe_runs", "Probe child runs finished, by how they ended.", labels=["status"]
        )
        for status, count in sorted(state.runs_by_status.items()):
            runs.add_metric([status], count)
        durations = state.durations
        histogram = HistogramMetricFamily("maxbatch_probe_duration_seconds", "Wall time of probe child runs.")
        buckets = [
            (_go_float(bound), count)
            for bound, count in zip(DURATION_BUCKETS_SECONDS, durations.cumulative, strict=True)
        ]
        histogram.add_metric([], [*buckets, ("+Inf", durations.count)], durations.total_seconds)
        return [trials, runs, histogram]


class Metrics:
    """One service's metrics: what :meth:`watch`'s reader returns, read with :meth:`exposition`."""

    def __init__(self, *, trial_outcomes: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self._trial_outcomes = tuple(trial_outcomes)

    def watch(self, read_state: Callable[[], ServiceState]) -> None:
        """Show ``read_state()`` (called at each scrape) from now on."""
        self.registry.register(StateCollector(read_state, trial_outcomes=self._trial_outcomes))

    def exposition(self) -> str:
        """Everything in the registry, in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode("utf-8")
