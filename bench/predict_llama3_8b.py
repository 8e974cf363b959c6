"""Llama-3-8B fine-tuned on 8 x H100-80GB: the whole ``predict`` probe, timed, through the real CLI.

``python -m bench.predict_llama3_8b [--save RESULT.json] [--strategy fsdp ...] [--finetuning lora]
[--shape 8b|70b|405b] [--sync-each-batch] [--world-size N]``

``--shape 70b``/``405b`` probe the Llama-2-70B and Llama-3.1-405B shapes of ``bench.depth_predict``
(``--architecture llama --config-json …``) instead of the 8B ``config.json``; their targets are
2 and 3 minutes (issue 11). Since the engine answers deep models on ``predict`` from the model cut
to 3, 4 and 5 layers (``probes/deep_predict.py``), the report says per config which path answered.

Runs ``maxbatch probe --model bench/models/llama-3-8b --seq-len 4096 --world-size 8
--target-batch-size 256 --device predict --gpu H100-80GB --json`` (the published ``config.json``:
hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary 128256, rope theta
500000, 8192 positions, untied embeddings; the default strategies for 8 ranks, DDP and FSDP, in
all 4 precisions with checkpointing off and on: 16 configs) as a subprocess and watches its process
tree through ``/proc`` (:class:`bench.predict_7b.TreeWatch`): wall time, CPU time over every
process, the largest RSS. The target is under 3 minutes of wall time on 2 cores. On a shared machine
the wall time includes other people's load; the CPU time does not, and divided by the cores it
bounds what an idle machine would take.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.predict_7b import GiB
from bench.proctree import TreeWatch

MODEL = Path(__file__).resolve().parent / "models" / "llama-3-8b"
CHECKOUT = Path(__file__).resolve().parent.parent


def checkout_environment() -> dict[str, str]:
    """The environment with this checkout first on ``PYTHONPATH``: a worktree's ``.venv`` may be a
    link to another checkout's, whose ``maxbatch`` script would otherwise import that checkout."""
    paths = [str(CHECKOUT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


TARGETS = {"8b": 180.0, "70b": 120.0, "405b": 180.0}


def command(
    strategies: list[str],
    finetuning: str | None = None,
    shape: str = "8b",
    *,
    sync_each_batch: bool = False,
    world_size: int = 8,
) -> list[str]:
    maxbatch = Path(sys.executable).with_name("maxbatch")
    extra = [flag for strategy in strategies for flag in ("--strategy", strategy)]
    if finetuning is not None:
        extra += ["--finetuning", finetuning]
    if sync_each_batch:
        extra.append("--sync-each-batch")
    if shape == "8b":
        model = ["--model", str(MODEL)]
    else:
        from bench.depth_predict import SHAPES

        model = ["--architecture", "llama", "--config-json", json.dumps(SHAPES[shape])]
    return [
        str(maxbatch),
        "probe",
        *model,
        "--seq-len",
        "4096",
        "--world-size",
        str(world_size),
        "--target-batch-size",
        "256",
        "--device",
        "predict",
        "--gpu",
        "H100-80GB",
        "--json",
        *extra,
    ]


def report(result: dict[str, Any]) -> None:
    print(
        "{:<11} {:<5} {:<7} {:>5} {:>5} {:>6} {:>9} {:<6}  reason".format(
            "precision", "ckpt", "strategy", "max", "fail", "trials", "peak GiB", "depth"
        )
    )
    for config in result["configs"]:
        peak = config["peak_memory_bytes"]
        depth = config.get("depth_extrapolation") or {}
        path = "-" if not depth else ("cut" if depth["extrapolated"] else "full")
        print(
            f"{config['precision']:<11} {('on' if config['gradient_checkpointing'] else 'off'):<5} "
            f"{config['strategy']:<7} {config['max_batch_size'] or '-':>5} "
            f"{config['first_failing_batch_size'] or '-':>5} {len(config['trials']):>6} "
            f"{'-' if peak is None else f'{peak / GiB:.2f}':>9} {path:<6}  {config['reason'] or ''}"
        )
        if depth:
            print(f"    {depth['note']}")
    recommendation = result.get("recommendation")
    if recommendation:
        plan = recommendation["plan"]
        print(
            f"recommendation: {recommendation['strategy']}, {recommendation['precision']}, checkpointing "
            f"{'on' if recommendation['gradient_checkpointing'] else 'off'}: "
            f"{plan['per_device_train_batch_size']} x {plan['gradient_accumulation_steps']} x "
            f"{plan['world_size']} = {plan['effective_batch_size']}"
        )
        print(f"training_arguments: {json.dumps(recommendation['training_arguments'])}")
        if recommendation.get("peft_config"):
            print(f"peft_config: {json.dumps(recommendation['peft_config'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.predict_llama3_8b", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--strategy", action="append", default=[], help="limit the strategies (repeat)")
    parser.add_argument("--finetuning", choices=["full", "lora", "qlora"], help="default: full")
    parser.add_argument("--save", type=Path, help="write the probe's JSON result here")
    parser.add_argument("--shape", choices=sorted(TARGETS), default="8b", help="default: 8b")
    parser.add_argument(
        "--sync-each-batch", action="store_true", help="fsdp: reduce-scatter every micro-batch (Accelerate's)"
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=8,
        help="GPUs of the job (default 8; the 405B shape's state fits 80 GB cards from 64 under FSDP)",
    )
    args = parser.parse_args(argv)
    argv_shown = command(
        args.strategy,
        args.finetuning,
        args.shape,
        sync_each_batch=args.sync_each_batch,
        world_size=args.world_size,
    )
    print("$ " + " ".join(argv_shown))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    watch = TreeWatch(os.getpid())
    sampler = threading.Thread(target=watch.run, daemon=True)
    started = time.monotonic()
    sampler.start()
    try:
        done = subprocess.run(
            argv_shown, capture_output=True, text=True, check=False, env=checkout_environment()
        )
    finally:
        wall = time.monotonic() - started
        watch.stop()
        sampler.join()
    if done.returncode != 0:
        print(f"exit {done.returncode}: {done.stderr.strip()[-2000:]}", file=sys.stderr)
        return 1
    result = json.loads(done.stdout)
    if args.save is not None:
        args.save.write_text(json.dumps(result, indent=1), encoding="utf-8")
    report(result)
    children = [pid for pid in watch.peak_rss if pid != os.getpid()]
    cpu = sum(watch.cpu_seconds[pid] for pid in children)
    trials = sum(len(c["trials"]) for c in result["configs"])
    cores = os.cpu_count() or 1
    print(f"configs: {len(result['configs'])}  trials: {trials}  processes: {len(children)}")
    print(
        f"wall {wall:.1f} s (target < {TARGETS[args.shape]:.0f} s), CPU {cpu:.1f} s over the tree "
        f"(/ {cores} cores = {cpu / cores:.1f} s), load average now {os.getloadavg()[0]:.1f}"
    )
    print(f"largest RSS of one process {max((watch.peak_rss[p] for p in children), default=0) / GiB:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
