"""The GPU check's own logic, where no GPU is needed: its verdicts, and what it does without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gpu_check

GiB = 2**30


def _trial(outcome: str, allocated: int | None = None, reserved: int | None = None) -> dict[str, object]:
    return {"outcome": outcome, "allocated": allocated, "reserved": reserved}


@pytest.mark.parametrize(
    ("check", "measured", "predicted", "verdict"),
    [
        ("fp32-attention", _trial("fit", 100 * GiB), _trial("fit", reserved=98 * GiB), "within 5 %"),
        ("fp32-attention", _trial("fit", 100 * GiB), _trial("fit", reserved=90 * GiB), "OUTSIDE 5 %"),
        ("fp32-attention", _trial("oom", 32 * GiB), _trial("fit", reserved=42 * GiB), "no verdict"),
        ("fsdp-fake8", _trial("fit", 20 * GiB), _trial("fit", reserved=21 * GiB), "predicted covers"),
        ("ddp-nccl", _trial("fit", 21 * GiB), _trial("fit", reserved=20 * GiB), "PREDICTED TOO LOW"),
        ("ddp-nccl", _trial("fit", None), _trial("fit", reserved=20 * GiB), "a peak is missing"),
    ],
)
def test_a_distributed_pair_gets_a_verdict_only_when_both_trials_fit(
    check: str, measured: dict[str, object], predicted: dict[str, object], verdict: str
) -> None:
    assert verdict in gpu_check.distributed_verdict(check, measured, predicted)


def test_without_cuda_it_says_so_writes_the_report_and_exits_3(tmp_path: Path) -> None:
    if gpu_check.cuda_available()[0]:
        pytest.skip("a CUDA GPU is visible: the check would run for real")
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "7"]) == 3
    report = (tmp_path / "gpu_check.md").read_text(encoding="utf-8")
    assert "no CUDA GPU is visible" in report


def test_the_ranking_check_orders_a_real_result_both_ways(tmp_path: Path) -> None:
    from probes.engine import run_probe
    from probes.spec import ModelSpec, ProbeSpec

    spec = ProbeSpec(
        model=ModelSpec(
            architecture="gpt2", config={"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}
        ),
        seq_len=64,
        precisions=["32-true", "bf16-mixed"],
        gradient_checkpointing=[False],
        target_effective_batch_size=16,
        device="simulated",
        memory_limit_bytes=64 * 2**20,
        max_batch_size_limit=16,
    )
    path = tmp_path / "result.json"
    path.write_text(run_probe(spec).model_dump_json(), encoding="utf-8")
    line = gpu_check.ranking_lines(path, "NVIDIA H200, 139.8 GiB, capability 9.0")[-1]
    assert line.startswith("- ranking check (H200-141GB): estimated fastest first ['bf16-mixed', '32-true']")
    assert "same order" in line or "ORDER DIFFERS" in line
    unknown = gpu_check.ranking_lines(path, "Some Future Card, 512.0 GiB")[-1]
    assert "no throughput figure" in unknown
