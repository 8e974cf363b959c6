"""Trials one card's ``predict`` run lends another's: the same counted run is not run twice.

On ``predict`` a trial's counted bytes depend on the model, the config, the batch and the
kernels the named card's CUDA would pick (:mod:`probes.recipe.attention` decides them by compute
capability), never on the card's memory: the cap only decides *whether* the run is stopped. So a
trial that fitted on one card with peak ``P`` is, to the byte, the run a card with the same
compute capability makes at the same batch size whenever ``P`` fits that card's capacity: the
run never came near either cap. :class:`TrialMemo` keeps such fits and hands them back; trials
that ran out of memory are not lent (where a smaller card's run stops, and what it reports, is its
own). Pure: no torch, no processes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from probes.gpus import lookup_gpu
from probes.protocol import TrialRequest
from probes.spec import ConfigTask, Outcome, TrialRecord


def _measurement_key(task: ConfigTask, request: TrialRequest) -> str | None:
    """What makes two trials the same counted run; ``None`` where trials are not lent (not
    ``predict``, or no named card)."""
    if task.device != "predict" or task.gpu is None:
        return None
    capability = lookup_gpu(task.gpu).capability_label
    card_free = task.model_copy(update={"gpu": None, "memory_limit_bytes": None, "headroom_bytes": 0})
    return f"{capability}|{card_free.model_dump_json()}|{request.model_dump_json()}"


@dataclass
class TrialMemo:
    """Fitting ``predict`` trials by measurement, lent to cards of the same compute capability."""

    _fits: dict[str, list[TrialRecord]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: trials handed back instead of run, and trials run and kept, since the memo was made
    lent: int = 0
    kept: int = 0

    def recall(
        self, task: ConfigTask, request: TrialRequest, capacity_bytes: int | None
    ) -> TrialRecord | None:
        """A fit of the same run whose peak fits ``capacity_bytes`` (``None``: run it)."""
        key = _measurement_key(task, request)
        if key is None or capacity_bytes is None:
            return None
        with self._lock:
            for trial in self._fits.get(key, ()):
                peak = trial.peak_bytes
                if peak is not None and peak <= capacity_bytes:
                    self.lent += 1
                    return trial
        return None

    def remember(self, task: ConfigTask, request: TrialRequest, trial: TrialRecord) -> None:
        """Keep ``trial`` if it is a fit another card can reuse."""
        key = _measurement_key(task, request)
        if key is None or trial.outcome is not Outcome.FIT or trial.peak_bytes is None:
            return
        with self._lock:
            self._fits.setdefault(key, []).append(trial)
            self.kept += 1
