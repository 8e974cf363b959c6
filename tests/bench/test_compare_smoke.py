"""Fast checks of the finder benchmark's pieces (no finder is run: the benchmark itself takes minutes).

- both anchors' own out-of-memory matchers accept the simulated device's error (the benchmark's
  premise: their finders back off on it as on a real GPU);
- replaying the ladder search on a curve reproduces the engine's search and the exhaustive answer;
- the report states agreement with the truth, mean trials and OOMs, and the time ratio.
"""

from __future__ import annotations

import importlib.util

import pytest

from bench._search_replay import VARIANTS, replay
from bench.compare_finders import Row, report, summary_lines
from probes.search import ladder

MiB = 2**20


def test_accelerate_recognises_the_simulated_oom() -> None:
    from bench._anchors import oom_recognised

    assert oom_recognised("accelerate")


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning (the bench group) is absent"
)
def test_lightning_recognises_the_simulated_oom() -> None:
    from bench._anchors import oom_recognised

    assert oom_recognised("lightning-binsearch")


def linear_curve(floor: int, per_sample: int, capacity: int) -> dict[int, int | None]:
    """Every ladder size up to the first that does not fit, as the exhaustive truth records it."""
    curve: dict[int, int | None] = {}
    for size in ladder(10_000):
        peak = floor + per_sample * size
        curve[size] = peak if peak <= capacity else None
        if curve[size] is None:
            break
    return curve


@pytest.mark.parametrize("per_sample", [MiB, 3 * MiB, 7 * MiB // 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_search_variant_finds_the_exhaustive_answer(variant: str, per_sample: int) -> None:
    capacity = 100 * MiB
    curve = linear_curve(5 * MiB, per_sample, capacity)
    truth = max(n for n, peak in curve.items() if peak is not None)
    tried, answer = replay(curve, capacity, VARIANTS[variant])
    assert answer == truth
    assert len(tried) == len(set(tried))


def test_shipped_replay_jumps_straight_to_a_linear_boundary() -> None:
    capacity = 64 * MiB
    curve = linear_curve(4 * MiB, MiB, capacity)  # fits up to 60
    tried, answer = replay(curve, capacity, VARIANTS["shipped"])
    assert answer == 56
    assert tried == [1, 2, 56, 64]


def rows() -> list[Row]:
    made = []
    for case, truth in (("a", 16), ("b", 32)):
        made += [
            Row(case=case, finder="maxbatch", found=truth, trials=5, ooms=1, seconds=2.0, soak="pass"),
            Row(case=case, finder="lightning-binsearch", found=truth + 3, trials=10, ooms=4, seconds=8.0),
            Row(case=case, finder="accelerate-128", found=truth - 1, trials=12, ooms=11, seconds=4.0),
            Row(case=case, finder="exhaustive", found=truth, trials=6, ooms=1, seconds=9.0),
        ]
    return made


def test_summary_states_agreement_trials_and_time_ratio() -> None:
    text = "\n".join(summary_lines(rows()))
    assert "equals the exhaustive ladder truth in 2 of 2 cases (every case)" in text
    assert "5.00 trials and 1.00 OOMs per config" in text
    assert "0.25× Lightning binsearch's in total" in text
    assert "| accelerate-128 | 2 | 0 | 0 | 2 | 12.00 | 11.00 |" in text


def test_report_has_every_section() -> None:
    meta = {
        "profile": "test",
        "device": "simulated",
        "date": "today",
        "machine": "here",
        "command": "python -m bench.compare_finders",
        "memory": "40 MiB",
        "versions": "-",
        "wall_seconds": 1.0,
        "cases_run": 2,
        "cases_total": 2,
    }
    text = report(rows(), meta)
    for heading in ("## Summary", "## Sizes found", "## Every run"):
        assert heading in text
    assert "| a | 16 | 16 (=) | 19 (+3) | 15 (-1) |" in text


@pytest.mark.slow
def test_the_prototype_runs_the_engines_config_run_to_the_engines_answer() -> None:
    from bench.compare_finders import PROFILES, TINY_MODELS, Case, run_maxbatch, run_prototype
    from probes.spec import Precision

    architecture, config = TINY_MODELS["llama"]
    case = Case("llama", architecture, config, 64, Precision.FP32, False, "simulated", 32 * MiB)
    timeout = PROFILES["quick"].finder_timeout_seconds
    engine = run_maxbatch(case, timeout)
    proto = run_prototype(case, "maxbatch-proto2", 2, timeout)
    assert proto.error is None
    assert engine.found is not None
    assert proto.found == engine.found
    assert len(proto.trial_seconds) == proto.trials == len(proto.sizes)
    assert all(size.endswith("f") for size in proto.sizes[2:])
