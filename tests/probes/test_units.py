from __future__ import annotations

import pytest

from probes.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("320MiB", 320 * 2**20),
        ("80GB", 80 * 10**9),
        ("80gib", 80 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1048576", 2**20),
        (" 64 MiB ", 64 * 2**20),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-5MiB", "0", "1..2GB"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(320 * 2**20) == "320.00 MiB"
    assert format_bytes(3 * 2**29) == "1.50 GiB"
