"""The `maxbatch` entry point turns every usage error into one line on stderr and exit code 2."""

from __future__ import annotations

import pytest

from app.cli import main


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["probe", "--seq-len", "abc", "--target-batch-size", "3"], "Invalid value for '--seq-len'"),
        (["probe", "--target-batch-size", "3"], "Missing option '--seq-len'"),
        (["bogus"], "No such command 'bogus'"),
        ([], "Missing command"),
        (
            ["probe", "--seq-len", "8", "--target-batch-size", "3", "--architecture", "gpt2"],
            "memory_limit_bytes",
        ),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("maxbatch: error: ")
    assert fragment in lines[0]


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "probe" in capsys.readouterr().out
