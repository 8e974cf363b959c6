"""Kill drills against a real service: nothing acknowledged is lost, nothing killed lingers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.drills import DRILLS, run_drill

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(DRILLS))
def test_drill(name: str, tmp_path: Path) -> None:
    report = run_drill(name, tmp_path)
    assert report.problems == [], f"{report.name}: {report.problems} (saw {report.facts})"
