"""`maxbatch probe` turns bad flags into one line on stderr and exit code 2 (no probe runs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--seq-len", "128", "--target-batch-size", "256", "--device", "simulated", "--memory", "320MiB"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--architecture", "gpt2", "--config-json", "{n_layer: 2}"], "--config-json is not valid JSON"),
        (["--architecture", "gpt2", "--config-json", "[1, 2]"], "must be a JSON object"),
        (["--architecture", "gpt2", "--precision", "fp8"], "unknown precision 'fp8'"),
        (["--architecture", "gpt2", "--checkpointing", "maybe"], "--checkpointing takes on or off"),
        (["--architecture", "gpt2", "--memory", "lots"], "cannot read 'lots' as a size"),
        (["--model", "x", "--architecture", "gpt2"], "exactly one of model.architecture"),
        ([], "exactly one of model.architecture"),
        (["--architecture", "gpt2", "--world-size", "0"], "world_size"),
        (["--architecture", "gpt2", "--gpu", "H100-80GB"], "use it with device 'predict'"),
        (["--architecture", "gpt2", "--world-size", "8", "--strategy", "deepspeed"], "DeepSpeed ZeRO is not"),
        (["--architecture", "gpt2", "--strategy", "tp"], "unknown strategy 'tp'"),
        (["--architecture", "gpt2", "--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["--architecture", "gpt2", "--attn-implementation", "flex"], "attn_implementation"),
        (["--architecture", "gpt2", "--finetuning", "dora"], "unknown finetuning 'dora'"),
        (["--architecture", "gpt2", "--finetuning", "lora", "--lora-r", "0"], "lora_r"),
        (["--architecture", "gpt2", "--lora-dropout", "1"], "lora_dropout"),
        (["--architecture", "gpt2", "--lora-target-modules", "all-linear,c_attn"], "cannot be combined"),
        (["--architecture", "gpt2", "--sync-each-batch"], "strategies has no fsdp (single)"),
        (
            ["--architecture", "gpt2", "--world-size", "2", "--strategy", "ddp", "--sync-each-batch"],
            "sync_each_batch changes how fsdp accumulates gradients",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(app: typer.Typer, args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(app, ["probe", *BASE, *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("maxbatch: error: ")
    assert fragment in lines[0]


def test_unknown_gpu_is_refused_before_the_engine_starts(app: typer.Typer) -> None:
    args = ["probe", "--seq-len", "128", "--target-batch-size", "256", "--architecture", "gpt2"]
    result = CliRunner().invoke(app, [*args, "--device", "predict", "--gpu", "H100-81GB"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "unknown GPU 'H100-81GB'" in line
    assert "known: " in line
    assert "H100-80GB" in line
    too_much = CliRunner().invoke(
        app, [*args, "--device", "predict", "--gpu", "t4-16gb", "--memory", "80GiB"]
    )
    assert too_much.exit_code == 2
    assert "exceeds the T4-16GB's memory" in too_much.stderr


def test_an_input_error_from_the_engine_draws_no_progress_bars(app: typer.Typer) -> None:
    """An unknown architecture is found by the engine's first child: still one line, no bars above it."""
    result = CliRunner().invoke(app, ["probe", *BASE, "--architecture", "no-such-model"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("maxbatch: error: unknown causal-LM architecture 'no-such-model'")


def test_the_cli_process_writes_one_line_for_an_unknown_architecture() -> None:
    """The command as a user runs it (a real process, its forkserver and children writing to the same
    stderr): nothing on stdout, one line on stderr — no progress display, no blank line left by one
    that never started, no notice from a package the probe imported."""
    command = ["probe", "--architecture", "nosuch", "--seq-len", "64", "--target-batch-size", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *command, "--memory", "64MiB"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("maxbatch: error: unknown causal-LM architecture 'nosuch'")


def test_the_bitsandbytes_hub_kernel_notice_is_dropped_and_other_messages_are_not() -> None:
    code = textwrap.dedent(
        """
        import logging, sys
        import probes.worker  # loads TrainingArguments, so peft, so bitsandbytes
        logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no kernels")
        logger.warning("another bitsandbytes warning")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr
    assert "another bitsandbytes warning" in done.stderr
