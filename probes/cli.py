"""``maxbatch probe``: run a probe from the command line, with progress per config and trial.

The ``maxbatch`` entry point (``app.cli``) registers :func:`probe`. The probe runs in this
process's engine (torch-free) with every trial in a child process. ``--json`` prints the result
object (``ProbeResult``) and nothing else on stdout; progress goes to stderr. Bad input prints
one line on stderr and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from probes.errors import ProbeError, ProbeInputError
from probes.gpus import check_card_request
from probes.protocol import ExitCode
from probes.spec import (
    CardResult,
    ConfigResult,
    ConfigStatus,
    EventKind,
    ProbeEvent,
    ProbeResult,
    ProbeSpec,
)
from probes.units import format_bytes, parse_bytes


def fail_input(message: str) -> NoReturn:
    """One line on stderr, exit code 2."""
    sys.stderr.write(f"maxbatch: error: {message}\n")
    raise typer.Exit(ExitCode.INPUT)


def _known(exc: ProbeInputError) -> str:
    """The accepted values an input error lists, shortened to one readable line."""
    if not exc.known:
        return ""
    shown = ", ".join(exc.known[:40])
    return f" (known: {shown}{', …' if len(exc.known) > 40 else ''})"


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _checkpointing(values: list[str]) -> list[bool]:
    table = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
    try:
        return [table[v.strip().lower()] for v in values]
    except KeyError as exc:
        fail_input(f"--checkpointing takes on or off, not {exc.args[0]!r}")


def build_spec(
    *,
    architecture: str | None,
    config_json: str | None,
    model: str | None,
    trust_remote_code: bool,
    seq_len: int,
    precision: list[str],
    checkpointing: list[str],
    strategy: list[str] | None = None,
    optimizer: str | None = None,
    attn_implementation: str | None = None,
    finetuning: str | None = None,
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    lora_dropout: float | None = None,
    lora_target_modules: str | None = None,
    sync_each_batch: bool = False,
    target_batch_size: int,
    world_size: int,
    device: str,
    memory: str | None,
    gpu: str | Sequence[str] | None,
    headroom: str | None,
    max_batch_size: int | None,
    dataset_size: int | None,
    epochs: float | None,
    warmup_ratio: float | None,
    trial_timeout: float,
    confirm_steps: int,
    gpu_type: str | None = None,
    predict_seeding: bool = True,
    confirm_varied_steps: int | None = None,
    cuda_alloc_conf: str | None = None,
) -> ProbeSpec:
    """The spec the flags describe; every problem ends in :func:`fail_input`."""
    overrides: object = {}
    if config_json is not None:
        try:
            overrides = json.loads(config_json)
        except json.JSONDecodeError as exc:
            fail_input(f"--config-json is not valid JSON: {exc}")
        if not isinstance(overrides, dict):
            fail_input("--config-json must be a JSON object, e.g. '{\"n_layer\": 2}'")
    try:
        memory_bytes = parse_bytes(memory) if memory is not None else None
        headroom_bytes = parse_bytes(headroom) if headroom is not None else 0
    except ValueError as exc:
        fail_input(str(exc))
    fields: dict[str, object] = {
        "model": {
            "architecture": architecture,
            "config": overrides,
            "name_or_path": model,
            "trust_remote_code": trust_remote_code,
        },
        "seq_len": seq_len,
        "target_effective_batch_size": target_batch_size,
        "world_size": world_size,
        "device": device,
        "memory_limit_bytes": memory_bytes,
        "gpu": _cards(gpu),
        "headroom_bytes": headroom_bytes,
        "max_batch_size_limit": max_batch_size,
        "dataset_size": dataset_size,
        "num_train_epochs": epochs,
        "warmup_ratio": warmup_ratio,
        "trial_timeout_seconds": trial_timeout,
        "confirm_optimizer_steps": confirm_steps,
        "gpu_type": gpu_type,
        "predict_seeding": predict_seeding,
        "sync_each_batch": sync_each_batch,
    }
    confirmation = {"confirm_varied_steps": confirm_varied_steps, "cuda_alloc_conf": cuda_alloc_conf}
    fields.update({name: value for name, value in confirmation.items() if value is not None})
    if precision:
        fields["precisions"] = precision
    if strategy:
        fields["strategies"] = strategy
    if optimizer is not None:
        fields["optimizer"] = optimizer
    if attn_implementation is not None:
        fields["attn_implementation"] = attn_implementation
    lora = {
        "finetuning": finetuning,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "lora_target_modules": lora_target_modules,
    }
    fields.update({name: value for name, value in lora.items() if value is not None})
    if checkpointing:
        fields["gradient_checkpointing"] = _checkpointing(checkpointing)
    try:
        spec = ProbeSpec.model_validate(fields)
    except ValidationError as exc:
        fail_input(_validation_message(exc))
    for card in spec.cards or ([spec.card] if spec.card is not None else []):
        try:
            check_card_request(card, spec.memory_limit_bytes)
        except ProbeInputError as exc:
            fail_input(exc.message + _known(exc))
    return spec


def _cards(gpu: str | Sequence[str] | None) -> str | list[str] | None:
    """``--gpu`` once is the one-card request (a string); repeated, the cards to compare (a list);
    not given (``None``, or the empty sequence a caller may pass for a repeatable flag): no card."""
    if gpu is None or isinstance(gpu, str):
        return gpu
    if not gpu:
        return None
    return gpu[0] if len(gpu) == 1 else list(gpu)


class _ProgressView:
    """One progress bar per config; each trial advances its bar.

    Nothing is drawn until the first event: the engine validates the request (in its first child)
    before any config starts, so a bad request ends in its one-line error with no bars above it.
    """

    def __init__(self, progress: Progress, labels: list[str]) -> None:
        self._progress = progress
        self._labels = labels
        self._tasks: list[TaskID] = []

    def _start(self) -> None:
        if not self._tasks:
            self._progress.start()
            self._tasks = [
                self._progress.add_task(label, total=None, start=False, detail="waiting")
                for label in self._labels
            ]

    def stop(self) -> None:
        """Stop the display if it started (rich writes a blank line when a display that never
        started is stopped: it would stand above a one-line error)."""
        if self._tasks:
            self._progress.stop()

    def __call__(self, event: ProbeEvent) -> None:
        self._start()
        task = self._tasks[event.config_index]
        if event.kind is EventKind.CONFIG_STARTED:
            self._progress.start_task(task)
            self._progress.update(task, detail="searching")
        elif event.kind is EventKind.TRIAL and event.trial is not None:
            trial = event.trial
            peak = f" peak {format_bytes(trial.peak_bytes)}" if trial.peak_bytes is not None else ""
            self._progress.update(
                task, advance=1, detail=f"{event.phase} b={trial.batch_size}: {trial.outcome.value}{peak}"
            )
        elif event.kind is EventKind.CONFIG_DONE and event.config is not None:
            config = event.config
            detail = (
                f"max {config.max_batch_size}" if config.status is ConfigStatus.OK else config.status.value
            )
            self._progress.update(task, total=len(config.trials) or 1, completed=len(config.trials) or 1)
            self._progress.update(task, detail=detail)
            self._progress.stop_task(task)


def _label(precision: str, checkpointing: bool, strategy: str) -> str:
    return f"{precision:<10} ckpt {'on ' if checkpointing else 'off'} {strategy:<6}"


def _peak_cell(config: ConfigResult) -> str:
    """The peak of the answer; where batch size 1 does not fit, what it needed against the limit."""
    if config.peak_memory_bytes:
        return format_bytes(config.peak_memory_bytes)
    if config.min_batch_needs_bytes is not None:
        bound = "≥ " if config.min_batch_need_is_lower_bound else ""
        return f"b=1 needs {bound}{format_bytes(config.min_batch_needs_bytes)}"
    return "-"


def _confirmation_cell(config: ConfigResult) -> str:
    """How the answer was confirmed: worst-case + varied optimizer steps; on cuda the reserved -
    allocated margin measured there."""
    report = config.confirmation
    if report is None:
        return "-"
    cell = f"{report.worst_case_optimizer_steps}+{report.varied_optimizer_steps} steps"
    if report.reserved_minus_allocated_bytes is not None:
        cell += f", R-A {format_bytes(report.reserved_minus_allocated_bytes)}"
    return cell


def render_table(result: ProbeResult, console: Console) -> None:
    """A human summary of a result: one table per card (one row per config), each with its
    recommendation."""
    if result.cards is None:
        _render_card(result.spec, result.card_results()[0], console)
        return
    for card in result.cards:
        _render_card(result.spec, card, console)
        reuse = f", {card.trials_reused} reused from a card with the same kernels" * bool(card.trials_reused)
        console.print(f"[dim]{card.gpu}: {card.trials_run} trials run{reuse}[/]")
        console.print()


def _render_card(spec: ProbeSpec, result: CardResult, console: Console) -> None:
    title = f"{spec.model.label} · seq {spec.seq_len} · {result.device.name}"
    if spec.finetuning_spec.uses_adapters:
        title += f" · {spec.finetuning.value} r={spec.lora_r}"
    if spec.world_size > 1:
        title += f" · {spec.world_size} ranks"
    table = Table(title=title)
    for column in (
        "precision",
        "ckpt",
        "strategy",
        "status",
        "max batch",
        "first fail",
        "trials",
        "peak",
        "confirmed",
        "plan",
    ):
        table.add_column(column)
    for config in result.configs:
        plan = config.plan
        table.add_row(
            config.precision.value,
            "on" if config.gradient_checkpointing else "off",
            config.strategy.value,
            config.status.value if not config.reason else f"{config.status.value}: {config.reason}",
            str(config.max_batch_size or "-"),
            str(config.first_failing_batch_size or "-"),
            str(len(config.trials)),
            _peak_cell(config),
            _confirmation_cell(config),
            (
                f"{plan.per_device_train_batch_size} x {plan.gradient_accumulation_steps} x {plan.world_size}"
                f" = {plan.effective_batch_size}"
                if plan
                else "-"
            ),
        )
    console.print(table)
    rec = result.recommendation
    if rec is None:
        console.print("[bold red]no configuration reaches a plan[/]")
        return
    console.print(
        f"[bold]recommended:[/] {rec.precision.value}, checkpointing {rec.gradient_checkpointing}, "
        f"{rec.strategy.value} — {rec.why}"
    )
    console.print("TrainingArguments:")
    console.print_json(json.dumps(rec.training_arguments))
    console.print("from_pretrained / model_init_kwargs:")
    console.print_json(json.dumps(rec.model_init_kwargs))
    for variable, setting in rec.env.items():
        console.print(f"environment: {variable}={setting}")
    for name, value in (
        ("LoraConfig", rec.peft_config),
        ("BitsAndBytesConfig", rec.quantization_config),
        ("prepare_model_for_kbit_training", rec.prepare_model_for_kbit_training),
    ):
        if value is not None:
            console.print(f"{name}:")
            console.print_json(json.dumps(value))
    if result.timing_note:
        console.print(f"[dim]{result.timing_note}[/]")


def probe(
    seq_len: Annotated[int, typer.Option("--seq-len", help="sequence length; every sample is padded to it")],
    target_batch_size: Annotated[
        int, typer.Option("--target-batch-size", help="target effective batch size (all ranks)")
    ],
    architecture: Annotated[
        str | None, typer.Option("--architecture", help="model type, e.g. gpt2, llama, mistral, qwen2")
    ] = None,
    config_json: Annotated[
        str | None, typer.Option("--config-json", help="JSON object of config overrides")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="local directory with config.json, or a hub id")
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option("--precision", help="32-true, 16-mixed, bf16-mixed, bf16-true (repeat)"),
    ] = None,
    checkpointing: Annotated[
        list[str] | None, typer.Option("--checkpointing", help="on or off (repeat for both)")
    ] = None,
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy", help="single, ddp, fsdp (repeat); default single for 1 rank, ddp and fsdp above"
        ),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            "--optimizer", help="adamw_torch (default), adamw_torch_fused, adafactor, sgd, adamw_bnb_8bit"
        ),
    ] = None,
    attn_implementation: Annotated[
        str | None,
        typer.Option("--attn-implementation", help="sdpa (default), eager, flash_attention_2"),
    ] = None,
    finetuning: Annotated[
        str | None,
        typer.Option("--finetuning", help="full (default), lora, qlora (adapters on a 4-bit NF4 base)"),
    ] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank (default 16)")] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha (default 32)")] = None,
    lora_dropout: Annotated[
        float | None, typer.Option("--lora-dropout", help="dropout before each adapter (default 0.05)")
    ] = None,
    lora_target_modules: Annotated[
        str | None,
        typer.Option(
            "--lora-target-modules", help="all-linear (default) or comma-separated names, e.g. q_proj,v_proj"
        ),
    ] = None,
    sync_each_batch: Annotated[
        bool,
        typer.Option(
            "--sync-each-batch",
            help="fsdp: reduce-scatter after every accumulation micro-batch (Accelerate's sync_each_batch)",
        ),
    ] = False,
    world_size: Annotated[int, typer.Option("--world-size", help="data-parallel ranks")] = 1,
    device: Annotated[str, typer.Option("--device", help="cuda:N, simulated or predict")] = "simulated",
    memory: Annotated[
        str | None, typer.Option("--memory", help="memory for tensors, e.g. 320MiB, 80GiB")
    ] = None,
    gpu: Annotated[
        list[str] | None,
        typer.Option(
            "--gpu", help="predict for this card, e.g. H100-80GB; repeat to compare cards (one table each)"
        ),
    ] = None,
    headroom: Annotated[
        str | None, typer.Option("--headroom", help="memory a passing trial must leave free")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option("--max-batch-size", help="never try more")] = None,
    dataset_size: Annotated[int | None, typer.Option("--dataset-size", help="samples per epoch")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="epochs, for max_steps")] = None,
    warmup_ratio: Annotated[float | None, typer.Option("--warmup-ratio", help="warm-up share")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    allow_remote_code: Annotated[
        bool, typer.Option("--allow-remote-code", help="operator's consent to run a model's own code")
    ] = False,
    trial_timeout: Annotated[float, typer.Option("--trial-timeout", help="seconds per trial")] = 600.0,
    confirm_steps: Annotated[int, typer.Option("--confirm-steps", help="optimizer steps")] = 4,
    confirm_varied_steps: Annotated[
        int | None,
        typer.Option(
            "--confirm-varied-steps",
            help="optimizer steps at varying lengths after the confirmation's worst case (default: "
            "16 on cuda, 2 on simulated; 0: none)",
        ),
    ] = None,
    cuda_alloc_conf: Annotated[
        str | None,
        typer.Option(
            "--cuda-alloc-conf",
            help="PYTORCH_CUDA_ALLOC_CONF the job will use (default expandable_segments:True; '' for "
            "torch's defaults)",
        ),
    ] = None,
    predict_seeding: Annotated[
        bool,
        typer.Option(
            "--predict-seeding/--no-predict-seeding",
            help="cuda/simulated: predict each config on the CPU first; the device confirms it",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the result JSON only")] = False,
) -> None:
    """Find the largest batch size per precision × checkpointing, and the accumulation plan."""
    spec = build_spec(
        architecture=architecture,
        config_json=config_json,
        model=model,
        trust_remote_code=trust_remote_code,
        seq_len=seq_len,
        precision=precision or [],
        checkpointing=checkpointing or [],
        strategy=strategy or [],
        optimizer=optimizer,
        attn_implementation=attn_implementation,
        finetuning=finetuning,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules,
        sync_each_batch=sync_each_batch,
        target_batch_size=target_batch_size,
        world_size=world_size,
        device=device,
        memory=memory,
        gpu=gpu,
        headroom=headroom,
        max_batch_size=max_batch_size,
        dataset_size=dataset_size,
        epochs=epochs,
        warmup_ratio=warmup_ratio,
        trial_timeout=trial_timeout,
        confirm_steps=confirm_steps,
        predict_seeding=predict_seeding,
        confirm_varied_steps=confirm_varied_steps,
        cuda_alloc_conf=cuda_alloc_conf,
    )
    from probes.cards import run_request  # loaded after the flags are checked: `--help` stays fast

    console = Console(stderr=True)
    labels = [
        f"{card + ' ' if card else ''}{_label(p.value, c, s.value)}"
        for card in spec.cards or ("",)
        for p, c, s in spec.configs()
    ]
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed} trials"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
        auto_refresh=True,
    )
    view = _ProgressView(progress, labels)
    try:
        result = run_request(spec, on_event=view, allow_remote_code=allow_remote_code)
    except ProbeInputError as exc:
        view.stop()
        fail_input(exc.message + _known(exc))
    except ProbeError as exc:
        view.stop()
        sys.stderr.write(f"maxbatch: probe failed: {exc.message}\n")
        raise typer.Exit(ExitCode.FAILED) from exc
    view.stop()
    if as_json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    else:
        render_table(result, Console())
