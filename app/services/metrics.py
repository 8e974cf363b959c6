"""The service's Prometheus metrics, on prometheus-client and each app's own registry.

Names carry the ``maxbatch_`` prefix and base units (``_seconds``, ``_total``). Two kinds:

- gauges that describe stored state (jobs by status, queue depth, busy workers) are read at scrape
  time by :class:`StateCollector` from a :class:`ServiceState` snapshot (the store and the
  dispatcher), so they are right after a restart;
- counters and the histogram count what this process saw since it started (``trial``, ``run``).
  Counts that must survive a restart would come from the store through a collector like
  :class:`StateCollector`, under the same names.

Every :class:`Metrics` has its own :class:`~prometheus_client.CollectorRegistry` (never the global
default), so two apps in one process count apart. The exposition has no ``_created`` series:
the hand-written one it replaced had none, and the text format 0.0.4 gives them no meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DURATION_BUCKETS_SECONDS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""``text/plain; version=0.0.4; charset=utf-8``: what :meth:`Metrics.exposition` writes."""


@dataclass(frozen=True)
class ServiceState:
    """What the gauges show, read from the store and the dispatcher at scrape time."""

    #: status → jobs in the store (every status should be present, zeros included)
    jobs_by_status: Mapping[str, int] = field(default_factory=dict)
    #: queue → jobs waiting in it
    queued_by_queue: Mapping[str, int] = field(default_factory=dict)
    #: queue → id of the job running there now
    running_by_queue: Mapping[str, str] = field(default_factory=dict)
    #: queues to show even when empty (``cpu`` and one per GPU)
    queues: tuple[str, ...] = ()


class StateCollector(Collector):
    """The gauges of :class:`ServiceState`, computed at each scrape from ``read_state()``."""

    def __init__(self, read_state: Callable[[], ServiceState]) -> None:
        self._read_state = read_state

    def describe(self) -> Iterable[Metric]:
        """The families without samples: lets the registry refuse a second collector of these names."""
        return self._families(ServiceState())

    def collect(self) -> Iterable[Metric]:
        return self._families(self._read_state())

    @staticmethod
    def _families(state: ServiceState) -> list[Metric]:
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
        return [jobs, depth, busy]


class _WithoutCreated(Collector):
    """The families of ``metrics`` minus their ``_created`` samples (no global switch needed)."""

    def __init__(self, *metrics: MetricWrapperBase) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [family for metric in self._metrics for family in metric.describe()]

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


class Metrics:
    """One service's metrics: count with :meth:`trial` and :meth:`run`, read with :meth:`exposition`."""

    def __init__(self, *, trial_outcomes: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self._trials = Counter(
            "maxbatch_trials_total",
            "Probe trials finished since start, by outcome.",
            ["outcome"],
            registry=None,
        )
        for outcome in trial_outcomes:  # every outcome shows, 0 included
            self._trials.labels(outcome=outcome)
        self._runs = Counter(
            "maxbatch_probe_runs_total",
            "Probe child runs finished since start, by how they ended.",
            ["status"],
            registry=None,
        )
        self._duration = Histogram(
            "maxbatch_probe_duration_seconds",
            "Wall time of probe child runs.",
            buckets=DURATION_BUCKETS_SECONDS,
            registry=None,
        )
        self.registry.register(_WithoutCreated(self._trials, self._runs, self._duration))

    def watch(self, read_state: Callable[[], ServiceState]) -> None:
        """Show the gauges of ``read_state()`` (called at each scrape) from now on."""
        self.registry.register(StateCollector(read_state))

    def trial(self, outcome: str) -> None:
        self._trials.labels(outcome=outcome).inc()

    def run(self, status: str, seconds: float | None) -> None:
        """A probe child run ended; ``seconds`` is its wall time when it started at all."""
        self._runs.labels(status=status).inc()
        if seconds is not None:
            self._duration.observe(seconds)

    def exposition(self) -> str:
        """Everything in the registry, in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode("utf-8")
