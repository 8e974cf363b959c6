"""`python -m probes`: the child entry point's exit codes, result file and events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probes.spec import ModelSpec, ProbeResult, ProbeSpec

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}


def _spec(**fields: object) -> ProbeSpec:
    base: dict[str, object] = {
        "model": ModelSpec(architecture="gpt2", config=TINY_GPT2),
        "seq_len": 64,
        "precisions": ["32-true"],
        "gradient_checkpointing": [True],
        "target_effective_batch_size": 64,
        "memory_limit_bytes": 32 * 2**20,
    }
    base.update(fields)
    return ProbeSpec.model_validate(base)


def _run(tmp_path: Path, spec_text: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(spec_text)
    done = subprocess.run(
        [sys.executable, "-m", "probes", "run", "--spec", str(spec_path), "--result", str(result_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done, json.loads(result_path.read_text())


def test_run_writes_the_result_and_streams_events(tmp_path: Path) -> None:
    done, payload = _run(tmp_path, _spec().model_dump_json())
    assert done.returncode == 0, done.stderr
    result = ProbeResult.model_validate(payload)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(e["type"] == "event" for e in events)
    kinds = [e["event"]["kind"] for e in events]
    assert kinds[0] == "config_started"
    assert kinds[-1] == "config_done"
    assert kinds.count("trial") == len(result.configs[0].trials)


def test_bad_input_exits_2_with_the_error_code(tmp_path: Path) -> None:
    spec = _spec(model=ModelSpec(architecture="gtp2"))
    done, payload = _run(tmp_path, spec.model_dump_json())
    assert done.returncode == 2
    error = payload["error"]
    assert isinstance(error, dict)
    assert error["code"] == "unknown-architecture"
    assert "gpt2" in error["known"]


def test_unreadable_spec_exits_2(tmp_path: Path) -> None:
    done, payload = _run(tmp_path, '{"model": {}}')
    assert done.returncode == 2
    assert payload["error"]["code"] == "invalid-probe"  # type: ignore[index]


PARENT = """
import subprocess, sys, time
command = [sys.executable, "-m", "probes", "run", "--spec", sys.argv[1], "--result", sys.argv[2]]
with open(sys.argv[3], "w") as events:
    child = subprocess.Popen(command, stdout=events)
print(child.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_the_probe_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    events_path = tmp_path / "events.jsonl"
    # Large enough to still be searching when the parent dies.
    spec_path.write_text(
        _spec(gradient_checkpointing=[False, True], precisions=["32-true", "bf16-mixed"]).model_dump_json()
    )
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, str(spec_path), str(result_path), str(events_path)],
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # Kill the parent once the probe is searching (its first trial reported), not after a guess.
        deadline = time.monotonic() + 120
        while '"trial"' not in events_path.read_text():
            assert time.monotonic() < deadline, "the probe reported no trial within 120 s"
            assert not _gone(child), "the probe ended before its parent was killed"
            time.sleep(0.05)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 60
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(child)
    assert json.loads(result_path.read_text())["error"]["code"] == "cancelled"
