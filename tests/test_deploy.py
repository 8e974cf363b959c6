"""The deployment files under ``deploy/``: they parse, agree with each other and with ``maxbatch plan``.

Docker and Kubernetes cannot run here: these tests read the files (YAML parser, ``bash -n``),
check what must hold between them, parse every ``maxbatch plan`` command line they contain with
``plan``'s own flag parser, and run the Slurm script with stand-ins for ``maxbatch``, ``srun`` and
``scontrol`` to see that the plan reaches ``torchrun`` and that a missing plan stops the job.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import typer.main
import yaml

from app.cli import cli
from app.launcher import _spec_from
from probes.spec import ProbeSpec

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _plan_spec(args: list[str]) -> ProbeSpec:
    """The request a ``maxbatch plan`` command line makes (parsed by plan's own flags)."""
    command = typer.main.get_command(cli).commands["plan"]  # type: ignore[attr-defined]
    context = command.make_context("plan", [*args, "--server", "http://maxbatch:8000"])
    return _spec_from(context.params)


def test_compose_runs_a_ray_head_a_worker_and_the_service_from_one_image() -> None:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "maxbatch"}
    assert {s["image"] for s in services.values()} == {"maxbatch:ray-cpu"}
    build = services["ray-head"]["build"]
    assert (DEPLOY / build["context"] / "Dockerfile").is_file()
    assert build["args"]["EXTRAS"] == "ray"
    assert "ARG EXTRAS" in (ROOT / "Dockerfile").read_text()
    assert build["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    head = services["ray-head"]["command"]
    port = next(arg.split("=")[1] for arg in head if arg.startswith("--port="))
    assert "--num-cpus=0" in head
    assert f"--address=ray-head:{port}" in services["ray-worker"]["command"]
    service = services["maxbatch"]
    assert f"--address=ray-head:{port}" in service["command"][-1]
    assert "exec maxbatch serve" in service["command"][-1]
    env = service["environment"]
    assert env["MAXBATCH_DISPATCHER"] == "ray"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ":?" in env["MAXBATCH_API_TOKEN"]  # compose refuses to start without a token
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_the_kubernetes_job_plans_in_an_init_container_for_the_trainer() -> None:
    job: dict[str, Any] = yaml.safe_load((DEPLOY / "k8s" / "train-job.yaml").read_text())
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    line = init["args"][0]
    words = shlex.split(line)
    assert words[:2] == ["maxbatch", "plan"]
    assert words[-2:] == [">", "/plan/maxbatch.env"]
    spec = _plan_spec(words[2:-2])
    assert (spec.device, spec.gpu_type, spec.world_size) == ("gpu", "A100-80GB", 8)
    assert {e["name"] for e in init["env"]} == {"MAXBATCH_SERVER", "MAXBATCH_TOKEN"}
    (train,) = pod["containers"]
    script = train["command"][-1]
    assert ". /plan/maxbatch.env" in script
    assert "$MAXBATCH_TRAINING_ARGS" in script
    assert train["resources"]["limits"]["nvidia.com/gpu"] == spec.world_size


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_sbatch(tmp_path: Path, plan_exit: int) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    plan = "--per_device_train_batch_size 4 --gradient_accumulation_steps 8"
    records = f'printf "%s\\n" "$@" > {tmp_path}/plan.args'
    _stub(bin_dir, "maxbatch", f'{records}\necho "{plan}"\nexit {plan_exit}')
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args')
    _stub(bin_dir, "scontrol", "echo node-a; echo node-b")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "MAXBATCH_SERVER": "http://maxbatch:8000",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_ID": "42",
    }
    return subprocess.run(
        ["bash", str(DEPLOY / "slurm" / "train.sbatch")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_the_slurm_script_passes_the_plan_to_torchrun(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / "train.sbatch")], check=False).returncode == 0
    done = _run_sbatch(tmp_path, plan_exit=0)
    assert done.returncode == 0, done.stderr
    spec = _plan_spec((tmp_path / "plan.args").read_text().splitlines()[1:])  # after "plan"
    assert (spec.device, spec.gpu_type, spec.world_size, spec.seq_len) == ("gpu", "H100-80GB", 16, 4096)
    srun = (tmp_path / "srun.args").read_text().splitlines()
    assert srun[0] == "torchrun"
    train = srun.index("train.py")
    assert srun[train + 1 : train + 5] == [
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8",
    ]  # fmt: skip
    assert "--nproc-per-node" in srun
    assert "node-a:29500" in srun


def test_the_slurm_script_stops_when_there_is_no_plan(tmp_path: Path) -> None:
    done = _run_sbatch(tmp_path, plan_exit=4)
    assert done.returncode == 1
    assert "no batch plan reaches 512" in done.stderr
    assert not (tmp_path / "srun.args").exists()
    failed = _run_sbatch(tmp_path, plan_exit=5)
    assert failed.returncode == 1
    assert "exit code 5" in failed.stderr
    assert os.path.exists(tmp_path / "plan.args")
