"""Compare cards in one request: ``predict`` for every card a ``gpu`` list names.

A thin layer above :func:`probes.engine.run_probe`: each card runs as the one-card request it
stands for (:meth:`~probes.spec.ProbeSpec.for_card`), one card after another, so its configs are
exactly that request's; the request's ``precisions`` that a card cannot run (bf16 below compute
capability 8.0) are ``skipped`` there as in a one-card request. What is the same for several cards
is measured once: a :class:`~probes.trial_memo.TrialMemo` lends every fitting trial to the cards
with the same compute capability (same kernels, same counted bytes) whose capacity its peak fits.

The result is the first card's result with ``cards`` holding every card's (the first included),
so a client that reads one card still reads a whole result.
"""

from __future__ import annotations

import threading
import time

from probes.engine import EventSink, run_probe
from probes.spec import CardResult, ProbeEvent, ProbeResult, ProbeSpec
from probes.trial_memo import TrialMemo

__all__ = ["run_request"]


def run_request(
    spec: ProbeSpec,
    *,
    on_event: EventSink | None = None,
    cancel: threading.Event | None = None,
    allow_remote_code: bool = False,
    max_concurrent_configs: int | None = None,
) -> ProbeResult:
    """:func:`~probes.engine.run_probe` for any request: one result per card when ``gpu`` is a list."""
    if not spec.cards:
        return run_probe(
            spec,
            on_event=on_event,
            cancel=cancel,
            allow_remote_code=allow_remote_code,
            max_concurrent_configs=max_concurrent_configs,
        )
    started = time.monotonic()
    memo = TrialMemo()
    per_config = len(spec.configs())
    results: list[tuple[str, ProbeResult, int]] = []
    for position, card in enumerate(spec.cards):
        lent_before = memo.lent
        result = run_probe(
            spec.for_card(card),
            on_event=None if on_event is None else _on_card(on_event, card, position * per_config, spec),
            cancel=cancel,
            allow_remote_code=allow_remote_code,
            max_concurrent_configs=max_concurrent_configs,
            trial_memo=memo,
        )
        results.append((card, result, memo.lent - lent_before))
    cards = tuple(_card_result(card, result, reused) for card, result, reused in results)
    first = results[0][1]
    return ProbeResult(
        spec=spec,
        device=first.device,
        configs=first.configs,
        recommendation=first.recommendation,
        versions=first.versions,
        elapsed_seconds=round(time.monotonic() - started, 3),
        timing_note=first.timing_note,
        cards=cards,
    )


def _card_result(card: str, result: ProbeResult, reused: int) -> CardResult:
    trials = sum(len(config.trials) for config in result.configs)
    return CardResult(
        gpu=card,
        device=result.device,
        configs=result.configs,
        recommendation=result.recommendation,
        elapsed_seconds=result.elapsed_seconds,
        timing_note=result.timing_note,
        trials_run=trials - reused,
        trials_reused=reused,
    )


def _on_card(on_event: EventSink, card: str, offset: int, spec: ProbeSpec) -> EventSink:
    """Events of one card's run as the whole request's: the card named, positions across cards."""
    total = len(spec.configs()) * len(spec.cards)

    def forward(event: ProbeEvent) -> None:
        on_event(
            event.model_copy(
                update={"gpu": card, "config_index": offset + event.config_index, "config_count": total}
            )
        )

    return forward
