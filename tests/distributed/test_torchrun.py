"""The answer holds for the job as it runs: real ranks under ``torchrun`` (gloo, CPU), memory counted.

For each cell below, maxbatch probes the job in one process (``simulated``, the fake process group
of ``world_size`` ranks), then one ``torchrun`` launch per world size runs, on every rank, with the
simulated cap (see ``rank_main.py``):

1. maxbatch's own trial on the *real* process group, at the answer's batch size: its rank-0 peak
   must equal the peak of the single-process trial that backs the answer within 1 % (it is equal to
   the byte);
2. the job at the returned plan — HF ``Trainer`` with the recommended ``training_arguments`` for
   DDP; for FSDP2, Accelerate's own FSDP2 preparation and Trainer's loop by hand, because on the
   CPU Trainer wraps FSDP requests in DDP (see ``rank_main.py``) — must fit on every rank;
3. the same job at ``first_failing_batch_size`` (with the trials' two accumulation steps) must run
   out of memory on a rank.

The GPT-2 DDP cell is the issue's report: 400 MiB, target 64 over 2 ranks, where the old
single-process answer (8) ran out of memory under ``torchrun``; the single-process answer is probed
beside DDP and shown to run out too.

Matrix (each axis value appears, none twice in the same launch): 2 ranks — GPT-2 with DDP, Llama
with FSDP2; 4 ranks — Llama with DDP, GPT-2 with FSDP2. So every model meets every strategy, and
every strategy runs at 2 and 4 ranks, in two launches (each launch costs ~4 s of imports per rank on
these 2 cores, and 4 ranks share them). LoRA, at 2 ranks: Llama with DDP, GPT-2 with FSDP2 — the
job builds its adapters as a user's script does, ``get_peft_model(model, LoraConfig(**peft_config))``
with the recommendation's ``peft_config``, before Trainer (DDP then buckets only the adapters'
gradients) or Accelerate's FSDP2 preparation (same units; the optimizer over the trainable
parameters).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from probes import run_probe
from probes.finetuning_spec import FinetuningMethod, FinetuningSpec
from probes.spec import (
    ConfigResult,
    ConfigTask,
    ModelSpec,
    Precision,
    ProbeResult,
    ProbeSpec,
    Strategy,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MiB = 2**20
ROOT = Path(__file__).resolve().parents[2]
RANK_MAIN = Path(__file__).with_name("rank_main.py")
SEQ_LEN = 64
LAUNCH_TIMEOUT_SECONDS = 420

GPT2 = {
    "n_layer": 2,
    "n_embd": 256,
    "n_head": 4,
    "vocab_size": 32000,
    "n_positions": SEQ_LEN,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
LLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 8000,
    "max_position_embeddings": SEQ_LEN,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Cell:
    architecture: str
    config: dict[str, Any]
    strategy: Strategy
    ranks: int
    cap: int
    target: int
    #: also probe one process training alone, to show what the old answer would have been
    with_single: bool = False
    finetuning: FinetuningMethod = FinetuningMethod.FULL
    sync_each_batch: bool = False

    @property
    def name(self) -> str:
        lora = "" if self.finetuning is FinetuningMethod.FULL else f"-{self.finetuning.value}"
        sync = "-sync-each-batch" if self.sync_each_batch else ""
        return f"{self.architecture}-{self.strategy.value}-{self.ranks}{lora}{sync}"

    def spec(self, strategies: tuple[Strategy, ...]) -> ProbeSpec:
        return ProbeSpec(
            model=ModelSpec(architecture=self.architecture, config=self.config),
            seq_len=SEQ_LEN,
            precisions=[Precision.FP32],
            gradient_checkpointing=[False],
            strategies=strategies,
            world_size=self.ranks,
            target_effective_batch_size=self.target,
            device="simulated",
            memory_limit_bytes=self.cap,
            max_batch_size_limit=16,
            confirm_optimizer_steps=2,
            finetuning=self.finetuning,
            sync_each_batch=self.sync_each_batch,
        )


CELLS = (
    # targets chosen so that the plans take two accumulation steps (the trials' number)
    Cell("gpt2", GPT2, Strategy.DDP, ranks=2, cap=400 * MiB, target=16, with_single=True),
    # batch size 1 does not fit in one process (100.7 MiB); FSDP over 2 ranks fits 4
    Cell("llama", LLAMA, Strategy.FSDP, ranks=2, cap=95 * MiB, target=16, with_single=True),
    # one process alone fits 8 (148 MiB); a DDP rank needs 168 MiB at 8
    Cell("llama", LLAMA, Strategy.DDP, ranks=4, cap=160 * MiB, target=32),
    Cell("gpt2", GPT2, Strategy.FSDP, ranks=4, cap=260 * MiB, target=32),
    # LoRA (rank 16, all linear layers): a rank fits 4 (Llama DDP: 59.6 MiB, GPT-2 FSDP2: 163.9 MiB), not 8
    Cell("llama", LLAMA, Strategy.DDP, ranks=2, cap=80 * MiB, target=16, finetuning=FinetuningMethod.LORA),
    Cell("gpt2", GPT2, Strategy.FSDP, ranks=2, cap=220 * MiB, target=16, finetuning=FinetuningMethod.LORA),
    # LoRA at 4 ranks: a Llama FSDP2 rank fits 4 (51.1 MiB), not 8 (87.9 MiB)
    Cell("llama", LLAMA, Strategy.FSDP, ranks=4, cap=70 * MiB, target=32, finetuning=FinetuningMethod.LORA),
    # Accelerate's sync_each_batch: no unsharded gradient outlives its micro-step (the job reads it
    # from the recommendation's accelerator_config)
    Cell("llama", LLAMA, Strategy.FSDP, ranks=2, cap=95 * MiB, target=16, sync_each_batch=True),
)


def _config(result: ProbeResult, strategy: Strategy) -> ConfigResult:
    return next(c for c in result.configs if c.strategy is strategy)


def _trial_task(cell: Cell) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(architecture=cell.architecture, config=cell.config),
        seq_len=SEQ_LEN,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        strategy=cell.strategy,
        world_size=cell.ranks,
        device="simulated",
        memory_limit_bytes=cell.cap,
        finetuning=FinetuningSpec(method=cell.finetuning),
        sync_each_batch=cell.sync_each_batch,
    )


def _job_run(cell: Cell, result: ProbeResult, name: str, micro: int, accumulation: int) -> dict[str, Any]:
    common = {
        "name": name,
        "architecture": cell.architecture,
        "config": cell.config,
        "seq_len": SEQ_LEN,
        "cap": cell.cap,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "optimizer_steps": 3,
    }
    if cell.finetuning is not FinetuningMethod.FULL:
        assert result.recommendation is not None
        assert result.recommendation.peft_config is not None
        common["peft_config"] = result.recommendation.peft_config
    assert result.recommendation is not None
    arguments = result.recommendation.training_arguments
    if cell.strategy is Strategy.DDP:
        return {**common, "kind": "trainer", "training_arguments": arguments}
    # the job builds its FSDP2 plugin from these arguments as Trainer does (rank_main.recommended_fsdp)
    return {**common, "kind": "fsdp_by_hand", "training_arguments": arguments}


def test_lora_answers_are_for_adapters(measured: Measured) -> None:
    """The LoRA cells' probes trained adapters only: more fits per rank than full fine-tuning would,
    and the recommendation names the adapters the job builds."""
    for cell in CELLS:
        if cell.finetuning is FinetuningMethod.FULL:
            continue
        recommendation = measured.probes[cell.name].recommendation
        assert recommendation is not None
        assert recommendation.finetuning is FinetuningMethod.LORA
        assert recommendation.peft_config is not None
        assert recommendation.peft_config["r"] == 16


def _launch(ranks: int, runs: list[dict[str, Any]], where: Path) -> list[list[dict[str, Any]]]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun is installed with torch"
    job = where / f"job{ranks}.json"
    job.write_text(json.dumps(runs), encoding="utf-8")
    out = where / f"out{ranks}"
    out.mkdir()
    with socket.socket() as probe:  # a free port for the rendezvous (torchrun's port 0 does not resolve)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }
    completed = subprocess.run(
        [
            torchrun,
            f"--nproc-per-node={ranks}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            str(RANK_MAIN),
            str(job),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in range(ranks)]


@dataclass
class Measured:
    probes: dict[str, ProbeResult]
    ranks: dict[str, list[dict[str, Any]]]
    """run name → that run's result on every rank"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Measured:
    where = tmp_path_factory.mktemp("torchrun")
    probes: dict[str, ProbeResult] = {}
    for cell in CELLS:
        strategies = (Strategy.SINGLE, cell.strategy) if cell.with_single else (cell.strategy,)
        probes[cell.name] = run_probe(cell.spec(strategies))
    runs_by_ranks: dict[int, list[dict[str, Any]]] = {}
    for cell in CELLS:
        result = probes[cell.name]
        config = _config(result, cell.strategy)
        assert config.plan is not None, config.reason
        assert config.first_failing_batch_size is not None, config.reason
        runs = runs_by_ranks.setdefault(cell.ranks, [])
        runs.append(
            {
                "kind": "trial",
                "name": f"{cell.name}/trial",
                "task": _trial_task(cell).model_dump(mode="json"),
                "batch_size": config.max_batch_size,
                "accumulation_steps": 2,
                "optimizer_steps": 2,
            }
        )
        plan = config.plan
        runs.append(
            _job_run(
                cell,
                result,
                f"{cell.name}/plan",
                plan.per_device_train_batch_size,
                plan.gradient_accumulation_steps,
            )
        )
    for cell in CELLS:  # the runs that end out of memory go last
        result = probes[cell.name]
        failing = _config(result, cell.strategy).first_failing_batch_size
        assert failing is not None
        runs_by_ranks[cell.ranks].append(_job_run(cell, result, f"{cell.name}/first-failing", failing, 2))
        single = _config(result, Strategy.SINGLE) if cell.with_single else None
        if single is not None and single.max_batch_size not in (None, failing):
            runs_by_ranks[cell.ranks].append(
                _job_run(cell, result, f"{cell.name}/single-answer", single.max_batch_size, 2)
            )
    ranks: dict[str, list[dict[str, Any]]] = {}
    for count, runs in runs_by_ranks.items():
        per_rank = _launch(count, runs, where)
        for index, run in enumerate(runs):
            ranks[run["name"]] = [results[index] for results in per_rank]
    return Measured(probes=probes, ranks=ranks)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_one_process_measures_rank_zero_of_the_real_run(measured: Measured, cell: Cell) -> None:
    """The trial that backs the answer (one process, fake group) against the same trial on real ranks.

    Both take 2 accumulation steps and 2 optimizer steps (the probe's trial and confirmation length
    here), at the answer's batch size, under the cell's cap.
    """
    alone = _config(measured.probes[cell.name], cell.strategy).peak_memory_bytes
    real = measured.ranks[f"{cell.name}/trial"]
    assert all(r["outcome"] == "fit" for r in real), real
    assert alone is not None
    assert abs(real[0]["peak"] - alone) <= 0.01 * alone, (real[0]["peak"], alone)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_the_returned_plan_fits_on_every_rank(measured: Measured, cell: Cell) -> None:
    runs = measured.ranks[f"{cell.name}/plan"]
    assert [r["outcome"] for r in runs] == ["fit"] * cell.ranks, runs
    assert max(r["peak"] for r in runs) <= cell.cap
    if cell.strategy is Strategy.DDP:
        assert {r["wrapped_in"] for r in runs} == {"DistributedDataParallel"}


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_the_first_failing_size_runs_out_on_a_rank(measured: Measured, cell: Cell) -> None:
    runs = measured.ranks[f"{cell.name}/first-failing"]
    assert any(r["outcome"] == "oom" for r in runs), runs


def test_the_single_process_answer_runs_out_under_ddp(measured: Measured) -> None:
    """The bug this fixes: one process training alone fits more than one rank of a DDP job."""
    result = measured.probes["gpt2-ddp-2"]
    single, ddp = _config(result, Strategy.SINGLE), _config(result, Strategy.DDP)
    assert single.max_batch_size is not None
    assert ddp.max_batch_size is not None
    assert single.max_batch_size > ddp.max_batch_size
    same = single.max_batch_size == ddp.first_failing_batch_size
    runs = measured.ranks["gpt2-ddp-2/first-failing" if same else "gpt2-ddp-2/single-answer"]
    assert any(r["outcome"] == "oom" for r in runs), runs


def test_when_one_process_cannot_fit_one_sample_the_result_says_fsdp_does(measured: Measured) -> None:
    result = measured.probes["llama-fsdp-2"]
    single = _config(result, Strategy.SINGLE)
    assert single.max_batch_size is None
    assert single.fits_with == (Strategy.FSDP,)
    assert single.min_batch_needs_bytes is not None
    assert single.min_batch_needs_bytes > 95 * MiB
    assert single.min_batch_need_is_lower_bound  # an OOM on the simulated device gives a lower bound
    assert single.reason is not None
    assert "at least" in single.reason
    assert "fsdp (max batch size" in single.reason
