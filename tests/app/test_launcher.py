"""``maxbatch plan`` against a real running service: the three formats, the exit codes.

Two services run for the module (``maxbatch serve`` subprocesses, local dispatcher): one with the
real probe engine (a tiny GPT-2 on ``simulated``; the first plan runs it, later ones are answered
from the cache) and one with the fake probe child and a bearer token, for the failure paths.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from app.cli import cli
from app.launcher import EXIT_CODES, PROBE_ONLY_FLAGS, Format, plan_job, training_flags
from tests.app.conftest import FAKE_PROBE
from tests.app.live_server import ROOT, LiveServer, free_port


def _hf_parse(flags: list[str]) -> Any:
    """``flags`` as a ``HfArgumentParser(TrainingArguments)`` script reads them."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)  # type: ignore[arg-type]  # transformers' stub is narrower
    (args,) = parser.parse_args_into_dataclasses(args=flags, look_for_args_file=False)
    return args


TINY_GPT2 = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 256, "n_positions": 64}
TOKEN = "s3cret-launcher-token"


def _request(config: dict[str, Any], *extra: str) -> list[str]:
    return [
        "--architecture",
        "gpt2",
        "--config-json",
        json.dumps(config),
        "--seq-len",
        "32",
        "--target-batch-size",
        "16",
        "--precision",
        "32-true",
        "--checkpointing",
        "off",
        "--device",
        "simulated",
        "--memory",
        "8MiB",
        *extra,
    ]


def plan(server: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "plan", "--server", server, *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("launcher-real") / "data"
    with LiveServer(data, {"MAXBATCH_NVML": "off", "MAXBATCH_INSPECT_MODELS": "false"}) as server:
        yield server.url


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("launcher-fake") / "data"
    env = {
        "MAXBATCH_NVML": "off",
        "MAXBATCH_API_TOKEN": TOKEN,
        "MAXBATCH_PROBE_COMMAND": json.dumps([sys.executable, str(FAKE_PROBE)]),
    }
    with LiveServer(data, env) as server:
        yield server.url


@pytest.fixture(scope="module")
def recommendation(real_server: str) -> dict[str, Any]:
    done = plan(real_server, *_request(TINY_GPT2), "--format", "json")
    assert done.returncode == 0, done.stderr
    assert "maxbatch: job " in done.stderr  # progress went to stderr
    answer = json.loads(done.stdout)
    assert answer["device"]["kind"] == "simulated"
    rec: dict[str, Any] = answer["recommendation"]
    return rec


@pytest.mark.slow
def test_args_read_back_by_a_real_hf_argument_parser(
    real_server: str, recommendation: dict[str, Any], tmp_path: Path
) -> None:
    done = plan(real_server, *_request(TINY_GPT2), "--format", "args")
    assert done.returncode == 0, done.stderr
    assert "answered from an earlier identical probe" in done.stderr
    # flags cannot carry the job's environment: the advice goes to stderr
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in done.stderr
    flags = shlex.split(done.stdout)
    assert flags[0] == "--per_device_train_batch_size"
    args = _hf_parse([*flags, "--output_dir", str(tmp_path / "out")])
    plan_ = recommendation["plan"]
    assert args.per_device_train_batch_size == plan_["per_device_train_batch_size"]
    assert args.gradient_accumulation_steps == plan_["gradient_accumulation_steps"]
    for name, value in recommendation["training_arguments"].items():
        if name != "output_dir":
            assert getattr(args, name) == value, name


@pytest.mark.slow
def test_env_is_what_a_shell_can_eval(real_server: str, recommendation: dict[str, Any]) -> None:
    command = shlex.join(
        [
            sys.executable,
            "-m",
            "app.cli",
            "plan",
            "--server",
            real_server,
            *_request(TINY_GPT2),
            "--format",
            "env",
        ]
    )
    script = (
        f'eval "$({command})" && echo "$MAXBATCH_PER_DEVICE_TRAIN_BATCH_SIZE '
        "$MAXBATCH_GRADIENT_ACCUMULATION_STEPS $MAXBATCH_PRECISION $MAXBATCH_GRADIENT_CHECKPOINTING "
        '$MAXBATCH_STRATEGY" '
        '&& echo "$MAXBATCH_TRAINING_ARGS" && echo "$PYTORCH_CUDA_ALLOC_CONF"'
    )
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    values, args, alloc_conf = done.stdout.splitlines()
    plan_ = recommendation["plan"]
    assert values.split() == [
        str(plan_["per_device_train_batch_size"]),
        str(plan_["gradient_accumulation_steps"]),
        recommendation["precision"],
        str(recommendation["gradient_checkpointing"]).lower(),
        recommendation["strategy"],
    ]
    assert shlex.split(args) == training_flags(recommendation["training_arguments"])
    # the job's environment as the confirmation ran with it, exported as the variable itself
    assert recommendation["env"] == {"PYTORCH_CUDA_ALLOC_CONF": alloc_conf}
    assert alloc_conf == "expandable_segments:True"


def _fake(
    server: str, config: dict[str, Any], *extra: str, token: str | None = TOKEN
) -> subprocess.CompletedProcess[str]:
    auth = ["--token", token] if token else []
    return plan(server, *_request({"n_layer": 2, **config}, *auth, *extra), timeout=120)


def test_a_finished_probe_without_a_plan_exits_4(fake_server: str) -> None:
    done = _fake(fake_server, {"fake": "ok", "case": "no-plan"})
    assert done.returncode == 4, done.stderr
    assert done.stdout == ""
    assert "no plan reaches the target" in done.stderr


def test_a_failed_probe_exits_3(fake_server: str) -> None:
    done = _fake(fake_server, {"fake": "exit3"})
    assert done.returncode == 3, done.stderr
    assert "every trial crashed" in done.stderr


def test_bad_flags_exit_2_before_any_request() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    done = plan(nobody, *_request(TINY_GPT2, "--world-size", "0"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "world_size" in done.stderr


def test_a_request_the_service_refuses_exits_2_with_its_reason(fake_server: str) -> None:
    done = _fake(fake_server, {}, "--device", "gpu", "--gpu-type", "h100_80gb")
    assert done.returncode == 2, done.stderr
    assert "no node has a H100-80GB" in done.stderr
    without_token = _fake(fake_server, {}, token=None)
    assert without_token.returncode == 2
    assert "Bearer" in without_token.stderr


def test_no_answer_exits_5(fake_server: str) -> None:
    unreachable = plan(f"http://127.0.0.1:{free_port()}", *_request(TINY_GPT2))
    assert unreachable.returncode == 5
    assert "cannot reach the maxbatch service" in unreachable.stderr
    slow = _fake(fake_server, {"fake": "sleep", "fake_seconds": 30}, "--timeout", "1")
    assert slow.returncode == 5, slow.stderr
    assert "no answer within the --timeout" in slow.stderr


def test_plan_takes_every_probe_flag_and_documents_its_exit_codes() -> None:
    commands = typer.main.get_command(cli).commands  # type: ignore[attr-defined]
    probe = {p.name for p in commands["probe"].params} - set(PROBE_ONLY_FLAGS)
    planned = {p.name for p in commands["plan"].params}
    assert probe <= planned
    assert planned - probe == {"server", "token", "gpu_type", "output", "timeout"}
    help_text = commands["plan"].help or ""
    for code in EXIT_CODES:
        assert str(code) in help_text


def test_training_flags_round_trip_through_hf_argument_parser(tmp_path: Path) -> None:
    arguments = {
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 4,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "bf16": True,
        "max_steps": 120,
        "warmup_steps": 12,
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        "output_dir": "ignored",
    }
    flags = training_flags(arguments)
    assert "--output_dir" not in flags
    args = _hf_parse([*flags, "--use_cpu", "True", "--output_dir", str(tmp_path)])
    for name in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_grad_norm",
        "bf16",
        "max_steps",
    ):
        assert getattr(args, name) == arguments[name]
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("sync_each_batch", [False, True])
def test_strategy_arguments_read_back_by_a_real_hf_argument_parser(
    strategy: str, checkpointing: bool, sync_each_batch: bool, tmp_path: Path
) -> None:
    """What the recommendation emits for DDP and FSDP2 survives ``--format args`` (``fsdp=True`` is
    the bare ``--fsdp``; ``--fsdp True`` is refused by transformers as an unknown legacy option;
    ``accelerator_config`` is JSON)."""
    from probes.hf_support import training_arguments_support
    from probes.recommend import training_arguments
    from probes.spec import Plan, Precision, ProbeSpec, Strategy

    spec = ProbeSpec.model_validate(
        {
            "model": {"architecture": "llama"},
            "seq_len": 64,
            "target_effective_batch_size": 64,
            "world_size": 2,
            "device": "simulated",
            "memory_limit_bytes": 2**30,
            "sync_each_batch": sync_each_batch,
        }
    )
    plan_ = Plan(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        world_size=2,
        effective_batch_size=64,
        exact=True,
    )
    arguments = training_arguments(
        precision=Precision.BF16_MIXED,
        gradient_checkpointing=checkpointing,
        plan=plan_,
        spec=spec,
        support=training_arguments_support(),
        strategy=Strategy(strategy),
        layer_classes=("LlamaDecoderLayer",),
    )
    args = _hf_parse([*training_flags(arguments), "--use_cpu", "True", "--output_dir", str(tmp_path)])
    assert args.per_device_train_batch_size == 4
    assert args.gradient_accumulation_steps == 8
    if strategy == "fsdp":
        assert args.fsdp is True
        assert args.fsdp_config["version"] == 2
        assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
        assert args.fsdp_config["activation_checkpointing"] is checkpointing
        sync = args.accelerator_config.gradient_accumulation_kwargs or {}
        assert sync.get("sync_each_batch", False) is sync_each_batch
    else:
        assert not args.fsdp
        assert args.ddp_find_unused_parameters is (not checkpointing)


def test_no_plan_names_each_config_with_its_strategy() -> None:
    from app.launcher import EXIT_NO_PLAN, _Exit, plan_job

    config = {"precision": "bf16-mixed", "gradient_checkpointing": True, "status": "ok", "plan": None}
    result = {"configs": [{**config, "strategy": "ddp", "reason": "batch size 1 needs 90 GiB"}, config]}
    with pytest.raises(_Exit) as stopped:
        plan_job({"id": "j", "status": "succeeded", "result": result}, Format.JSON)
    assert stopped.value.code == EXIT_NO_PLAN
    message = stopped.value.message
    assert "bf16-mixed ckpt on ddp: batch size 1 needs 90 GiB" in message
    assert "bf16-mixed ckpt on single: ok" in message


CARDS = ["--device", "predict", "--gpu", "A100-80GB", "--gpu", "H100-80GB"]


def test_a_launch_plan_for_several_cards_is_refused_before_any_request() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    for output in ("args", "env"):
        done = plan(nobody, *_request(TINY_GPT2, *CARDS, "--format", output))
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1
        assert "a launch plan is for one card" in done.stderr
        assert "A100-80GB, H100-80GB" in done.stderr


def test_several_cards_without_a_plan_exit_4_naming_every_card_s_configs(fake_server: str) -> None:
    done = _fake(fake_server, {"fake": "ok"}, *CARDS, "--format", "json")  # the fake recommends nothing
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("32-true ckpt off single") == 2


def test_json_for_several_cards_prints_each_card_s_recommendation() -> None:
    recommendation = {"precision": "bf16-mixed", "plan": {"per_device_train_batch_size": 8}}
    cards: list[dict[str, Any]] = [
        {"gpu": "T4-16GB", "device": {"name": "predict: T4-16GB"}, "configs": [], "recommendation": None},
        {
            "gpu": "H100-80GB",
            "device": {"name": "predict: H100-80GB"},
            "configs": [],
            "recommendation": recommendation,
        },
    ]
    job = {"id": "j1", "status": "succeeded", "result": {**cards[0], "cards": cards}}
    code, text = plan_job(job, Format.JSON)
    assert code == 0
    answer = json.loads(text)
    assert answer == {
        "job_id": "j1",
        "cards": [
            {"gpu": "T4-16GB", "device": {"name": "predict: T4-16GB"}, "recommendation": None},
            {"gpu": "H100-80GB", "device": {"name": "predict: H100-80GB"}, "recommendation": recommendation},
        ],
    }
