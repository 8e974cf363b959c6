"""What recording a trial's memory timeline costs, and how big the timeline is.

``python -m bench.timeline_cost [--repeat 200000] [--full-7b]``

1. Per event, in the counting mode's hot path: a loop of ``torch.empty(16)`` allocations and
   releases under a :class:`probes.devices.counting.CountingMode` (real CPU tensors, the cheapest
   op there is), with and without :meth:`~probes.devices.counting.CountingMode.recording`; the
   difference per allocation-and-release pair. For scale: an op on fake tensors costs ~100-200 us
   (``bench/RESULTS.md``, predict section).
2. ``--full-7b``: one trial of the Llama-7B shape (seq 2048, 2 optimizer steps x accumulation 2,
   ``bf16-true`` with checkpointing, ``predict`` for an H100-80GB) with its timeline: events,
   allocations, plain JSON and packed (``Timeline.to_wire``) sizes, and the replayed peak against
   the trial's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _loop(repeat: int, *, record: bool) -> float:
    import torch

    from probes.devices.counting import CountingMode

    mode = CountingMode()
    started = time.perf_counter()
    with mode:
        if record:
            with mode.recording():
                for _ in range(repeat):
                    tensor = torch.empty(16)
                    del tensor
        else:
            for _ in range(repeat):
                tensor = torch.empty(16)
                del tensor
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.timeline_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repeat", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--full-7b", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    plain, recorded = [], []
    for _ in range(args.rounds):
        plain.append(_loop(args.repeat, record=False))
        recorded.append(_loop(args.repeat, record=True))
    per_plain = statistics.median(plain) / args.repeat * 1e6
    per_recorded = statistics.median(recorded) / args.repeat * 1e6
    print(
        f"allocation + release under the counting mode: {per_plain:.2f} us plain, {per_recorded:.2f} us "
        f"recorded (median of {args.rounds} rounds of {args.repeat}): "
        f"{per_recorded - per_plain:+.2f} us a pair"
    )
    if args.full_7b:
        from probes.spec import ConfigTask, ModelSpec, Precision
        from probes.trial import TrialSession

        task = ConfigTask(
            model=ModelSpec(architecture="llama", config={}),
            seq_len=2048,
            precision=Precision.BF16_TRUE,
            gradient_checkpointing=True,
            device="predict",
            gpu="H100-80GB",
        )
        with TrialSession(task) as session:
            started = time.perf_counter()
            record, timeline = session.run_with_timeline(2, accumulation_steps=2, optimizer_steps=2)
            seconds = time.perf_counter() - started
        assert timeline is not None, record.message
        packed = len(json.dumps(timeline.to_wire()))
        plain_json = len(json.dumps([timeline.sizes, timeline.events, timeline.ops]))
        print(
            f"7B trial (b=2, {seconds:.1f} s): {len(timeline.events):,} events, {timeline.allocations:,} "
            f"allocations; JSON {plain_json:,} B, packed {packed:,} B; replayed peak "
            f"{timeline.peak_bytes():,}, the trial's {record.peak_bytes:,}: "
            f"{'equal' if timeline.peak_bytes() == record.peak_bytes else 'DIFFERENT'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
