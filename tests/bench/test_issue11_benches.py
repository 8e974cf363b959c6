"""Smoke checks of the issue-11 benchmarks that run fast: the floor replayed on measured curves."""

from __future__ import annotations

import pytest

from bench import replay_floor


@pytest.mark.slow  # builds three models on the meta device to count their parameters
def test_replay_floor_keeps_every_answer_and_does_not_cost_trials(capsys: pytest.CaptureFixture[str]) -> None:
    assert replay_floor.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    means = {
        line.split()[0]: float(line.split("mean search trials ")[1].split(",")[0]) for line in lines[-2:]
    }
    assert set(means) == {"shipped", "floor"}
    assert means["floor"] <= means["shipped"]


@pytest.mark.slow  # one case: predict's curve and two simulated trials, in a worker process
def test_seeded_search_confirms_with_two_device_trials(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import seeded_search

    assert seeded_search.main(["--cases", "1", "--parallel", "1"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert "device trials 2.00 per config" in summary
    assert "answers equal to the truth 1/1" in summary
