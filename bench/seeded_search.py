"""Predict-seeded search on compare_finders' cases: trials on the device, answers against the truth.

``python -m bench.seeded_search [--engine] [--parallel 2] [--json PATH] [TRUTH_JSON]``

For each of the 24 cases of ``compare_finders --profile cpu`` (tiny GPT-2, Llama, Qwen2; seq 64
and 128; ``32-true`` and ``bf16-mixed``; checkpointing off and on; 40 MiB ``simulated``):

1. ``predict`` for the same capacity: :func:`probes.curve.measure_curve` (timelines at batch sizes
   2 and 3, the affine curve; 1 where 2 does not fit) and the curve's ladder bracket. CPU only; on
   ``cuda`` this runs while no GPU is held.
2. The device (``simulated``) confirms it through :class:`probes.seeding.SeededSearch` with the
   floor of ``probes.search.training_state_bytes``: the predicted max runs as the confirmation (a
   fresh session, ``confirm_optimizer_steps`` = 4 optimizer steps), every other trial as a search
   trial (a fresh session, 2 optimizer steps, accumulation 2, as the engine's defaults). When the
   answer was not backed by a 4-step run, its confirmation runs too and counts.

``--engine`` runs each case through the engine instead (``probes.engine.run_probe`` with
``predict_seeding``, one config per probe: the predict child's curve, then the device's trials in
fresh children, exactly as a service probe runs): the device trials are the config's ``trials``.

Printed per case: the predicted bracket, the sizes the device ran, whether the prediction was
right, the answer and the exhaustive truth recorded in ``TRUTH_JSON`` (default
``bench/results/compare_finders-cpu.json``); then the means. Fresh sessions stand in for the
engine's fresh child processes (the trials are the same; the process start-up is not counted).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_TRUTH = Path(__file__).resolve().parent / "results" / "compare_finders-cpu.json"


def _one_case(label: str) -> dict[str, Any]:
    import torch

    from bench.compare_finders import PROFILES, Case
    from probes.curve import measure_curve
    from probes.models import inspect_model
    from probes.search import training_state_bytes
    from probes.seeding import PredictedBracket, SeededSearch
    from probes.spec import Outcome, ProbeSpec
    from probes.trial import TrialSession

    torch.set_num_threads(1)
    profile = PROFILES["cpu"]
    case = next(
        Case(name, arch, config, seq, precision, ckpt, profile.device, profile.memory_limit_bytes)
        for name, (arch, config) in profile.models.items()
        for seq in profile.seq_lens
        for precision in profile.precisions
        for ckpt in profile.checkpointing
        if Case(name, arch, config, seq, precision, ckpt, profile.device, profile.memory_limit_bytes).label
        == label
    )
    defaults = ProbeSpec.model_fields
    accumulation = int(defaults["trial_accumulation_steps"].default)
    search_steps = int(defaults["trial_optimizer_steps"].default)
    confirm_steps = int(defaults["confirm_optimizer_steps"].default)
    device_task = case.task()
    predict_task = device_task.model_copy(update={"device": "predict"})

    started = time.perf_counter()
    with TrialSession(predict_task) as session:
        capacity = session.device.capacity_bytes
    predicted = measure_curve(predict_task, accumulation_steps=accumulation, optimizer_steps=search_steps)
    predict_seconds = time.perf_counter() - started
    if predicted.curve is not None:
        bracket = PredictedBracket(*predicted.curve.ladder_bracket(capacity))
    elif predicted.nothing_fits:
        bracket = PredictedBracket(None, 1)
    else:
        raise RuntimeError(f"{label}: predict gave no curve ({predicted.reason})")

    facts = inspect_model(device_task.model, device_task.seq_len, allow_remote_code=False)
    floor = training_state_bytes(facts.parameter_count, device_task.precision)
    with TrialSession(device_task) as session:
        device_capacity = session.device.capacity_bytes
    search = SeededSearch(bracket, capacity_bytes=device_capacity, floor_bytes=floor)
    sizes: list[str] = []
    confirmed: set[int] = set()
    started = time.perf_counter()

    def run(size: int, steps: int) -> Any:
        with TrialSession(device_task) as trial_session:
            record = trial_session.run(size, accumulation_steps=accumulation, optimizer_steps=steps)
        sizes.append(
            f"{size}{'' if record.outcome is Outcome.FIT else 'x'}{'c' if steps == confirm_steps else ''}"
        )
        if record.outcome is Outcome.FIT and steps == confirm_steps:
            confirmed.add(size)
        return record

    while (size := search.next_size()) is not None:
        steps = confirm_steps if size == bracket.max_batch_size else search_steps
        search.record(run(size, steps))
    answer = search.max_batch_size
    if answer is not None and answer not in confirmed:
        record = run(answer, confirm_steps)
        if record.outcome is not Outcome.FIT:
            raise RuntimeError(f"{label}: the confirmation at {answer} failed ({record.outcome.value})")
    return {
        "case": label,
        "predicted": [bracket.max_batch_size, bracket.first_failing_batch_size],
        "predict_trials": predicted.trials,
        "predict_seconds": round(predict_seconds, 2),
        "device_sizes": sizes,
        "device_trials": len(sizes),
        "device_seconds": round(time.perf_counter() - started, 2),
        "prediction_right": search.prediction_right,
        "answer": [answer, search.first_failing_batch_size],
    }


def _one_case_through_the_engine(label: str) -> dict[str, Any]:
    from bench.compare_finders import PROFILES, Case
    from probes.engine import run_probe
    from probes.spec import Outcome

    profile = PROFILES["cpu"]
    case = next(
        c
        for name, (arch, config) in profile.models.items()
        for seq in profile.seq_lens
        for precision in profile.precisions
        for ckpt in profile.checkpointing
        if (
            c := Case(name, arch, config, seq, precision, ckpt, profile.device, profile.memory_limit_bytes)
        ).label
        == label
    )
    started = time.perf_counter()
    config = run_probe(case.spec(), max_concurrent_configs=1).configs[0]
    seeding = config.seeding
    assert seeding is not None
    return {
        "case": label,
        "predicted": [seeding.predicted_max_batch_size, seeding.predicted_first_failing_batch_size],
        "predict_trials": seeding.predict_trials,
        "device_sizes": [
            f"{t.batch_size}{'' if t.outcome is Outcome.FIT else 'x'}"
            f"{'c' if t.optimizer_steps >= case.spec().confirm_optimizer_steps else ''}"
            for t in config.trials
        ],
        "device_trials": len(config.trials),
        "device_seconds": round(time.perf_counter() - started, 2),
        "prediction_right": seeding.prediction_right,
        "answer": [config.max_batch_size, config.first_failing_batch_size],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.seeded_search", description=__doc__.splitlines()[0]
    )
    parser.add_argument("truth", nargs="?", type=Path, default=DEFAULT_TRUTH)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases")
    parser.add_argument("--engine", action="store_true", help="through probes.engine.run_probe")
    args = parser.parse_args(argv)

    from probes.isolate import child_context

    rows = [
        r for r in json.loads(args.truth.read_text(encoding="utf-8"))["rows"] if r["finder"] == "exhaustive"
    ]
    truth = {r["case"]: r for r in rows}
    labels = list(truth)[: args.cases]
    print(f"$ python -m bench.seeded_search {' '.join(argv if argv is not None else sys.argv[1:])}")
    started = time.monotonic()
    pool: concurrent.futures.Executor
    if args.engine:  # the engine starts its own children: threads drive it
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel)
    else:
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=args.parallel, mp_context=child_context())
    with pool:
        results = list(pool.map(_one_case_through_the_engine if args.engine else _one_case, labels))
    wall = time.monotonic() - started
    print(f"{'case':<30} {'predicted':>10} {'right':>5}  {'device sizes':<22} {'answer':>6} {'truth':>5}")
    wrong = 0
    for result in results:
        expected = truth[result["case"]]["largest_fit"]
        wrong += result["answer"][0] != expected
        predicted = "{}/{}".format(*result["predicted"])
        print(
            f"{result['case']:<30} {predicted:>10} {result['prediction_right']!s:>5}  "
            f"{' '.join(result['device_sizes']):<22} {result['answer'][0]!s:>6} {expected!s:>5}"
        )
    count = len(results)
    mean_device = sum(r["device_trials"] for r in results) / count
    mean_predict = sum(r["predict_trials"] for r in results) / count
    exhaustive = sum(r["trials"] for r in rows if r["case"] in labels) / count
    right = sum(r["prediction_right"] is True for r in results)
    print(
        f"{count} cases: device trials {mean_device:.2f} per config (confirmation included; "
        f"exhaustive truth {exhaustive:.2f}), predict trials {mean_predict:.2f} per config (CPU); "
        f"prediction right {right}/{count}; answers equal to the truth {count - wrong}/{count}; "
        f"wall {wall:.1f} s, {args.parallel} at a time"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"wall_seconds": round(wall, 1), "rows": results}, indent=1), encoding="utf-8"
        )
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
