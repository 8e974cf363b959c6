"""What a finished probe says, in one word: a plan, nothing fits, or no answer at all.

A scheduler must tell "the probe failed" (retrying, or another machine, may help) from "the probe
worked and nothing fits" (a bigger GPU, more devices or a smaller model is needed). Pure: it reads
a :class:`~probes.spec.ProbeResult`, imports no torch.

- ``fit``: at least one config has a plan; the result's ``recommendation`` holds one.
- ``no_fit``: every config that could run here ran to an answer, and in none does even batch
  size 1 fit (skipped configs aside: they did not run).
- no answer (:attr:`Verdict.answer` is ``None``): every config failed or was skipped, or some
  failed and none fits, so the failures may hide a size that fits. ``code`` and ``reason`` say
  which, with each config's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from probes.spec import ConfigResult, ConfigStatus, ProbeResult


class Answer(StrEnum):
    #: at least one config has a plan (the recommendation)
    FIT = "fit"
    #: every config that could run did, and in none does batch size 1 fit
    NO_FIT = "no_fit"


NO_ANSWER_CODES = ("configs-failed", "configs-skipped")
"""The ``code`` of a probe that ran but has no answer: configs failed, or none could run here."""


@dataclass(frozen=True, slots=True)
class Verdict:
    answer: Answer | None
    #: ``configs-failed`` or ``configs-skipped`` when there is no answer
    code: str | None = None
    #: a sentence per config, when there is no answer
    reason: str | None = None


def _label(config: ConfigResult) -> str:
    checkpointing = "checkpointing" if config.gradient_checkpointing else "no checkpointing"
    return f"{config.precision.value}, {checkpointing}"


def config_reasons(configs: tuple[ConfigResult, ...] | list[ConfigResult]) -> str:
    """One line per config: its label, its status and why."""
    return "\n".join(
        f"- {_label(c)}: {c.status.value}" + (f": {c.reason}" if c.reason else "") for c in configs
    )


def judge(result: ProbeResult) -> Verdict:
    """The verdict on ``result`` (see the module docstring); a multi-card result is judged on every
    card's configs (``fit`` when any card has a plan)."""
    configs = result.all_configs()
    if any(c.status is ConfigStatus.OK and c.max_batch_size is not None for c in configs):
        return Verdict(Answer.FIT)
    where = " or ".join(card.gpu for card in result.cards) if result.cards else result.device.name
    failed = [c for c in configs if c.status is ConfigStatus.FAILED]
    ran = [c for c in configs if c.status is not ConfigStatus.SKIPPED]
    if failed:
        return Verdict(
            None,
            "configs-failed",
            f"{len(failed)} of {len(configs)} configs failed and none fits, so no answer can be "
            f"given:\n{config_reasons(configs)}",
        )
    if not ran:
        return Verdict(
            None,
            "configs-skipped",
            f"none of the {len(configs)} configs can run on {where}:\n{config_reasons(configs)}",
        )
    return Verdict(Answer.NO_FIT)
