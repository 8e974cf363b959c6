"""How much host memory a ``simulated`` trial process holds beyond the tensors the device counts.

``python -m bench.trial_host_memory [--max-batch N]`` runs, for each case below, trials at batch
sizes 1, 2, 4, … (up to the first that does not fit, or ``--max-batch``) in one process that has
imported what the trial forkserver preloads, and samples the process's private data (``VmData``,
what ``RLIMIT_DATA`` counts) every 0.5 ms from a thread. Per trial it prints the counted peak, the
largest private data seen and their difference: what a trial child's host-memory ceiling must
allow beyond the simulated cap (``probes/hostmem.py``: the allowance and ``CAP_SLACK``).
Each case runs in its own subprocess, so every one starts from the same baseline. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30
SMALL_LLAMA = {
    "num_hidden_layers": 4,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
CASES: list[tuple[str, dict[str, Any], int, int, str, bool]] = [
    # architecture, config overrides, seq_len, cap, precision, checkpointing
    ("gpt2", {"n_layer": 4, "n_embd": 256, "n_head": 4}, 256, 512 * MiB, "32-true", False),
    ("gpt2", {"n_layer": 4, "n_embd": 256, "n_head": 4}, 256, 512 * MiB, "bf16-mixed", True),
    ("llama", SMALL_LLAMA, 512, GiB, "bf16-true", True),
    ("gpt2", {}, 128, 4 * GiB, "32-true", False),
]


def _data_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData"):
            return int(line.split()[1]) * 1024
    return 0


def measure(case: list[Any], max_batch: int) -> dict[str, Any]:
    """Child mode: one case's trials, the private data sampled around each."""
    import torch

    import probes.worker  # noqa: F401 — what the forkserver preloads: the same baseline
    from probes.spec import ConfigTask, ModelSpec, Outcome, Precision
    from probes.trial import TrialSession

    torch.set_num_threads(1)
    architecture, config, seq_len, cap, precision, checkpointing = case
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _data_bytes())
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    task = ConfigTask(
        model=ModelSpec(architecture=architecture, config=config),
        seq_len=seq_len,
        precision=Precision(precision),
        gradient_checkpointing=checkpointing,
        device="simulated",
        memory_limit_bytes=cap,
    )
    baseline = _data_bytes()
    trials = []
    with TrialSession(task) as session:
        batch = 1
        while True:
            peak[0] = _data_bytes()
            record = session.run(batch, accumulation_steps=2, optimizer_steps=2)
            trials.append(
                {
                    "batch_size": batch,
                    "outcome": record.outcome.value,
                    "counted": record.peak_reserved_bytes,
                    "data": peak[0],
                }
            )
            if record.outcome is not Outcome.FIT or batch >= max_batch:
                break
            batch *= 2
    stop.set()
    return {"case": case, "baseline": baseline, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["_case"]:
        print(json.dumps(measure(json.loads(args_list[1]), int(args_list[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--max-batch", type=int, default=4, help="largest batch size tried per case")
    args = parser.parse_args(args_list)
    print("| case | cap | batch | outcome | counted peak | private data | data − counted |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        out = subprocess.run(
            [sys.executable, "-m", "bench.trial_host_memory", "_case", json.dumps(case), str(args.max_batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        name = f"{case[0]} {json.dumps(case[1])} seq {case[2]} {case[4]} ckpt {'on' if case[5] else 'off'}"
        for trial in result["trials"]:
            counted = trial["counted"]
            over = "-" if counted is None else f"{(trial['data'] - counted) / MiB:.0f} MiB"
            shown = "-" if counted is None else f"{counted / MiB:.0f} MiB"
            data = f"{trial['data'] / MiB:.0f} MiB"
            print(
                f"| {name} (baseline {result['baseline'] / MiB:.0f} MiB) | {case[3] / MiB:.0f} MiB | "
                f"{trial['batch_size']} | {trial['outcome']} | {shown} | {data} | {over} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
