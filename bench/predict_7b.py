"""How long and how much memory a ``predict`` probe of a 7B shape takes, through the real CLI path.

``python -m bench.predict_7b [--gpu H100-80GB] [--seq-len 2048] [--architecture llama]
[--confirm-steps N] [--parallel N]``

Runs ``maxbatch probe --architecture llama --seq-len 2048 --target-batch-size 256 --device predict
--gpu H100-80GB --json`` (LlamaConfig's defaults are Llama-2-7B's shape: 32 layers, 4096 wide,
vocabulary 32000; all 8 configs) as a subprocess, and watches its whole process tree through
``/proc`` every 0.1 s: wall time, CPU time summed over every process (the CLI, the forkserver,
each trial child), the largest peak RSS (``VmHWM``) of any one process, and the largest sum of
RSS over the tree at one moment. It prints the result per config and the totals against the
targets (2 minutes, 2 GiB).

Two options measure engine changes without making them: ``--confirm-steps 2`` (the CLI's own
flag: on ``predict`` a confirmation repeats a deterministic computation, so 2 steps give the peak a
4-step one gives, bar the 512-byte loss each extra micro-step keeps) and ``--parallel N``: one
``maxbatch probe`` per config, ``N`` at a time (what the engine would gain by running configs
concurrently; each process also pays its own start, forkserver and inspection, so this is an
upper bound on the time a parallel engine would take).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.proctree import TreeWatch

GiB = 2**30
TARGET_SECONDS = 120.0
TARGET_RSS_BYTES = 2 * GiB
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")


def _command(args: argparse.Namespace, config: tuple[str, str] | None = None) -> list[str]:
    maxbatch = Path(sys.executable).with_name("maxbatch")
    extra = ["--confirm-steps", str(args.confirm_steps)] if args.confirm_steps else []
    if config is not None:
        extra += ["--precision", config[0], "--checkpointing", config[1]]
    return [
        str(maxbatch),
        "probe",
        "--architecture",
        args.architecture,
        "--seq-len",
        str(args.seq_len),
        "--target-batch-size",
        str(args.target_batch_size),
        "--device",
        "predict",
        "--gpu",
        args.gpu,
        "--json",
        *extra,
    ]


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def _report(result: dict[str, Any]) -> None:
    device = result["device"]
    print(
        f"device: {device['name']}  total {_gib(device['total_memory_bytes'])} GiB  "
        f"overhead {_gib(device['overhead_bytes'])} GiB  capability {device['compute_capability']}"
    )
    header = ("precision", "ckpt", "status", "max", "fail", "trials", "peak GiB")
    print("{:<11} {:<5} {:<8} {:>5} {:>5} {:>6} {:>9}  reason".format(*header))
    for config in result["configs"]:
        print(
            f"{config['precision']:<11} {('on' if config['gradient_checkpointing'] else 'off'):<5} "
            f"{config['status']:<8} {config['max_batch_size'] or '-':>5} "
            f"{config['first_failing_batch_size'] or '-':>5} {len(config['trials']):>6} "
            f"{_gib(config['peak_memory_bytes']):>9}  {config['reason'] or ''}"
        )
    recommendation = result.get("recommendation")
    if recommendation:
        plan = recommendation["plan"]
        print(
            f"recommendation: {recommendation['precision']}, checkpointing "
            f"{'on' if recommendation['gradient_checkpointing'] else 'off'}, "
            f"{plan['per_device_train_batch_size']} x {plan['gradient_accumulation_steps']} accumulation"
        )


def _probe(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _probe_split(args: argparse.Namespace) -> dict[str, Any]:
    """One ``maxbatch probe`` per config, ``args.parallel`` at a time; their configs merged in order."""
    configs = [(precision, checkpointing) for precision in PRECISIONS for checkpointing in ("off", "on")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(_probe, [_command(args, config) for config in configs]))
    merged = dict(results[0])
    merged["configs"] = [config for result in results for config in result["configs"]]
    merged["recommendation"] = None
    merged["elapsed_seconds"] = max(result["elapsed_seconds"] for result in results)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predict_7b", description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="llama")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--target-batch-size", type=int, default=256)
    parser.add_argument("--gpu", default="H100-80GB")
    parser.add_argument("--confirm-steps", type=int, help="pass --confirm-steps to maxbatch probe")
    parser.add_argument("--parallel", type=int, help="one probe per config, this many at a time")
    parser.add_argument("--save", type=Path, help="write the probe's JSON result here")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        parser.error("needs /proc (Linux) to watch the process tree")

    print(
        "$ "
        + " ".join(_command(args))
        + (f"  (one per config, {args.parallel} at a time)" if args.parallel else "")
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    watch = TreeWatch(os.getpid())
    sampler = threading.Thread(target=watch.run, daemon=True)
    started = time.monotonic()
    sampler.start()
    try:
        result = _probe_split(args) if args.parallel else _probe(_command(args))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        wall = time.monotonic() - started
        watch.stop()
        sampler.join()
    if args.save is not None:
        args.save.write_text(json.dumps(result), encoding="utf-8")
    _report(result)
    children = [pid for pid in watch.peak_rss if pid != os.getpid()]
    cpu = sum(watch.cpu_seconds[pid] for pid in children)
    largest = max((watch.peak_rss[pid] for pid in children), default=0)
    trials = sum(len(c["trials"]) for c in result["configs"])
    print(f"processes watched: {len(children)}  trials: {trials}")
    print(f"wall {wall:.1f} s (target < {TARGET_SECONDS:.0f} s)  CPU {cpu:.1f} s over the tree")
    print(
        f"peak RSS of one process {_gib(largest)} GiB, of the whole tree at once "
        f"{_gib(watch.max_tree_rss)} GiB (target < {_gib(TARGET_RSS_BYTES)} GiB)"
    )
    meets = wall < TARGET_SECONDS and watch.max_tree_rss < TARGET_RSS_BYTES
    print("meets the targets" if meets else "MISSES the targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
