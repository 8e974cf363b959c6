"""Depth extrapolation against full depth, for every covered family in every config (issue 11).

``python -m bench.depth_families [--depth 12] [--device simulated] [FAMILY ...]``

For each family of ``tests/probes/tiny_families.py`` (default: all), precision and checkpointing
setting: timelines at batch sizes 2 and 3 of the tiny model (64 wide, seq 32) cut to the base
depths of its :func:`probes.depth.depth_plan`, the extrapolation to ``--depth`` layers, and the
same timelines of the ``--depth``-layer model itself. A line per config says ``exact`` when the
extrapolated step equals the full-depth step run for run (so every batch size's peak is the same
to the byte), ``DIFF`` otherwise, or why there is no plan or no fit; and the seconds each part
took. Families not in ``EXACT_FAMILIES`` are tried as if they were (that is how they get in).
"""

from __future__ import annotations

import argparse
import sys
import time

from probes.spec import Precision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.depth_families", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--device", default="simulated", choices=("simulated", "predict"))
    parser.add_argument("families", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from probes import depth
    from probes.models import load_config
    from probes.spec import ConfigTask, ModelSpec
    from probes.timeline import AffineTimeline, ShapeMismatch, fit_affine
    from probes.trial import TrialSession
    from tests.probes.tiny_families import FAMILIES, attn_implementation, tiny

    torch.set_num_threads(1)

    def affine(family: str, precision: Precision, checkpointing: bool, layers: int) -> AffineTimeline:
        task = ConfigTask(
            model=ModelSpec(architecture=family, config=tiny(family, layers=layers)),
            seq_len=32,
            precision=precision,
            gradient_checkpointing=checkpointing,
            attn_implementation=attn_implementation(family),
            device=args.device,
            memory_limit_bytes=2**34,
        )
        with TrialSession(task) as session:
            timelines = [
                session.run_with_timeline(b, accumulation_steps=2, optimizer_steps=2)[1] for b in (2, 3)
            ]
        if timelines[0] is None or timelines[1] is None:
            raise ShapeMismatch("a trial did not run to the end")
        return fit_affine(timelines[0], timelines[1])

    exact = other = 0
    for family in args.families or list(FAMILIES):
        spec = ModelSpec(architecture=family, config=tiny(family, layers=args.depth))
        config = load_config(spec, allow_remote_code=False).to_dict()
        covered = depth.EXACT_FAMILIES
        depth.EXACT_FAMILIES = frozenset({family})  # try it as if covered
        plan = depth.depth_plan(family, config)
        depth.EXACT_FAMILIES = covered
        if isinstance(plan, str):
            print(f"{family} no plan: {plan}", flush=True)
            continue
        for precision in Precision:
            for checkpointing in (False, True):
                label = f"{family} {precision.value} ckpt {'on' if checkpointing else 'off'}"
                started = time.perf_counter()
                try:
                    bases = {d: affine(family, precision, checkpointing, d) for d in plan.base_depths}
                    base_seconds = time.perf_counter() - started
                    extrapolated = depth.extrapolate_depth(bases, args.depth)
                    extrapolation_seconds = time.perf_counter() - started - base_seconds
                    full = affine(family, precision, checkpointing, args.depth)
                    full_seconds = time.perf_counter() - started - base_seconds - extrapolation_seconds
                except ShapeMismatch as exc:
                    other += 1
                    print(f"{label} {type(exc).__name__}: {exc}", flush=True)
                    continue
                same = depth.same_step(extrapolated, full)
                exact += same
                other += not same
                print(
                    f"{label} bases {plan.base_depths} {'exact' if same else 'DIFF'} "
                    f"(bases {base_seconds:.1f} s, extrapolation {extrapolation_seconds:.2f} s, "
                    f"{args.depth} layers {full_seconds:.1f} s)",
                    flush=True,
                )
    print(f"{exact} exact, {other} not")
    return 0


if __name__ == "__main__":
    sys.exit(main())
