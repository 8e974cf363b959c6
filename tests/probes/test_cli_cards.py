"""`maxbatch probe --device predict --gpu A --gpu B`: one table per card; bad card lists, one line."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from probes.spec import MAX_CARDS

TINY = json.dumps({"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000})
PREDICT = ["--seq-len", "128", "--target-batch-size", "256", "--architecture", "gpt2", "--device", "predict"]


@pytest.mark.parametrize(
    ("cards", "fragment"),
    [
        (["H100-80GB", "H100-81GB"], "unknown GPU 'H100-81GB'"),
        (["H100-80GB"] * (MAX_CARDS + 1), f"compare at most {MAX_CARDS}"),
    ],
)
def test_a_bad_list_of_cards_is_one_line_and_exit_2(
    app: typer.Typer, cards: list[str], fragment: str
) -> None:
    flags = [flag for card in cards for flag in ("--gpu", card)]
    result = CliRunner().invoke(app, ["probe", *PREDICT, *flags])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("maxbatch: error: ")
    assert fragment in lines[0]


def test_cards_need_predict(app: typer.Typer) -> None:
    args = ["probe", "--seq-len", "128", "--target-batch-size", "256", "--architecture", "gpt2"]
    result = CliRunner().invoke(app, [*args, "--memory", "64MiB", "--gpu", "T4-16GB", "--gpu", "L4-24GB"])
    assert result.exit_code == 2
    assert "use it with device 'predict'" in result.stderr


@pytest.mark.slow
def test_two_cards_print_a_table_each(app: typer.Typer) -> None:
    flags = [*PREDICT, "--config-json", TINY, "--memory", "64MiB", "--precision", "32-true"]
    flags += ["--precision", "bf16-mixed", "--checkpointing", "off", "--gpu", "T4-16GB", "--gpu", "A100-40GB"]
    table = CliRunner().invoke(app, ["probe", *flags], env={"COLUMNS": "300"})
    assert table.exit_code == 0, table.output
    out = table.stdout
    assert out.count("recommended:") == 2
    assert out.index("predict: T4-16GB") < out.index("predict: A100-40GB")
    assert out.count("skipped") == 1  # bf16 on the T4 (no native bf16)
    assert "T4-16GB: " in out
    assert "trials run" in out


def test_no_gpu_flag_given_as_an_empty_sequence_is_no_card() -> None:
    """`maxbatch plan` hands probe's flags on as typer parsed them: an absent repeatable flag may
    arrive as an empty tuple (the deploy scripts' plan did), which means no card."""
    from probes.cli import _cards

    assert _cards(()) is None
    assert _cards([]) is None
    assert _cards(("H100-80GB",)) == "H100-80GB"
    assert _cards(("H100-80GB", "T4-16GB")) == ["H100-80GB", "T4-16GB"]
