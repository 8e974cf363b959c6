"""A stand-in for ``python -m probes`` that speaks the same protocol, fast and without torch.

``run --spec S --result R``: behaves as ``spec.model.config["fake"]`` says (default ``ok``):
``ok`` events and a result; ``sleep`` hangs; ``sigkill`` kills itself; ``exit1`` / ``exit2`` /
``exit3`` exit so; ``noresult`` exits 0 without a result; ``garbage`` prints non-JSON first;
``spawn`` starts a sleeping grandchild (pid to ``fake_pidfile``) and hangs; ``stall`` hangs after
its first trial; ``configs_fail`` / ``configs_skip`` end every config failed / skipped. ``fake_delay``
sleeps before each event; ``fake_max`` is the largest fitting batch size (0: none fits). Every run appends
``run <job id> <behaviour>`` to ``$MAXBATCH_FAKE_RUN_LOG`` (when set); ``fake_pidfile`` gets its pid.

``inspect-server``: answers per line; architecture ``nope`` is unknown, ``seq_len`` over
``n_positions`` (default 1024) is too long, ``name_or_path`` containing ``missing`` is not found,
``fake_inspect`` = ``die`` / ``hang`` / ``slow`` makes it die, hang or take a second; ``gate`` makes
it wait until the file ``fake_gate`` names exists.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from probes.protocol import (
    ErrorDocument,
    ErrorInfo,
    EventLine,
    InspectFailed,
    InspectOk,
    InspectReply,
    InspectRequest,
    MalformedMessage,
    parse_inspect_request,
)
from probes.spec import (
    CardResult,
    ConfigResult,
    ConfigStatus,
    DeviceInfo,
    EventKind,
    ModelFacts,
    Outcome,
    Plan,
    Precision,
    ProbeEvent,
    ProbeResult,
    ProbeSpec,
    TrialRecord,
    Versions,
)


def _log(line: str) -> None:
    path = os.environ.get("MAXBATCH_FAKE_RUN_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(line + "\n")


def _emit(event: ProbeEvent, delay: float) -> None:
    if delay:
        time.sleep(delay)
    print(EventLine(event=event).model_dump_json(), flush=True)


def _error(path: Path, code: str, message: str, status: int) -> None:
    error = ErrorInfo(code=code, message=message, known=["gpt2"])
    path.write_text(ErrorDocument(error=error).model_dump_json())
    sys.exit(status)


def _before_the_first_event(behaviour: str, result_path: Path) -> None:
    """The behaviours that print garbage first, or end before any event."""
    if behaviour == "garbage":
        print("this is not json", flush=True)
        print(json.dumps({"type": "something-new", "x": 1}), flush=True)
        print(json.dumps({"type": "event", "event": {"kind": "nonsense"}}), flush=True)
    if behaviour == "exit1":
        print("Traceback (most recent call last):\nRuntimeError: boom from the fake probe", file=sys.stderr)
        sys.exit(1)
    if behaviour == "exit2":
        _error(result_path, "sequence-too-long", "seq_len 4096 exceeds the model's 1024 positions", 2)
    if behaviour == "exit3":
        _error(result_path, "probe-failed", "every trial crashed", 3)
    if behaviour == "noresult":
        sys.exit(0)


def run(spec_path: Path, result_path: Path) -> None:
    spec = ProbeSpec.model_validate_json(spec_path.read_text())
    cfg = spec.model.config
    behaviour = str(cfg.get("fake", "ok"))
    delay = float(cfg.get("fake_delay", 0))
    largest = int(cfg.get("fake_max", 4))
    _log(f"run {os.environ.get('MAXBATCH_JOB_ID')} {behaviour}")
    if "fake_pidfile" in cfg:
        Path(cfg["fake_pidfile"]).write_text(str(os.getpid()))
    configs = spec.configs()
    _before_the_first_event(behaviour, result_path)
    cards = spec.cards or (None,)
    per_card: list[list[ConfigResult]] = []
    for position, card in enumerate(cards):
        # a multi-card predict: every card after the first fits twice as much
        fits = largest * 2**position if card is not None else largest
        per_card.append(_run_card(spec, card, position * len(configs), len(cards), fits, delay))
    _write_result(spec, per_card, result_path)


def _run_card(
    spec: ProbeSpec, card: str | None, offset: int, card_count: int, largest: int, delay: float
) -> list[ConfigResult]:
    """One card's configs (the request's only card when ``card`` is ``None``)."""
    cfg = spec.model.config
    behaviour = str(cfg.get("fake", "ok"))
    configs = spec.configs()
    results: list[ConfigResult] = []
    for index, (precision, checkpointing, strategy) in enumerate(configs):
        common = {
            "precision": precision,
            "gradient_checkpointing": checkpointing,
            "strategy": strategy,
            "config_index": offset + index,
            "config_count": len(configs) * card_count,
            "gpu": card,
        }
        _emit(ProbeEvent(kind=EventKind.CONFIG_STARTED, phase="search", **common), delay)
        if behaviour in ("sleep", "spawn"):
            if behaviour == "spawn":
                child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
                Path(cfg["fake_grandchild_pidfile"]).write_text(str(child.pid))
            time.sleep(float(cfg.get("fake_seconds", 3600)))
        trials: list[TrialRecord] = []
        for size in (1, 2, 4, 8) if behaviour not in ("configs_fail", "configs_skip") else ():
            fits = size <= largest
            trial = TrialRecord(
                batch_size=size,
                outcome=Outcome.FIT if fits else Outcome.OOM,
                peak_allocated_bytes=1000 * size,
                step_seconds=0.01,
                accumulation_steps=2,
                optimizer_steps=2,
            )
            trials.append(trial)
            _emit(ProbeEvent(kind=EventKind.TRIAL, trial=trial, phase="search", **common), delay)
            if behaviour == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if behaviour == "stall":
                time.sleep(float(cfg.get("fake_seconds", 3600)))
            if not fits:
                break
        if behaviour in ("configs_fail", "configs_skip"):
            config = _unanswered(behaviour, precision, checkpointing)
            results.append(config)
            _emit(ProbeEvent(kind=EventKind.CONFIG_DONE, config=config, **common), delay)
            continue
        if largest < 1:
            config = ConfigResult(
                precision=precision,
                gradient_checkpointing=checkpointing,
                status=ConfigStatus.OK,
                reason="batch size 1 does not fit: no batch size trains here",
                first_failing_batch_size=1,
                trials=tuple(trials),
            )
            results.append(config)
            _emit(ProbeEvent(kind=EventKind.CONFIG_DONE, config=config, **common), delay)
            continue
        best = max(t.batch_size for t in trials if t.outcome is Outcome.FIT)
        accumulation = max(1, spec.target_effective_batch_size // (best * spec.world_size))
        config = ConfigResult(
            precision=precision,
            gradient_checkpointing=checkpointing,
            strategy=strategy,
            status=ConfigStatus.OK,
            max_batch_size=best,
            first_failing_batch_size=next(
                (t.batch_size for t in trials if t.outcome is not Outcome.FIT), None
            ),
            peak_memory_bytes=1000 * best,
            trials=tuple(trials),
            plan=Plan(
                per_device_train_batch_size=best,
                gradient_accumulation_steps=accumulation,
                world_size=spec.world_size,
                effective_batch_size=best * accumulation * spec.world_size,
                exact=best * accumulation * spec.world_size == spec.target_effective_batch_size,
            ),
        )
        results.append(config)
        _emit(ProbeEvent(kind=EventKind.CONFIG_DONE, config=config, **common), delay)
    return results


def _write_result(spec: ProbeSpec, per_card: list[list[ConfigResult]], result_path: Path) -> None:
    device = DeviceInfo(
        kind="simulated",
        name="fake",
        total_memory_bytes=spec.memory_limit_bytes or 1,
        bf16_supported=False,
    )
    if spec.cards:  # as probes.cards: the top level is the first card's
        device = device.model_copy(update={"name": f"fake {spec.cards[0]}"})
    result = ProbeResult(
        spec=spec,
        device=device,
        configs=tuple(per_card[0]),
        versions=Versions(maxbatch="0", python=sys.version.split()[0]),
        elapsed_seconds=0.01,
        cards=tuple(
            CardResult(
                gpu=card,
                device=device.model_copy(update={"name": f"fake {card}"}),
                configs=tuple(results),
                elapsed_seconds=0.01,
                trials_run=sum(len(c.trials) for c in results),
            )
            for card, results in zip(spec.cards, per_card, strict=True)
        )
        if spec.cards
        else None,
    )
    result_path.write_text(result.model_dump_json())


def _unanswered(behaviour: str, precision: Precision, checkpointing: bool) -> ConfigResult:
    """A config that failed (its trials crashed) or was skipped (the device lacks bf16)."""
    if behaviour == "configs_fail":
        crashed = TrialRecord(
            batch_size=1,
            outcome=Outcome.CRASH,
            message="the child process exited with code 255 without reporting",
        )
        return ConfigResult(
            precision=precision,
            gradient_checkpointing=checkpointing,
            status=ConfigStatus.FAILED,
            reason="the trial at batch size 1 ended in crash (the child process exited with code 255)",
            trials=(crashed, crashed),
        )
    return ConfigResult(
        precision=precision,
        gradient_checkpointing=checkpointing,
        status=ConfigStatus.SKIPPED,
        reason="fake has no native bf16; use 16-mixed or 32-true",
    )


def _inspect(request: InspectRequest) -> InspectReply:
    model = request.model
    positions = int(model.config.get("n_positions", 1024))
    if model.architecture == "nope":
        error = ErrorInfo(
            code="unknown-architecture",
            message="unknown architecture 'nope'",
            known=["gpt2", "llama", "mistral"],
        )
    elif "missing" in (model.name_or_path or ""):
        error = ErrorInfo(code="model-not-found", message="no such model")
    elif request.seq_len > positions:
        error = ErrorInfo(
            code="sequence-too-long",
            message=f"seq_len {request.seq_len} exceeds the model's {positions} positions",
        )
    else:
        facts = ModelFacts(
            model_type=model.architecture or "gpt2",
            architecture_class="GPT2LMHeadModel",
            parameter_count=12345,
            max_positions=positions,
            vocab_size=int(model.config.get("vocab_size", 1000)),
        )
        return InspectOk(model=facts)
    return InspectFailed(error=error)


def inspect_server() -> None:
    for line in sys.stdin:
        try:
            request = parse_inspect_request(line)
        except MalformedMessage as exc:  # the service's warm-up line, "{}", among others
            print(InspectFailed(error=ErrorInfo(code="invalid-probe", message=exc.message)).model_dump_json())
            sys.stdout.flush()
            continue
        _log(f"inspect {request.model.label}")
        mode = request.model.config.get("fake_inspect")
        if mode == "die":
            print("inspector: dying on purpose", file=sys.stderr, flush=True)
            os._exit(1)
        if mode == "hang":
            time.sleep(3600)
        if mode == "slow":
            time.sleep(1)
        if mode == "gate":  # wait for the test to create the file named by fake_gate
            gate = Path(str(request.model.config["fake_gate"]))
            while not gate.exists():
                time.sleep(0.01)
        print("a line that is not an answer", flush=True)
        print(_inspect(request).model_dump_json(), flush=True)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["inspect-server"]:
        inspect_server()
        return
    if args[:1] != ["run"]:
        sys.exit(f"fake probe: unknown command {args}")
    spec = Path(args[args.index("--spec") + 1])
    result = Path(args[args.index("--result") + 1])
    run(spec, result)


if __name__ == "__main__":
    main()
