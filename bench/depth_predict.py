"""``predict`` through the issue-11 instruments, called directly, config by config.

The engine runs the same on ``predict`` (``probes/deep_predict.py``); this bench keeps the
instruments' own timings and ``--full-depth-check``. Whole probes through the CLI:
``bench/predict_llama3_8b.py`` (``--shape 8b|70b|405b``).

``python -m bench.depth_predict [--shape 7b|70b|405b] [--seq-len N] [--gpu H100-80GB] [--parallel 2]
[--full-depth-check PRECISION:CKPT] [--json PATH]``

``--gpu none`` predicts for an uncapped device (2**50 bytes): every config then measures its whole
curve, which is what a card too small for the model's training state never gets to (the floor
check answers "nothing fits" without a trial).

For every config (4 precisions x checkpointing off/on) of a Llama shape it runs
:func:`probes.curve.measure_curve` on the ``predict`` device for the card: the floor check (weights,
gradients and AdamW state against the card), then timelines at batch sizes 2 and 3 of the model cut
to 3, 4 and 5 layers, the affine fit, the depth extrapolation, and batch size 1 where 2 does not fit.
It prints per config the ladder answer (largest fitting size, first failing size), the trials run
and the seconds, and the wall time of all configs (``--parallel`` at a time, each in its own process,
as the engine runs configs two at a time on CPU devices).

``--full-depth-check precision:ckpt`` then runs the real-depth model on an uncapped ``predict``
device (fake tensors, no card: a 70B does not fit one) at batch sizes 2 and 3, and compares its
counted peaks with the extrapolated curve's, to the byte, with the time each took.

Shapes: ``7b`` is ``LlamaConfig``'s defaults (Llama-2-7B: 32 layers, 4096 wide, vocabulary 32000);
``70b`` Llama-2-70B (80 layers, 8192 wide, 28672 MLP, 64 heads, GQA 8); ``405b`` Llama-3.1-405B
(126 layers, 16384 wide, 53248 MLP, 128 heads, GQA 8, vocabulary 128256).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

GiB = 2**30
SHAPES: dict[str, dict[str, Any]] = {
    "7b": {},
    "70b": {
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "405b": {
        "num_hidden_layers": 126,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    },
}
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")


def _task(shape: str, seq_len: int, precision: str, checkpointing: bool, *, gpu: str | None) -> Any:
    from probes.spec import ConfigTask, ModelSpec, Precision

    return ConfigTask(
        model=ModelSpec(architecture="llama", config=SHAPES[shape]),
        seq_len=seq_len,
        precision=Precision(precision),
        gradient_checkpointing=checkpointing,
        device="predict",
        gpu=gpu,
        memory_limit_bytes=None if gpu is not None else 2**50,
    )


def _one_config(job: tuple[str, int, str, bool, str | None]) -> dict[str, Any]:
    """One config's curve, in a worker process."""
    import torch

    from probes.curve import measure_curve
    from probes.trial import TrialSession

    torch.set_num_threads(1)
    shape, seq_len, precision, checkpointing, gpu = job
    task = _task(shape, seq_len, precision, checkpointing, gpu=gpu)
    with TrialSession(task) as session:
        capacity = session.device.capacity_bytes
    outcome = measure_curve(task)
    answer: tuple[int | None, int | None] = (None, 1) if outcome.nothing_fits else (None, None)
    peak = None
    if outcome.curve is not None:
        answer = outcome.curve.ladder_bracket(capacity)
        if answer[0] is not None:
            peak = outcome.curve.peak(answer[0])
    return {
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "max_batch_size": answer[0],
        "first_failing_batch_size": answer[1],
        "peak_bytes": peak,
        "capacity_bytes": capacity,
        "trials": outcome.trials,
        "depths": list(outcome.depths),
        "seconds": round(outcome.seconds, 2),
        "reason": outcome.reason,
        "notes": outcome.notes,
    }


def _full_depth_check(shape: str, seq_len: int, precision: str, checkpointing: bool) -> dict[str, Any]:
    """Extrapolated curve vs the real-depth model's trials, uncapped, in this process."""
    import torch

    from probes.curve import measure_curve
    from probes.trial import TrialSession

    torch.set_num_threads(1)
    task = _task(shape, seq_len, precision, checkpointing, gpu=None)
    outcome = measure_curve(task)
    if outcome.curve is None:
        return {"error": outcome.reason}
    full: dict[int, tuple[int | None, float]] = {}
    with TrialSession(task) as session:
        for batch_size in (2, 3):
            started = time.perf_counter()
            record = session.run(batch_size, accumulation_steps=2, optimizer_steps=2)
            full[batch_size] = (record.peak_bytes, time.perf_counter() - started)
    return {
        "config": f"{precision} ckpt {'on' if checkpointing else 'off'}",
        "extrapolated_seconds": round(outcome.seconds, 1),
        "extrapolation_trials": outcome.trials,
        "full_depth_seconds": {b: round(s, 1) for b, (_, s) in full.items()},
        "peaks": {
            b: {"extrapolated": outcome.curve.peak(b), "full_depth": peak} for b, (peak, _) in full.items()
        },
        "equal": all(outcome.curve.peak(b) == peak for b, (peak, _) in full.items()),
    }


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.depth_predict", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--gpu", default="H100-80GB", help="a card of the predict table, or 'none' for an uncapped device"
    )
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--full-depth-check", metavar="PRECISION:CKPT", help="e.g. bf16-true:on")
    parser.add_argument("--skip-configs", action="store_true", help="only the full-depth check")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from probes.isolate import child_context

    print(f"$ python -m bench.depth_predict {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    report: dict[str, Any] = {"shape": args.shape, "seq_len": args.seq_len, "gpu": args.gpu}
    if not args.skip_configs:
        gpu = None if args.gpu.lower() == "none" else args.gpu
        jobs = [(args.shape, args.seq_len, p, c, gpu) for p in PRECISIONS for c in (False, True)]
        started = time.monotonic()
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=args.parallel, mp_context=child_context()
        ) as pool:
            rows = list(pool.map(_one_config, jobs))
        wall = time.monotonic() - started
        print(
            f"{'precision':<11} {'ckpt':<5} {'max':>5} {'fail':>5} {'trials':>6} {'peak GiB':>9} "
            f"{'s':>7}  notes"
        )
        for row in rows:
            print(
                f"{row['precision']:<11} {('on' if row['gradient_checkpointing'] else 'off'):<5} "
                f"{row['max_batch_size'] or '-':>5} {row['first_failing_batch_size'] or '-':>5} "
                f"{row['trials']:>6} {_gib(row['peak_bytes']):>9} {row['seconds']:>7}  "
                f"{row['reason'] or ''} {'; '.join(row['notes'])}"
            )
        print(
            f"wall {wall:.1f} s for {len(rows)} configs, {args.parallel} at a time; "
            f"trials {sum(r['trials'] for r in rows)}"
        )
        report["configs"] = rows
        report["wall_seconds"] = round(wall, 1)
    if args.full_depth_check:
        precision, _, checkpointing = args.full_depth_check.partition(":")
        check = _full_depth_check(args.shape, args.seq_len, precision, checkpointing == "on")
        print("full-depth check:", json.dumps(check, indent=1))
        report["full_depth_check"] = check
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
