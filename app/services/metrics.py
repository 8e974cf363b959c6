"""Prometheus text exposition, written by hand: a few counters and one histogram.

Names carry the ``maxbatch_`` prefix and base units (``_seconds``, ``_total``). Gauges that
describe stored state (jobs by status, queue depth) are read from the store at scrape time;
counters and the histogram count what this process saw since it started.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

DURATION_BUCKETS_SECONDS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.trials: Counter[str] = Counter()
        self.runs: Counter[str] = Counter()
        self._bucket_counts = [0] * len(DURATION_BUCKETS_SECONDS)
        self._duration_sum = 0.0
        self._duration_count = 0

    def trial(self, outcome: str) -> None:
        with self._lock:
            self.trials[outcome] += 1

    def run(self, status: str, seconds: float | None) -> None:
        with self._lock:
            self.runs[status] += 1
            if seconds is None:
                return
            self._duration_sum += seconds
            self._duration_count += 1
            for i, bound in enumerate(DURATION_BUCKETS_SECONDS):
                if seconds <= bound:
                    self._bucket_counts[i] += 1

    def render(
        self,
        *,
        jobs_by_status: Mapping[str, int],
        queued_by_queue: Mapping[str, int],
        running_by_queue: Mapping[str, str],
        trial_outcomes: tuple[str, ...],
        queues: tuple[str, ...] = (),
    ) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        family("maxbatch_jobs", "gauge", "Probe jobs in the store, by status.")
        for status, count in sorted(jobs_by_status.items()):
            lines.append(f"maxbatch_jobs{_labels(status=status)} {count}")
        family("maxbatch_queue_depth", "gauge", "Jobs waiting for a worker, by queue (device).")
        all_queues = sorted(set(queues) | set(queued_by_queue) | set(running_by_queue))
        for queue in all_queues:
            lines.append(f"maxbatch_queue_depth{_labels(queue=queue)} {queued_by_queue.get(queue, 0)}")
        family("maxbatch_workers_busy", "gauge", "1 while a queue's worker runs a probe.")
        for queue in all_queues:
            lines.append(f"maxbatch_workers_busy{_labels(queue=queue)} {int(queue in running_by_queue)}")
        with self._lock:
            trials = dict(self.trials)
            runs = dict(self.runs)
            buckets = list(self._bucket_counts)
            total, count = self._duration_sum, self._duration_count
        family("maxbatch_trials_total", "counter", "Probe trials finished since start, by outcome.")
        for outcome in sorted(set(trial_outcomes) | set(trials)):
            lines.append(f"maxbatch_trials_total{_labels(outcome=outcome)} {trials.get(outcome, 0)}")
        family(
            "maxbatch_probe_runs_total",
            "counter",
            "Probe child runs finished since start, by how they ended.",
        )
        for status, value in sorted(runs.items()):
            lines.append(f"maxbatch_probe_runs_total{_labels(status=status)} {value}")
        family("maxbatch_probe_duration_seconds", "histogram", "Wall time of probe child runs.")
        for bound, bucket in zip(DURATION_BUCKETS_SECONDS, buckets, strict=True):
            lines.append(f"maxbatch_probe_duration_seconds_bucket{_labels(le=_number(bound))} {bucket}")
        lines.append(f'maxbatch_probe_duration_seconds_bucket{{le="+Inf"}} {count}')
        lines.append(f"maxbatch_probe_duration_seconds_sum {_number(total)}")
        lines.append(f"maxbatch_probe_duration_seconds_count {count}")
        return "\n".join(lines) + "\n"
