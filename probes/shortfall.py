"""When a config cannot train even one sample per device: what it needs, and what fits instead (pure).

- :func:`min_batch_need` reads the trials at batch size 1: one that finished over the headroom
  gives the exact need; an out-of-memory trial gives a lower bound — the bytes in use plus the
  bytes of the allocation that failed — so the sentence says "at least". (Measuring the exact need
  would take a full uncapped step per such config: on the 8B probe, eight more trials.)
- :func:`explain_shortfalls` adds, to every such config, the probed strategies with the same
  precision and checkpointing that do fit (``fits_with``), and says so in the reason; to an
  ``fsdp`` config whose trials kept the unsharded gradients between micro-steps (Accelerate's
  default), that ``sync_each_batch`` would not (:data:`DEFERRED_SYNC_HINT`).
- :func:`single_rank_warning`: ``single`` with ``world_size`` > 1 measures one process training
  the whole model alone — no DDP buckets, no FSDP sharding — which is not what ``torchrun`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.spec import ConfigResult, ConfigStatus, Outcome, Strategy, TrialRecord
from probes.units import format_bytes


@dataclass(frozen=True)
class Need:
    """What batch size 1 needs per device, when known."""

    bytes: int | None
    lower_bound: bool
    sentence: str


def min_batch_need(
    trials: list[TrialRecord], capacity_bytes: int | None, floor_bytes: int | None = None
) -> Need:
    """The need of batch size 1 from its trials, and the reason sentence of a config where it fails.

    ``floor_bytes``, a lower bound of what the model, its gradients and optimizer state need before
    any activation (:func:`probes.finetuning_spec.memory_floor_bytes`), raises an out-of-memory
    trial's bound when it is higher (a model that runs out while it is built, say).
    """
    at_one = [t for t in trials if t.batch_size == 1]
    exact = [t.peak_bytes for t in at_one if t.outcome is Outcome.OVER_HEADROOM and t.peak_bytes is not None]
    bounds = [t.needed_bytes for t in at_one if t.outcome is Outcome.OOM and t.needed_bytes is not None]
    limit = format_bytes(capacity_bytes) if capacity_bytes is not None else "the device's memory"
    if exact:
        return exact_need(max(exact), capacity_bytes)
    if bounds or floor_bytes:
        need = max([*bounds, floor_bytes or 0])
        return Need(
            need,
            True,
            f"batch size 1 does not fit: it needs at least {format_bytes(need)} per device against {limit}",
        )
    return Need(None, False, "batch size 1 does not fit: no batch size trains here")


def exact_need(need_bytes: int, capacity_bytes: int | None) -> Need:
    """The need of batch size 1 when its peak is known exactly (a trial over the headroom, a curve)."""
    limit = format_bytes(capacity_bytes) if capacity_bytes is not None else "the device's memory"
    return Need(
        need_bytes,
        False,
        f"batch size 1 does not fit: it needs {format_bytes(need_bytes)} per device against {limit}",
    )


DEFERRED_SYNC_HINT = (
    "fsdp's gradient accumulation (Accelerate's default) kept the unsharded gradients until the last "
    "micro-batch; with sync_each_batch a rank keeps only its shard of them"
)


def explain_shortfalls(results: list[ConfigResult], *, sync_each_batch: bool = False) -> list[ConfigResult]:
    """``results`` with ``fits_with`` (and its sentence) on every config where batch size 1 fails.

    ``sync_each_batch``: the request's; without it, an ``fsdp`` config that ran trials and fits
    nothing also names that lever."""
    explained = []
    for config in results:
        if config.status is not ConfigStatus.OK or config.max_batch_size is not None:
            explained.append(config)
            continue
        update: dict[str, object] = {}
        if config.strategy is Strategy.FSDP and config.trials and not sync_each_batch:
            update["reason"] = f"{config.reason}; {DEFERRED_SYNC_HINT}"
        fitting = [
            other
            for other in results
            if other.strategy is not config.strategy
            and other.precision is config.precision
            and other.gradient_checkpointing == config.gradient_checkpointing
            and other.max_batch_size is not None
        ]
        if fitting:
            instead = ", ".join(f"{o.strategy.value} (max batch size {o.max_batch_size})" for o in fitting)
            reason = update.get("reason", config.reason)
            update["fits_with"] = tuple(o.strategy for o in fitting)
            update["reason"] = f"{reason}; with the same precision and checkpointing, {instead} fits"
        explained.append(config.model_copy(update=update) if update else config)
    return explained


def single_rank_warning(strategy: Strategy, world_size: int) -> tuple[str, ...]:
    if strategy is not Strategy.SINGLE or world_size <= 1:
        return ()
    return (
        f"single measures one process training the whole model alone; under torchrun with {world_size} "
        "ranks HF Trainer wraps the model in DDP, whose gradient buckets need about one more gradient "
        "copy per rank: probe ddp or fsdp for the job as it will run",
    )
