"""Every GPU check of the open issues in one time-boxed run, written as one table.

Run from the repository root on a machine with a CUDA GPU (at most about 16 minutes: the parts'
time limits add up to 945 s; ``--parts 7`` runs the distributed checks alone, at most 4 minutes)::

    python -m bench.gpu_check --out "$OUT"

Parts, each in its own subprocess with a timeout; a part that fails or runs out of time is recorded
and the next one runs; the report is rewritten after every part, so a killed run leaves what it had:

1. ``pytest -m gpu tests/gpu`` but ``test_ray_gpu.py`` (part 6 runs the fleet);
2. ``python -m probes run`` on a ~1B Llama (seq 2048) in 32-true and bf16-mixed, checkpointing off
   and on, under a memory limit: max batch per config, trials, seconds (from the probe's events);
   and (issue 11 item 6) the order the FLOPs estimate ranks those configs in on this card against
   their measured tokens/s;
3. predicted against measured peak: one trial per config on ``predict`` (fake tensors, same memory
   limit, no overhead added) and on ``cuda:0``, for a ~1B and a ~7B Llama, two precisions,
   checkpointing off and on; the ratio and the difference calibrate ``probes/overhead.py``; for a
   config whose trial adds a packed micro-batch (32-true: grouped K/V heads), also a trial of packed
   batches only, which the trial's peak must cover;
4. ``python -m bench.compare_finders --profile cuda``, cut off by a time budget;
5. LoRA and QLoRA (issue 9): one trial per method and checkpointing on ``predict`` and ``cuda:0``
   (~1B Llama, bf16-mixed), the predicted against the allocated peak;
6. (``--parts 6``, not in the default set) the fleet: a single-node Ray cluster on this GPU
   (``ray start --head``), ``maxbatch serve`` with ``MAXBATCH_DISPATCHER=ray``, one probe placed by
   the GPU type the service lists, against the same probe run directly on ``cuda:0``;
7. issue 9, strategies: DDP on a one-rank NCCL group and FSDP2 on a fake group of 8 against
   ``predict`` (verdict: the prediction covers what was allocated), the fp32 attention kernel
   predicted within 5 % (against the whole card, where its trial fits), and a 20-step soak at the
   engine's FSDP size (see the block near the end); a pair gets a verdict only when both trials fit.
8. host-memory ceilings on cuda (issue 12): one trial of the ~1B Llama in a trial child under
   ``RLIMIT_DATA`` of none, 16, 8, 4 and 2 GiB: does CUDA start and train under it, and what the
   child's peak RSS is (what ``MAXBATCH_PROBE_CUDA_HOST_MEMORY_BYTES`` must leave room for);
9. (``--parts 9 10``, issue 11, at most 570 s, against the whole card: under the 32 GiB probe
   limit the 7B fits nothing) a ~0.85B and a 7B Llama (bf16-mixed, checkpointing off and on)
   searched on ``cuda:0`` by the trial loop with the plain search and with the predict-seeded one
   (GPU trials, GPU-seconds of the trials alone, same answers), then by the whole engine
   (``run_probe``, fresh children, the confirmation) with ``predict_seeding`` off and on: the
   device's trials per config and the probe's wall time, which is what holds the GPU;
10. then, at every size part 9 returned, the engine's confirmation on cuda (worst case, then
   varied lengths, the derived headroom) and :data:`SOAK_STEPS` optimizer steps under dynamic
   padding, with the request's default ``PYTORCH_CUDA_ALLOC_CONF`` set as a trial child sets it:
   no out-of-memory, reserved - allocated of both.

Needs torch (CUDA), transformers and pydantic; Lightning and Accelerate for part 4. Never imports
``app`` (FastAPI is not needed). Without a GPU it says so and exits with code 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GiB = 2**30

LLAMA_1B: dict[str, Any] = {
    "num_hidden_layers": 16,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
"""~0.85B parameters (TinyLlama's widths, 16 layers)."""

LLAMA_7B: dict[str, Any] = {}
"""LlamaConfig's defaults: 32 layers, hidden 4096, ~6.7B parameters."""

PEAK_SHAPES: dict[str, tuple[dict[str, Any], int, int]] = {
    # shape: (config overrides, seq_len, batch size of the one trial)
    "llama-1b": (LLAMA_1B, 2048, 2),
    "llama-7b": (LLAMA_7B, 1024, 1),
}
PRECISIONS = ("32-true", "bf16-mixed")


@dataclass
class Part:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)
    data: Any = None


# -- running a subprocess, time-boxed --------------------------------------------------------------


@dataclass
class Ran:
    returncode: int | None
    timed_out: bool
    seconds: float
    #: (seconds since start, line) for every stdout line
    stdout: list[tuple[float, str]]
    stderr_tail: str


def run_streaming(command: list[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> Ran:
    """Run ``command``; timestamp its stdout lines; kill its process group past ``timeout``."""
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    with log.open("a", encoding="utf-8") as log_file:
        log_file.write(f"\n$ {' '.join(command)}\n")
        log_file.flush()
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        errors: list[str] = []

        def pump_out() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append((time.monotonic() - started, line.rstrip("\n")))
                log_file.write(line)

        def pump_err() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                errors.append(line)
                log_file.write(line)

        readers = [
            threading.Thread(target=pump_out, daemon=True),
            threading.Thread(target=pump_err, daemon=True),
        ]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=30)
        for reader in readers:
            reader.join(timeout=10)
    return Ran(
        returncode=process.returncode,
        timed_out=timed_out,
        seconds=time.monotonic() - started,
        stdout=lines,
        stderr_tail="".join(errors[-20:]),
    )


def cuda_available() -> tuple[bool, str]:
    """Whether torch sees CUDA, asked in a throwaway process; and the device's name or the reason."""
    probe = (
        "import torch, sys\n"
        "if not torch.cuda.is_available(): sys.exit(1)\n"
        "p = torch.cuda.get_device_properties(0)\n"
        "print(f'{p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, '\n"
        "      f'torch {torch.__version__}')"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"could not ask torch: {exc}"
    if done.returncode != 0:
        return False, (done.stderr.strip().splitlines() or ["torch.cuda.is_available() is False"])[-1]
    return True, done.stdout.strip()


# -- part 1: the gpu tests -------------------------------------------------------------------------


def part_tests(timeout: float, log: Path) -> Part:
    # test_ray_gpu starts a Ray cluster (15-20 s) and is part 6's subject: left to that part
    part = Part("1. pytest -m gpu tests/gpu (without test_ray_gpu.py: part 6)")
    ran = run_streaming(
        [
            *(sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"),
            *("--deselect", "tests/gpu/test_ray_gpu.py"),
        ],
        timeout,
        log,
    )
    part.seconds = ran.seconds
    tail = [line for _, line in ran.stdout if line.strip()][-1:] or ["(no output)"]
    part.status = (
        "timed out" if ran.timed_out else ("passed" if ran.returncode == 0 else f"failed ({ran.returncode})")
    )
    part.lines = [f"- {part.status} in {ran.seconds:.0f} s: `{tail[0]}`"]
    failed = [line for _, line in ran.stdout if line.startswith(("FAILED", "ERROR"))]
    part.lines += [f"  - {line}" for line in failed[:10]]
    part.data = {"returncode": ran.returncode, "summary": tail[0], "failed": failed}
    return part


# -- part 2: a real probe on a ~1B shape -----------------------------------------------------------


def probe_spec(device: str, memory: int, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
    return {
        "model": {"architecture": "llama", "config": config},
        "seq_len": seq_len,
        "precisions": list(PRECISIONS),
        "gradient_checkpointing": [False, True],
        "target_effective_batch_size": 256,
        "device": device,
        "memory_limit_bytes": memory,
    }


def part_probe(timeout: float, memory: int, log: Path, work: Path, device: str) -> Part:
    """``device``: the card's description from :func:`cuda_available` (names the card to rank for)."""
    part = Part(f"2. probe on cuda:0 — llama ~1B, seq 2048, memory limit {memory / GiB:g} GiB")
    spec_path, result_path = work / "probe-spec.json", work / "probe-result.json"
    spec_path.write_text(json.dumps(probe_spec("cuda:0", memory, LLAMA_1B, 2048)), encoding="utf-8")
    command = [sys.executable, "-m", "probes", "run", "--spec", str(spec_path), "--result", str(result_path)]
    ran = run_streaming(command, timeout, log)
    part.seconds = ran.seconds
    rows: list[dict[str, Any]] = []
    begun = 0.0
    for at, line in ran.stdout:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        event = message.get("event") or {}
        if event.get("kind") == "config_started":
            begun = at
        elif event.get("kind") == "config_done" and event.get("config"):
            config = event["config"]
            trials = config.get("trials") or []
            rows.append(
                {
                    "precision": config["precision"],
                    "checkpointing": config["gradient_checkpointing"],
                    "status": config["status"],
                    "max_batch_size": config.get("max_batch_size"),
                    "first_failing": config.get("first_failing_batch_size"),
                    "trials": len(trials),
                    "ooms": sum(t["outcome"] in ("oom", "over_headroom") for t in trials),
                    "sizes": " ".join(
                        str(t["batch_size"]) + ("" if t["outcome"] == "fit" else "x") for t in trials
                    ),
                    "peak_gib": (config.get("peak_memory_bytes") or 0) / GiB,
                    "tokens_per_second": config.get("tokens_per_second"),
                    "seconds": at - begun,
                    "reason": config.get("reason"),
                }
            )
    part.status = (
        "timed out" if ran.timed_out else ("ok" if ran.returncode == 0 else f"exit {ran.returncode}")
    )
    part.lines = [
        f"- {part.status} in {ran.seconds:.0f} s ({len(rows)} of 4 configs done)",
        "",
        "| precision | checkpointing | max batch | first failing | trials | OOMs | sizes | peak GiB | "
        "tokens/s | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tokens = "-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:.0f}"
        part.lines.append(
            f"| {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {r['max_batch_size']} | "
            f"{r['first_failing']} | {r['trials']} | {r['ooms']} | {r['sizes']} | {r['peak_gib']:.2f} | "
            f"{tokens} | {r['seconds']:.1f} |"
        )
    if ran.returncode not in (0, None) and not rows:
        part.lines.append(f"\n```\n{ran.stderr_tail[-1500:]}\n```")
    if result_path.exists():
        with contextlib.suppress(Exception):  # a report line, never a crashed part
            part.lines += ranking_lines(result_path, device)
    part.data = rows
    return part


def ranking_lines(result_path: Path, device: str) -> list[str]:
    """Issue 11 item 6 on a real GPU: the order ``probes.step_time.rank_configs`` gives the probe's
    configs on this card (what ``predict`` would recommend by) against their measured tokens/s."""
    from probes.models import inspect_model
    from probes.spec import ProbeResult
    from probes.step_time import CARD_THROUGHPUT, ModelShape, rank_configs

    result = ProbeResult.model_validate_json(result_path.read_text(encoding="utf-8"))
    squeezed = device.upper().replace(" ", "")
    card = next((c for c in CARD_THROUGHPUT if c.name.split("-")[0].upper() in squeezed), None)
    if card is None:
        return ["", f"- ranking check: no throughput figure for this card ({device})"]
    facts = inspect_model(result.spec.model, result.spec.seq_len, allow_remote_code=False)
    if facts.layers is None or facts.hidden_size is None:
        return ["", "- ranking check: the model states no layers or hidden size"]
    shape = ModelShape(
        active_parameter_count=facts.active_parameter_count or facts.parameter_count,
        parameter_count=facts.parameter_count,
        layers=facts.layers,
        hidden_size=facts.hidden_size,
    )

    def name(config: Any) -> str:
        return f"{config.precision.value}{' ckpt' if config.gradient_checkpointing else ''}"

    estimated = rank_configs(list(result.configs), shape, card, seq_len=result.spec.seq_len)
    ranked = [name(c) for c, _ in estimated]
    timed = [c for c in result.configs if c.plan is not None and c.tokens_per_second]
    measured = [name(c) for c in sorted(timed, key=lambda c: -(c.tokens_per_second or 0.0))]
    same = [n for n in ranked if n in measured] == measured
    return [
        "",
        f"- ranking check ({card.name}): estimated fastest first {ranked}; measured tokens/s, fastest "
        f"first {measured}; {'same order' if same else 'ORDER DIFFERS'}",
    ]


# -- part 3: predicted against measured peaks ------------------------------------------------------


def peaks_worker(device: str, memory: int, out: Path) -> None:
    """Child mode: one trial per (shape, precision, checkpointing) on ``device``; JSON lines to ``out``."""
    import torch

    from probes.padding import unpadded_micro_batch
    from probes.spec import ConfigTask, ModelSpec, Precision
    from probes.trial import TrialSession

    for shape, (config, seq_len, batch) in PEAK_SHAPES.items():
        for precision in PRECISIONS:
            for checkpointing in (False, True):
                task = ConfigTask(
                    model=ModelSpec(architecture="llama", config=config),
                    seq_len=seq_len,
                    precision=Precision(precision),
                    gradient_checkpointing=checkpointing,
                    device=device,
                    memory_limit_bytes=memory,
                )
                row: dict[str, Any] = {
                    "shape": shape,
                    "precision": precision,
                    "checkpointing": checkpointing,
                    "batch_size": batch,
                    "seq_len": seq_len,
                }
                started = time.monotonic()
                try:
                    with TrialSession(task) as session:
                        trial = session.run(batch, accumulation_steps=2, optimizer_steps=2)
                        row.update(
                            outcome=trial.outcome.value,
                            reserved=trial.peak_reserved_bytes,
                            allocated=trial.peak_allocated_bytes,
                            message=trial.message,
                        )
                        if device.startswith("cuda"):
                            free, total = torch.cuda.mem_get_info()
                            # what the process holds beyond the caching allocator: context, kernel images
                            row["outside_allocator"] = int(total - free - torch.cuda.memory_reserved())
                        if session.recipe.measures_packed_batch:
                            # a job whose batches are all packed, which the trial's packed micro-batch covers
                            session.recipe.measures_packed_batch = False
                            with unpadded_micro_batch():
                                packed = session.run(batch, accumulation_steps=2, optimizer_steps=2)
                            row["packed_only_allocated"] = packed.peak_allocated_bytes
                except Exception as exc:  # noqa: BLE001 - recorded; the next config runs
                    row.update(outcome="error", message=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                row["seconds"] = round(time.monotonic() - started, 2)
                with out.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def part_peaks(timeout: float, memory: int, log: Path, work: Path) -> Part:
    part = Part(
        f"3. predicted (predict, no overhead) vs measured (cuda:0) peak, memory limit {memory / GiB:g} GiB"
    )
    files = {device: work / f"peaks-{device.replace(':', '')}.jsonl" for device in ("cuda:0", "predict")}
    results: dict[str, Ran] = {}

    def go(device: str) -> None:
        command = [sys.executable, "-m", "bench.gpu_check", "_peaks", device, str(memory), str(files[device])]
        results[device] = run_streaming(command, timeout, log)

    threads = [threading.Thread(target=go, args=(device,)) for device in files]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    part.seconds = time.monotonic() - started
    measured = {(r["shape"], r["precision"], r["checkpointing"]): r for r in _read_rows(files["cuda:0"])}
    predicted = {(r["shape"], r["precision"], r["checkpointing"]): r for r in _read_rows(files["predict"])}
    part.status = ", ".join(
        f"{d}: {'timed out' if r.timed_out else ('ok' if r.returncode == 0 else f'exit {r.returncode}')}"
        for d, r in results.items()
    )
    part.lines = [
        f"- {part.status}; {part.seconds:.0f} s",
        "",
        "| shape | precision | ckpt | batch × seq | predicted GiB | reserved GiB | allocated GiB | "
        "reserved ÷ predicted | reserved − predicted GiB | outside allocator GiB | "
        "outcomes (cuda / predict) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table: list[dict[str, Any]] = []
    for key in sorted(set(measured) | set(predicted)):
        m, p = measured.get(key, {}), predicted.get(key, {})
        pred, reserved, allocated = p.get("reserved"), m.get("reserved"), m.get("allocated")
        ratio = reserved / pred if reserved and pred else None
        table.append({"key": list(key), "measured": m, "predicted": p, "ratio": ratio})

        def gib(value: int | None) -> str:
            return "-" if value is None else f"{value / GiB:.2f}"

        part.lines.append(
            f"| {key[0]} | {key[1]} | {'on' if key[2] else 'off'} | "
            f"{m.get('batch_size', p.get('batch_size'))} × {m.get('seq_len', p.get('seq_len'))} | "
            f"{gib(pred)} | "
            f"{gib(reserved)} | {gib(allocated)} | {'-' if ratio is None else f'{ratio:.3f}'} | "
            f"{gib(reserved - pred) if reserved and pred else '-'} | {gib(m.get('outside_allocator'))} | "
            f"{m.get('outcome', '-')} / {p.get('outcome', '-')} |"
        )
    covered = [row for row in table if "packed_only_allocated" in row["measured"]]
    if covered:
        part.lines += [
            "",
            "Packed batches (cuda:0, allocated GiB): a job whose batches are all packed, against the trial",
            "",
            "| shape | precision | ckpt | packed only | trial | trial covers it |",
            "|---|---|---|---|---|---|",
        ]
        for row in covered:
            shape, precision, checkpointing = row["key"]
            cuda_row: dict[str, Any] = row["measured"]
            packed, trial = cuda_row.get("packed_only_allocated"), cuda_row.get("allocated")
            part.lines.append(
                f"| {shape} | {precision} | {'on' if checkpointing else 'off'} | {_gib_text(packed)} | "
                f"{_gib_text(trial)} | {'yes' if packed and trial and trial >= packed else 'NO'} |"
            )
    part.data = table
    return part


# -- part 4: the finder comparison on the GPU ------------------------------------------------------


def part_compare(timeout: float, budget: float, out: Path, log: Path) -> Part:
    part = Part(f"4. compare_finders --profile cuda (time budget {budget:g} s)")
    target = out / "compare"
    command = [
        sys.executable,
        "-m",
        "bench.compare_finders",
        "--profile",
        "cuda",
        "--time-budget",
        str(budget),
        "--finder-timeout",
        str(max(30.0, budget)),
        "--out",
        str(target),
    ]
    ran = run_streaming(command, timeout, log)
    part.seconds = ran.seconds
    part.status = (
        "timed out" if ran.timed_out else ("ok" if ran.returncode == 0 else f"exit {ran.returncode}")
    )
    report = target / "compare_finders-cuda.md"
    part.lines = [f"- {part.status} in {ran.seconds:.0f} s; report: `{report.name}` (partial if cut off)"]
    if report.exists():
        text = report.read_text(encoding="utf-8")
        start = text.find("## Summary")
        end = text.find("## The search replayed")
        if start >= 0:
            part.lines += ["", *text[start : end if end > start else None].strip().splitlines()[2:]]
    part.data = {"report": str(report)}
    return part


# -- part 5 (issue 9: LoRA / QLoRA): predicted against measured peaks ------------------------------

PEFT_METHODS = ("lora", "qlora")
PEFT_PRECISION = "bf16-mixed"


def peft_peaks_worker(device: str, memory: int, out: Path) -> None:
    """Child mode: one LoRA/QLoRA trial per (method, checkpointing) on the ~1B shape; JSON lines."""
    from probes.finetuning_spec import FinetuningSpec
    from probes.recipe.finetuning import DeviceKind, builder, parameter_counts, unavailable_reason
    from probes.spec import ConfigTask, ModelSpec, Precision
    from probes.trial import TrialSession

    config, seq_len, batch = PEAK_SHAPES["llama-1b"]
    kind: DeviceKind = "cuda" if device.startswith("cuda") else "predict"
    for method in PEFT_METHODS:
        spec = FinetuningSpec(method=method)
        for checkpointing in (False, True):
            row: dict[str, Any] = {"method": method, "checkpointing": checkpointing, "batch_size": batch}
            started = time.monotonic()
            try:
                reason = unavailable_reason(spec, kind)
                if reason is not None:
                    row.update(outcome="skipped", message=reason)
                else:
                    task = ConfigTask(
                        model=ModelSpec(architecture="llama", config=config),
                        seq_len=seq_len,
                        precision=Precision(PEFT_PRECISION),
                        gradient_checkpointing=checkpointing,
                        device=device,
                        memory_limit_bytes=memory,
                    )
                    with TrialSession(task, build=builder(spec)) as session:
                        trial = session.run(batch, accumulation_steps=2, optimizer_steps=2)
                        counts = parameter_counts(session.model) if session.model is not None else None
                    row.update(
                        outcome=trial.outcome.value,
                        reserved=trial.peak_reserved_bytes,
                        allocated=trial.peak_allocated_bytes,
                        message=trial.message,
                        trainable=counts.trainable_parameters if counts else None,
                        resident=counts.resident_bytes if counts else None,
                    )
            except Exception as exc:  # noqa: BLE001 - recorded; the next config runs
                row.update(outcome="error", message=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            row["seconds"] = round(time.monotonic() - started, 2)
            with out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")


def part_peft_peaks(timeout: float, memory: int, log: Path, work: Path) -> Part:
    _, seq_len, batch = PEAK_SHAPES["llama-1b"]
    part = Part(
        f"5. LoRA / QLoRA (issue 9): predicted vs measured peak, llama ~1B, {PEFT_PRECISION}, "
        f"batch {batch} x seq {seq_len}, memory limit {memory / GiB:g} GiB"
    )
    files = {device: work / f"peft-{device.replace(':', '')}.jsonl" for device in ("cuda:0", "predict")}
    results: dict[str, Ran] = {}

    def go(device: str) -> None:
        command = [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "_peft_peaks",
            device,
            str(memory),
            str(files[device]),
        ]
        results[device] = run_streaming(command, timeout, log)

    threads = [threading.Thread(target=go, args=(device,)) for device in files]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    part.seconds = time.monotonic() - started
    measured = {(r["method"], r["checkpointing"]): r for r in _read_rows(files["cuda:0"])}
    predicted = {(r["method"], r["checkpointing"]): r for r in _read_rows(files["predict"])}
    part.status = ", ".join(
        f"{d}: {'timed out' if r.timed_out else ('ok' if r.returncode == 0 else f'exit {r.returncode}')}"
        for d, r in results.items()
    )
    part.lines = [
        f"- {part.status}; {part.seconds:.0f} s",
        "",
        "| method | ckpt | predicted GiB | reserved GiB | allocated GiB | allocated ÷ predicted | "
        "trainable params | outcomes (cuda / predict) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for key in sorted(set(measured) | set(predicted)):
        m, p = measured.get(key, {}), predicted.get(key, {})
        pred, allocated = p.get("reserved"), m.get("allocated")
        ratio = allocated / pred if allocated and pred else None
        table.append({"key": list(key), "measured": m, "predicted": p, "ratio": ratio})

        def gib(value: int | None) -> str:
            return "-" if value is None else f"{value / GiB:.2f}"

        part.lines.append(
            f"| {key[0]} | {'on' if key[1] else 'off'} | {gib(pred)} | {gib(m.get('reserved'))} | "
            f"{gib(allocated)} | {'-' if ratio is None else f'{ratio:.3f}'} | {m.get('trainable', '-')} | "
            f"{m.get('outcome', '-')} / {p.get('outcome', '-')} |"
        )
        for row in (m, p):
            if row.get("outcome") not in (None, "fit") and row.get("message"):
                part.lines.append(f"  - {row['outcome']}: {row['message']}")
    part.data = table
    return part


# -- part 6: one probe through a single-node Ray cluster on this GPU (issue 10) ---------------------
# Runs the Ray CLI and the service in subprocesses (this module still never imports ``app``).

RAY_PROBE_MODEL: dict[str, Any] = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}
"""GPT-2 small's shape (~124M parameters)."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    import urllib.request

    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _ray_cli() -> str:
    """The ``ray`` command of this Python's environment (a venv's bin may not be on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def part_ray(timeout: float, memory: int, log: Path, work: Path) -> Part:
    part = Part("6. fleet: one probe placed by GPU type through a single-node Ray cluster")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray_port, http_port = _free_port(), _free_port()
    started = time.monotonic()
    server: subprocess.Popen[bytes] | None = None
    spec: dict[str, Any] = {
        "model": {"architecture": "gpt2", "config": RAY_PROBE_MODEL},
        "seq_len": 1024,
        "precisions": ["bf16-mixed"],
        "gradient_checkpointing": [False],
        "target_effective_batch_size": 256,
        "device": "gpu",
        "memory_limit_bytes": memory,
    }
    try:
        head = ["--head", f"--port={ray_port}", "--node-ip-address=127.0.0.1", "--num-cpus=4"]
        quiet = ["--include-dashboard=false", "--disable-usage-stats"]
        start = [_ray_cli(), "start", *head, *quiet]
        subprocess.run(start, env=env, check=True, timeout=120, capture_output=True)
        service_env = {
            **env,
            "MAXBATCH_DISPATCHER": "ray",
            "MAXBATCH_RAY_ADDRESS": f"127.0.0.1:{ray_port}",
            "MAXBATCH_INSPECT_MODELS": "false",
        }
        with log.open("ab") as sink:
            serve = ["serve", "--port", str(http_port), "--data-dir", str(work / "ray")]
            server = subprocess.Popen(
                [sys.executable, "-m", "app.cli", *serve],
                env=service_env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{http_port}"
        deadline = started + timeout
        devices: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not devices:
            with contextlib.suppress(OSError):
                devices = [d for d in _http("GET", f"{base}/v1/devices")["devices"] if d["kind"] == "gpu"]
            time.sleep(0.5)
        if not devices:
            raise RuntimeError("the service listed no GPU type")
        spec["gpu_type"] = devices[0]["gpu_type"]
        job = _http("POST", f"{base}/v1/probes", spec)
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            job = _http("GET", f"{base}/v1/probes/{job['id']}?wait=20", timeout=60)
        direct = work / "ray-direct.json"
        local_spec = {**spec, "device": "cuda:0", "gpu_type": None}
        direct_spec = work / "ray-direct-spec.json"
        direct_spec.write_text(json.dumps(local_spec))
        run = ["run", "--spec", str(direct_spec), "--result", str(direct)]
        ran = run_streaming(
            [sys.executable, "-m", "probes", *run], max(30.0, deadline - time.monotonic()), log
        )
        part.seconds = time.monotonic() - started
        config = (job.get("result") or {}).get("configs", [{}])[0]
        here = json.loads(direct.read_text())["configs"][0] if ran.returncode == 0 and direct.exists() else {}
        part.status = f"ray job {job['status']}; direct run {'ok' if here else 'failed'}"
        part.lines = [
            f"- {part.status}; {part.seconds:.0f} s; GPU type listed: {devices[0]['gpu_type']} "
            f"({devices[0]['count']} GPU, node {job.get('node')})",
            "",
            "| run | max batch | first failing | peak GiB | trials |",
            "|---|---|---|---|---|",
        ]
        for name, row in (("through Ray (device gpu)", config), ("direct (cuda:0)", here)):
            peak = row.get("peak_memory_bytes")
            part.lines.append(
                f"| {name} | {row.get('max_batch_size', '-')} | {row.get('first_failing_batch_size', '-')} | "
                f"{'-' if peak is None else f'{peak / GiB:.2f}'} | {len(row.get('trials', []))} |"
            )
        part.data = {"job": job, "direct": here}
    finally:
        if server is not None:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=30)
        stop = [_ray_cli(), "stop", "--force"]
        subprocess.run(stop, env=env, check=False, timeout=120, capture_output=True)
    return part


# == issue 12: host-memory ceilings on cuda (part 8) ===============================================

CEILINGS_GIB: tuple[float | None, ...] = (None, 16, 8, 4, 2)


def ceiling_worker(out: Path) -> None:
    """Child mode: one ~1B Llama trial per ceiling in a real trial child; JSON lines to ``out``."""
    from bench.proctree import TreeWatch
    from probes.hostmem import HostMemoryPolicy
    from probes.isolate import TrialChild, trial_from_reply
    from probes.protocol import TrialRequest
    from probes.spec import ConfigTask, ModelSpec, Precision

    task = ConfigTask(
        model=ModelSpec(architecture="llama", config=LLAMA_1B),
        seq_len=2048,
        precision=Precision("bf16-mixed"),
        gradient_checkpointing=True,
        device="cuda:0",
    )
    for gib in CEILINGS_GIB:
        ceiling = None if gib is None else int(gib * GiB)
        row: dict[str, Any] = {"ceiling_gib": gib}
        started = time.monotonic()
        with TreeWatch(os.getpid(), interval=0.05) as watch:
            child = TrialChild(task, host_memory=HostMemoryPolicy(cuda_bytes=ceiling))
            try:
                reply = child.request(
                    TrialRequest(batch_size=1, accumulation_steps=2, optimizer_steps=2), timeout_seconds=120
                )
                trial, _ = trial_from_reply(1, reply)
                row.update(
                    outcome=trial.outcome.value, message=trial.message, reserved=trial.peak_reserved_bytes
                )
            finally:
                pid = child.pid
                child.close()
        seen = watch.seen.get(pid or -1)
        row.update(
            seconds=round(time.monotonic() - started, 1),
            peak_rss=seen.peak_rss if seen else None,
            data_limit=seen.data_limit if seen else None,
        )
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def part_cuda_ceiling(timeout: float, log: Path, work: Path) -> Part:
    part = Part("8. host-memory ceiling (RLIMIT_DATA) of a cuda trial child: ~1B Llama, bf16-mixed, seq 2048")
    rows_file = work / "ceilings.jsonl"
    ran = run_streaming([sys.executable, "-m", "bench.gpu_check", "_ceiling", str(rows_file)], timeout, log)
    rows = _read_rows(rows_file)
    part.seconds = ran.seconds
    part.status = (
        "timed out" if ran.timed_out else ("ok" if ran.returncode == 0 else f"exit {ran.returncode}")
    )
    part.lines = [
        f"- {part.status} in {ran.seconds:.0f} s ({len(rows)} of {len(CEILINGS_GIB)} ceilings done)",
        "",
        "| ceiling | outcome | child's peak RSS | its RLIMIT_DATA | seconds | message |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ceiling = "none" if row["ceiling_gib"] is None else f"{row['ceiling_gib']} GiB"
        rss = "-" if row.get("peak_rss") is None else f"{row['peak_rss'] / GiB:.2f} GiB"
        limit = "-" if row.get("data_limit") is None else f"{row['data_limit'] / GiB:.2f} GiB"
        message = (row.get("message") or "")[:120].replace("|", "/")
        part.lines.append(
            f"| {ceiling} | {row.get('outcome')} | {rss} | {limit} | {row.get('seconds')} | {message} |"
        )
    if ran.returncode != 0 and ran.stderr_tail:
        part.lines.append(f"\n```\n{ran.stderr_tail[-1500:]}\n```")
    part.data = rows
    return part


# == issue 9: distributed strategies, the fp32 attention kernel, a soak at an FSDP size ===========
#
# Part 7 runs in one subprocess (``_distributed``), one JSON line per check:
#
# - ``ddp-nccl``: DDP on a real one-rank NCCL group (the Reducer, its buckets, NCCL) on cuda:0,
#   against ``predict`` of the same config (``strategy ddp``, ``world_size`` 1);
# - ``fsdp-fake8``: FSDP2 on the fake process group of 8 ranks on cuda:0 (one GPU measuring a rank of
#   an 8-GPU job), against ``predict``; ``fsdp-fake8-sync-each-batch`` the same with Accelerate's
#   ``sync_each_batch`` (a reduce-scatter every micro-step: the peak should fall by about 7/8 of the
#   unsharded gradients);
# - ``fp32-attention``: the ~1B GQA Llama in fp32 without checkpointing at seq 2048 (where CUDA's
#   SDPA falls back to the math kernel), allocated bytes against ``predict`` — within 5 %;
# - ``fsdp-soak``: the engine's answer for FSDP over 8 ranks on cuda:0 (bf16-mixed, checkpointing
#   on, under the memory limit), then 20 optimizer steps at that size in a fresh session.

DISTRIBUTED_LIMIT_SECONDS = 240
ATTENTION_TOLERANCE = 0.05


def _distributed_task(
    device: str,
    strategy: str,
    ranks: int,
    precision: str,
    checkpointing: bool,
    memory: int,
    *,
    sync_each_batch: bool = False,
) -> Any:
    from probes.spec import ConfigTask, ModelSpec, Precision, Strategy

    return ConfigTask(
        model=ModelSpec(architecture="llama", config=LLAMA_1B),
        seq_len=2048,
        precision=Precision(precision),
        gradient_checkpointing=checkpointing,
        strategy=Strategy(strategy),
        world_size=ranks,
        sync_each_batch=sync_each_batch,
        device=device,
        memory_limit_bytes=memory,
    )


def _one_trial(task: Any, batch: int, steps: int = 2) -> dict[str, Any]:
    from probes.trial import TrialSession

    started = time.monotonic()
    with TrialSession(task) as session:
        trial = session.run(batch, accumulation_steps=2, optimizer_steps=steps)
    return {
        "outcome": trial.outcome.value,
        "reserved": trial.peak_reserved_bytes,
        "allocated": trial.peak_allocated_bytes,
        "message": trial.message,
        "seconds": round(time.monotonic() - started, 1),
    }


def distributed_worker(memory: int, card_memory: int, out: Path) -> None:
    """Child mode for part 7: each check appends one JSON line to ``out``. The fp32 attention check
    runs against ``card_memory`` (the whole card): under the probe limit its trial (41.8 GiB on an
    H200) would run out and compare two cut-off peaks."""
    import socket

    import torch.distributed as dist

    def write(row: dict[str, Any]) -> None:
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def guarded(name: str, check: Any) -> None:
        try:
            write({"check": name, **check()})
        except Exception as exc:  # noqa: BLE001 - recorded; the next check runs
            write({"check": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})

    def ddp_nccl() -> dict[str, Any]:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            measured = _one_trial(_distributed_task("cuda:0", "ddp", 1, "bf16-mixed", False, memory), 2)
        finally:
            dist.destroy_process_group()
        predicted = _one_trial(_distributed_task("predict", "ddp", 1, "bf16-mixed", False, memory), 2)
        return {"measured": measured, "predicted": predicted}

    def fsdp_fake8() -> dict[str, Any]:
        measured = _one_trial(_distributed_task("cuda:0", "fsdp", 8, "bf16-mixed", False, memory), 2)
        predicted = _one_trial(_distributed_task("predict", "fsdp", 8, "bf16-mixed", False, memory), 2)
        return {"measured": measured, "predicted": predicted}

    def fsdp_fake8_sync_each_batch() -> dict[str, Any]:
        rows = [
            _one_trial(_distributed_task(d, "fsdp", 8, "bf16-mixed", False, memory, sync_each_batch=True), 2)
            for d in ("cuda:0", "predict")
        ]
        return {"measured": rows[0], "predicted": rows[1]}

    def fp32_attention() -> dict[str, Any]:
        measured = _one_trial(_distributed_task("cuda:0", "single", 1, "32-true", False, card_memory), 2)
        predicted = _one_trial(_distributed_task("predict", "single", 1, "32-true", False, card_memory), 2)
        return {"measured": measured, "predicted": predicted}

    def fsdp_soak() -> dict[str, Any]:
        from probes.engine import run_probe
        from probes.spec import ModelSpec, ProbeSpec

        spec = ProbeSpec(
            model=ModelSpec(architecture="llama", config=LLAMA_1B),
            seq_len=2048,
            precisions=["bf16-mixed"],
            gradient_checkpointing=[True],
            strategies=["fsdp"],
            world_size=8,
            target_effective_batch_size=256,
            device="cuda:0",
            memory_limit_bytes=memory,
            max_batch_size_limit=64,
        )
        result = run_probe(spec)
        best = result.configs[0].max_batch_size
        if best is None:
            return {"max_batch_size": None, "reason": result.configs[0].reason}
        soak = _one_trial(_distributed_task("cuda:0", "fsdp", 8, "bf16-mixed", True, memory), best, steps=20)
        return {"max_batch_size": best, "soak": soak}

    guarded("ddp-nccl", ddp_nccl)
    guarded("fsdp-fake8", fsdp_fake8)
    guarded("fsdp-fake8-sync-each-batch", fsdp_fake8_sync_each_batch)
    guarded("fp32-attention", fp32_attention)
    guarded("fsdp-soak", fsdp_soak)


def distributed_verdict(check: str, measured: dict[str, Any], predicted: dict[str, Any]) -> str:
    """What a measured/predicted pair says: nothing unless both trials fit (a peak cut off by an
    out-of-memory error is no peak); the fp32 attention check must agree within 5 %, the others
    must not predict less than was allocated (a too-low prediction is the error predict must not
    make)."""
    if measured.get("outcome") != "fit" or predicted.get("outcome") != "fit":
        return " — no verdict: a trial did not fit"
    allocated, reserved = measured.get("allocated"), predicted.get("reserved")
    if not allocated or not reserved:
        return " — no verdict: a peak is missing"
    ratio = allocated / reserved
    if check == "fp32-attention":
        return " — within 5 %" if abs(ratio - 1) <= ATTENTION_TOLERANCE else " — OUTSIDE 5 %"
    return " — predicted covers allocated" if ratio <= 1 else " — PREDICTED TOO LOW"


def part_distributed(timeout: float, memory: int, card_memory: int, log: Path, work: Path) -> Part:
    part = Part(
        f"7. distributed strategies, fp32 attention, FSDP soak (memory limit {memory / GiB:g} GiB; "
        f"fp32 attention {card_memory / GiB:.1f} GiB)"
    )
    rows_file = work / "distributed.jsonl"
    command = [sys.executable, "-m", "bench.gpu_check", "_distributed", str(memory), str(card_memory)]
    ran = run_streaming([*command, str(rows_file)], timeout, log)
    part.seconds = ran.seconds
    part.status = (
        "timed out" if ran.timed_out else ("ok" if ran.returncode == 0 else f"exit {ran.returncode}")
    )
    rows = _read_rows(rows_file)
    part.lines = [f"- {part.status}; {part.seconds:.0f} s", ""]
    for row in rows:
        if "error" in row:
            part.lines.append(f"- {row['check']}: error: {row['error']}")
            continue
        if "soak" in row or "max_batch_size" in row:
            soak = row.get("soak") or {}
            part.lines.append(
                f"- {row['check']}: engine's FSDP size {row.get('max_batch_size')}; 20 steps: "
                f"{soak.get('outcome', '-')}, peak reserved {_gib_text(soak.get('reserved'))} GiB "
                f"({soak.get('seconds', '-')} s)"
            )
            continue
        measured, predicted = row["measured"], row["predicted"]
        ratio = (
            measured["allocated"] / predicted["reserved"]
            if measured.get("allocated") and predicted.get("reserved")
            else None
        )
        verdict = distributed_verdict(row["check"], measured, predicted)
        shown = "-" if ratio is None else f"{ratio:.3f}"
        part.lines.append(
            f"- {row['check']}: measured allocated {_gib_text(measured.get('allocated'))} GiB "
            f"(reserved {_gib_text(measured.get('reserved'))}), "
            f"predicted {_gib_text(predicted.get('reserved'))} GiB, allocated ÷ predicted {shown}{verdict}; "
            f"outcomes {measured['outcome']} / {predicted['outcome']}"
        )
    part.data = rows
    return part


def _gib_text(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


# == issue 11 (predict-seeded search, dynamic padding) =============================================
# Parts 9 and 10. Part 9 drives
# probes.search.LadderSearch and probes.seeding.SeededSearch itself, trial by trial, in one child
# per shape and mode, so the GPU-seconds are the trials' own (no child start-up).

SEED_SHAPES: dict[str, tuple[dict[str, Any], int]] = {
    "llama-1b": (LLAMA_1B, 2048),
    "llama-7b": (LLAMA_7B, 1024),
}
SEED_PRECISION = "bf16-mixed"
SOAK_STEPS = 200


def seeded_worker(shape: str, mode: str, memory: int, out: Path) -> None:
    """Child mode: every config of ``shape`` searched on cuda:0 (``mode`` plain or seeded); JSON lines."""
    from probes.curve import measure_curve
    from probes.models import inspect_model
    from probes.search import LadderSearch, training_state_bytes
    from probes.seeding import PredictedBracket, SeededSearch
    from probes.spec import ConfigTask, ModelSpec, Outcome, Precision
    from probes.trial import TrialSession

    config, seq_len = SEED_SHAPES[shape]
    for checkpointing in (False, True):
        task = ConfigTask(
            model=ModelSpec(architecture="llama", config=config),
            seq_len=seq_len,
            precision=Precision(SEED_PRECISION),
            gradient_checkpointing=checkpointing,
            device="cuda:0",
            memory_limit_bytes=memory,
        )
        facts = inspect_model(task.model, seq_len, allow_remote_code=False)
        floor = training_state_bytes(facts.parameter_count, task.precision)
        row: dict[str, Any] = {"shape": shape, "mode": mode, "checkpointing": checkpointing}
        with TrialSession(task) as session:
            capacity = session.device.capacity_bytes
        search: LadderSearch | SeededSearch
        if mode == "seeded":
            started = time.monotonic()
            predict_task = task.model_copy(update={"device": "predict", "memory_limit_bytes": capacity})
            curve = measure_curve(predict_task)
            row["predict_cpu_seconds"] = round(time.monotonic() - started, 1)
            if curve.curve is not None:
                bracket = PredictedBracket(*curve.curve.ladder_bracket(capacity))
            else:
                bracket = PredictedBracket(None, 1)
            row["predicted"] = [bracket.max_batch_size, bracket.first_failing_batch_size]
            search = SeededSearch(bracket, capacity_bytes=capacity, floor_bytes=floor)
        else:
            search = LadderSearch(capacity_bytes=capacity, floor_bytes=floor)
        sizes, gpu_seconds = [], 0.0
        while (size := search.next_size()) is not None:
            started = time.monotonic()
            with TrialSession(task) as session:  # a fresh model per trial, as the engine's fresh children
                trial = session.run(size, accumulation_steps=2, optimizer_steps=2)
            gpu_seconds += time.monotonic() - started
            sizes.append(f"{size}{'' if trial.outcome is Outcome.FIT else 'x'}")
            search.record(trial)
        row.update(
            sizes=sizes,
            gpu_trials=len(sizes),
            gpu_seconds=round(gpu_seconds, 1),
            answer=[search.max_batch_size, search.first_failing_batch_size],
            prediction_right=getattr(search, "prediction_right", None),
            aborted=search.aborted_reason,
        )
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def engine_seeded_worker(shape: str, memory: int, out: Path) -> None:
    """Child mode: the whole engine (``run_probe``: a fresh child per trial, the confirmation with its
    varied lengths) on cuda:0 for ``shape``, ``predict_seeding`` off then on; one JSON line per config
    and mode with the device's trials and that mode's whole probe wall time (the GPU's hold)."""
    from probes.engine import run_probe
    from probes.spec import ModelSpec, ProbeSpec

    config, seq_len = SEED_SHAPES[shape]
    for seeding in (False, True):
        spec = ProbeSpec(
            model=ModelSpec(architecture="llama", config=config),
            seq_len=seq_len,
            precisions=[SEED_PRECISION],
            gradient_checkpointing=[False, True],
            target_effective_batch_size=256,
            device="cuda:0",
            memory_limit_bytes=memory,
            predict_seeding=seeding,
        )
        started = time.monotonic()
        result = run_probe(spec)
        wall = round(time.monotonic() - started, 1)
        rows = [
            {
                "shape": shape,
                "mode": "engine seeded" if seeding else "engine plain",
                "checkpointing": c.gradient_checkpointing,
                "sizes": [f"{t.batch_size}{'' if t.outcome.value == 'fit' else 'x'}" for t in c.trials],
                "gpu_trials": c.seeding.device_trials if c.seeding is not None else len(c.trials),
                "gpu_seconds": None,
                "predicted": (
                    [c.seeding.predicted_max_batch_size, c.seeding.predicted_first_failing_batch_size]
                    if c.seeding is not None
                    else None
                ),
                "prediction_right": c.seeding.prediction_right if c.seeding is not None else None,
                "answer": [c.max_batch_size, c.first_failing_batch_size],
                "probe_wall_seconds": wall,
            }
            for c in result.configs
        ]
        with out.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


def part_seeded(timeout: float, memory: int, log: Path, work: Path) -> Part:
    part = Part(
        f"9. predict-seeded search vs the plain search on cuda:0 (issue 11), {SEED_PRECISION}, "
        f"memory limit {memory / GiB:g} GiB"
    )
    rows_file = work / "seeded.jsonl"
    started = time.monotonic()
    statuses = []
    for shape in SEED_SHAPES:
        for mode in ("plain", "seeded", "engine"):
            left = timeout - (time.monotonic() - started)
            if left < 10:
                statuses.append(f"{shape} {mode}: no time left")
                continue
            worker = ["_engine_seeded", shape] if mode == "engine" else ["_seeded", shape, mode]
            command = [sys.executable, "-m", "bench.gpu_check", *worker, str(memory), str(rows_file)]
            ran = run_streaming(command, left, log)
            statuses.append(
                f"{shape} {mode}: "
                + (
                    "timed out"
                    if ran.timed_out
                    else ("ok" if ran.returncode == 0 else f"exit {ran.returncode}")
                )
            )
    part.seconds = time.monotonic() - started
    part.status = "; ".join(statuses)
    rows = _read_rows(rows_file)
    part.lines = [
        f"- {part.status}; {part.seconds:.0f} s",
        "",
        "| shape | ckpt | mode | predicted | GPU sizes | GPU trials | GPU s (engine: the probe's wall) "
        "| predict CPU s | answer | right |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        part.lines.append(
            f"| {row['shape']} | {'on' if row['checkpointing'] else 'off'} | {row['mode']} | "
            f"{row.get('predicted', '-')} | {' '.join(row['sizes'])} | {row['gpu_trials']} | "
            f"{row['gpu_seconds'] or row.get('probe_wall_seconds', '-')} | "
            f"{row.get('predict_cpu_seconds', '-')} | {row['answer']} | "
            f"{row.get('prediction_right', '-')} |"
        )
    answers: dict[tuple[str, bool], set[str]] = {}
    for row in rows:
        answers.setdefault((row["shape"], row["checkpointing"]), set()).add(json.dumps(row["answer"]))
    part.lines.append("")
    part.lines.append(
        "- same answers seeded and plain: "
        + ("yes" if all(len(a) == 1 for a in answers.values()) else f"NO: {answers}")
    )
    part.data = rows
    return part


def soak_worker(memory: int, out: Path, answers_file: Path) -> None:
    """Child mode: at every answer of part 9, the engine's confirmation on cuda (worst case, then
    ``confirmation_plan``'s varied lengths, judged with the derived headroom), then SOAK_STEPS optimizer
    steps under dynamic padding; both with the request's default ``cuda_alloc_conf`` set in this
    process before CUDA starts, as a trial child sets it."""
    from probes.confirmation import (
        confirmation_plan,
        dynamic_padding_lengths,
        judge_confirmation,
        reserved_minus_allocated,
    )
    from probes.spec import ConfigTask, ModelSpec, Precision, ProbeSpec
    from probes.trial import TrialSession
    from probes.worker import use_allocator_settings

    answers = {
        (r["shape"], r["checkpointing"]): r["answer"][0] for r in _read_rows(answers_file) if r["answer"][0]
    }
    for (shape, checkpointing), batch in sorted(answers.items()):
        config, seq_len = SEED_SHAPES[shape]
        spec = ProbeSpec(
            model=ModelSpec(architecture="llama", config=config),
            seq_len=seq_len,
            precisions=[Precision(SEED_PRECISION)],
            gradient_checkpointing=[checkpointing],
            target_effective_batch_size=batch,
            device="cuda:0",
            memory_limit_bytes=memory,
        )
        task = ConfigTask.for_config(spec, Precision(SEED_PRECISION), checkpointing)
        use_allocator_settings(task)
        plan = confirmation_plan(spec, "cuda")
        row: dict[str, Any] = {"shape": shape, "checkpointing": checkpointing, "batch_size": batch}
        started = time.monotonic()
        with TrialSession(task) as session:  # the confirmation, in a fresh model as in a fresh child
            confirmation = session.run(
                batch,
                accumulation_steps=spec.trial_accumulation_steps,
                optimizer_steps=plan.optimizer_steps,
                lengths=plan.lengths,
            )
            judged = judge_confirmation(confirmation, plan, session.device.capacity_bytes)
        row.update(
            confirmation=judged.outcome.value,
            confirmation_steps=judged.optimizer_steps,
            confirmation_micro_steps_done=judged.micro_steps_done,
            confirmation_reserved_minus_allocated=reserved_minus_allocated(confirmation),
            confirmation_message=judged.message,
            confirmation_seconds=round(time.monotonic() - started, 1),
        )
        lengths = dynamic_padding_lengths(seq_len, SOAK_STEPS, worst_case_steps=2, seed=spec.seed)
        started = time.monotonic()
        with TrialSession(task) as session:
            trial = session.run(batch, accumulation_steps=1, optimizer_steps=SOAK_STEPS, lengths=lengths)
        row.update(
            outcome=trial.outcome.value,
            steps=trial.optimizer_steps,
            reserved=trial.peak_reserved_bytes,
            allocated=trial.peak_allocated_bytes,
            reserved_minus_allocated=reserved_minus_allocated(trial),
            alloc_conf=trial.cuda_alloc_conf,
            message=trial.message,
            seconds=round(time.monotonic() - started, 1),
        )
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def part_soak(timeout: float, memory: int, log: Path, work: Path) -> Part:
    from probes.spec import DEFAULT_CUDA_ALLOC_CONF

    part = Part(
        f"10. the engine's confirmation, then {SOAK_STEPS} optimizer steps under dynamic padding, at "
        f"every size part 9 returned (issue 11), PYTORCH_CUDA_ALLOC_CONF={DEFAULT_CUDA_ALLOC_CONF}"
    )
    rows_file = work / "soak.jsonl"
    command = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "_soak",
        str(memory),
        str(rows_file),
        str(work / "seeded.jsonl"),
    ]
    ran = run_streaming(command, timeout, log)
    part.seconds = ran.seconds
    part.status = (
        "timed out" if ran.timed_out else ("ok" if ran.returncode == 0 else f"exit {ran.returncode}")
    )
    rows = _read_rows(rows_file)
    part.lines = [
        f"- {part.status}; {part.seconds:.0f} s",
        "",
        "| shape | ckpt | batch | confirmation | conf. R-A MiB | soak | steps | reserved GiB "
        "| allocated GiB | soak R-A MiB | alloc conf | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reserved, allocated = row.get("reserved") or 0, row.get("allocated") or 0
        part.lines.append(
            f"| {row['shape']} | {'on' if row['checkpointing'] else 'off'} | {row['batch_size']} | "
            f"{row['confirmation']} | {_mib(row.get('confirmation_reserved_minus_allocated'))} | "
            f"{row['outcome']} | {row['steps']} | {reserved / GiB:.2f} | {allocated / GiB:.2f} | "
            f"{_mib(row.get('reserved_minus_allocated'))} | {row.get('alloc_conf')} | "
            f"{row['confirmation_seconds'] + row['seconds']:.0f} |"
        )
    missed = [r for r in rows if r["confirmation"] == "fit" and r["outcome"] != "fit"]
    part.lines += [
        "",
        f"- soaks out of memory: {sum(r['outcome'] == 'oom' for r in rows)} of {len(rows)}; "
        f"confirmed but failed the soak: {len(missed)}",
    ]
    part.data = rows
    return part


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


# -- the driver ------------------------------------------------------------------------------------


def write_report(out: Path, header: list[str], parts: list[Part]) -> None:
    lines = [*header, ""]
    for part in parts:
        lines += [f"## {part.name}", "", *part.lines, ""]
    (out / "gpu_check.md").write_text("\n".join(lines), encoding="utf-8")
    payload = [{"name": p.name, "status": p.status, "seconds": p.seconds, "data": p.data} for p in parts]
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["_peaks"]:
        peaks_worker(args_list[1], int(args_list[2]), Path(args_list[3]))
        return 0
    if args_list[:1] == ["_peft_peaks"]:
        peft_peaks_worker(args_list[1], int(args_list[2]), Path(args_list[3]))
        return 0
    if args_list[:1] == ["_distributed"]:
        distributed_worker(int(args_list[1]), int(args_list[2]), Path(args_list[3]))
        return 0
    if args_list[:1] == ["_seeded"]:
        seeded_worker(args_list[1], args_list[2], int(args_list[3]), Path(args_list[4]))
        return 0
    if args_list[:1] == ["_engine_seeded"]:
        engine_seeded_worker(args_list[1], int(args_list[2]), Path(args_list[3]))
        return 0
    if args_list[:1] == ["_soak"]:
        soak_worker(int(args_list[1]), Path(args_list[2]), Path(args_list[3]))
        return 0
    if args_list[:1] == ["_ceiling"]:
        ceiling_worker(Path(args_list[1]))
        return 0
    parser = argparse.ArgumentParser(description="Every GPU check in one time-boxed run.")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results/gpu"))
    default_parts = [1, 2, 3, 4, 5, 7, 8]
    parser.add_argument("--parts", nargs="*", type=int, default=default_parts, help="which parts (1-10)")
    parser.add_argument("--probe-memory-gib", type=float, default=32.0)
    parser.add_argument("--peak-memory-gib", type=float, default=0.0, help="0: the whole card")
    parser.add_argument("--compare-budget", type=float, default=70.0)
    args = parser.parse_args(args_list)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ok, device = cuda_available()
    header = [
        "# gpu_check",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device}",
        f"- command: `python -m bench.gpu_check {' '.join(args_list)}`",
    ]
    if not ok:
        message = (
            f"gpu_check: no CUDA GPU is visible to torch here ({device}); nothing was run. "
            "On a CPU-only machine run the CPU benchmark instead: python -m bench.compare_finders"
        )
        print(message, file=sys.stderr)
        write_report(out, [*header, "", message], [])
        return 3
    total_gib = _total_memory_gib(device)
    probe_memory = int(min(args.probe_memory_gib, total_gib) * GiB)
    peak_memory = int((args.peak_memory_gib or total_gib) * GiB) - 64 * 2**20
    log = out / "gpu_check.log"
    parts: list[Part] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        plan = {
            1: lambda: part_tests(100, log),
            2: lambda: part_probe(130, probe_memory, log, work, device),
            3: lambda: part_peaks(130, peak_memory, log, work),
            4: lambda: part_compare(args.compare_budget + 45, args.compare_budget, out, log),
            5: lambda: part_peft_peaks(110, peak_memory, log, work),
            6: lambda: part_ray(180, min(probe_memory, 16 * GiB), log, work),
            7: lambda: part_distributed(DISTRIBUTED_LIMIT_SECONDS, probe_memory, peak_memory, log, work),
            8: lambda: part_cuda_ceiling(120, log, work),
            # the whole card: under the 32 GiB probe limit the 7B's bf16-mixed weights, gradients and
            # AdamW state alone (100.4 GiB) fit nothing, and both searches would end at once
            9: lambda: part_seeded(330, peak_memory, log, work),
            10: lambda: part_soak(240, peak_memory, log, work),
        }
        for number in args.parts:
            print(f"gpu_check: part {number} ...", file=sys.stderr, flush=True)
            try:
                part = plan[number]()
            except Exception as exc:  # noqa: BLE001 - one part's failure never stops the others
                part = Part(f"{number}. (crashed)", status=f"{type(exc).__name__}: {exc}")
                part.lines = [f"- crashed: {type(exc).__name__}: {exc}"]
            parts.append(part)
            write_report(out, [*header, f"- elapsed: {time.monotonic() - started:.0f} s"], parts)
    print((out / "gpu_check.md").read_text(encoding="utf-8"))
    return 0


def _total_memory_gib(description: str) -> float:
    try:
        return float(description.split(",")[1].split("GiB", maxsplit=1)[0])
    except (IndexError, ValueError):
        return 80.0


if __name__ == "__main__":
    raise SystemExit(main())
