"""The search replayed on compare_finders' measured curves, without and with the floor (issue 11).

``python -m bench.replay_floor [bench/results/compare_finders-cpu.json]``

Each case's exhaustive truth recorded the peak of every ladder size up to its first failure. The
shipped :class:`probes.search.LadderSearch` is replayed on it (``bench._search_replay.replay``) as
the engine runs it, and again with ``floor_bytes`` = weights + gradients + AdamW state of the
case's model (``probes.search.training_state_bytes`` of its parameter count, as the engine will
pass it). Failures in these curves carry no lower bound (the truth runs recorded none), so this
measures the floor alone. Search trials only; the answers must equal the truth's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench._search_replay import SearchFactory, replay
from bench.compare_finders import PROFILES, Case
from probes.models import inspect_model
from probes.search import LadderSearch, training_state_bytes

DEFAULT = Path(__file__).resolve().parent / "results" / "compare_finders-cpu.json"


def _cases() -> dict[str, Case]:
    profile = PROFILES["cpu"]
    cases = [
        Case(name, arch, config, seq, precision, ckpt, profile.device, profile.memory_limit_bytes)
        for name, (arch, config) in profile.models.items()
        for seq in profile.seq_lens
        for precision in profile.precisions
        for ckpt in profile.checkpointing
    ]
    return {case.label: case for case in cases}


def _with_floor(floor: int | None) -> SearchFactory:
    return lambda capacity: LadderSearch(capacity_bytes=capacity, floor_bytes=floor)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT
    rows = [r for r in json.loads(path.read_text(encoding="utf-8"))["rows"] if r["finder"] == "exhaustive"]
    cases = _cases()
    totals = {"shipped": [0, 0], "floor": [0, 0]}
    parameters: dict[str, int] = {}
    print(f"{'case':<32} {'truth':>5}  shipped sizes            with the floor")
    for row in rows:
        case = cases[row["case"]]
        curve = {int(n): peak for n, peak in row["curve"].items()}
        if case.model not in parameters:
            facts = inspect_model(case.task().model, case.seq_len, allow_remote_code=False)
            parameters[case.model] = facts.parameter_count
        floor = training_state_bytes(parameters[case.model], case.precision)
        capacity = case.memory_limit_bytes
        plain, answer = replay(curve, capacity, lambda c: LadderSearch(capacity_bytes=c))
        floored, floored_answer = replay(curve, capacity, _with_floor(floor))
        if answer != row["largest_fit"] or floored_answer != row["largest_fit"]:
            print(f"{case.label}: answer {answer} / {floored_answer}, truth {row['largest_fit']}")
            return 1
        failing = min((n for n, peak in curve.items() if peak is None), default=None)
        for key, tried in (("shipped", plain), ("floor", floored)):
            totals[key][0] += len(tried)
            totals[key][1] += sum(1 for n in tried if failing is not None and n >= failing)
        print(f"{case.label:<32} {row['largest_fit']:>5}  {plain!s:<24} {floored}")
    count = len(rows)
    for key, (trials, fails) in totals.items():
        print(
            f"{key:<8} mean search trials {trials / count:.2f}, mean failures {fails / count:.2f} "
            f"over {count} cases"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
