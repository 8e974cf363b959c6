"""Host-memory ceilings: which process gets which, that the kernel enforces them, and what a trial
that reaches its ceiling reports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.proctree import TreeWatch, data_limit
from probes.__main__ import host_memory_policy, parser
from probes.hostmem import (
    DEFAULT_ALLOWANCE_BYTES,
    HOST_ALLOCATION_FAILED,
    HostMemoryPolicy,
    ceilings_enforced,
    explain_host_failure,
    limit_process_data,
)
from probes.isolate import TrialChild, info_from_reply, trial_from_reply
from probes.protocol import InfoRequest, TrialRequest
from probes.spec import ConfigTask, ModelSpec, Outcome, Precision

MiB = 2**20
GiB = 2**30
ROOT = Path(__file__).resolve().parents[2]

needs_ceilings = pytest.mark.skipif(
    not ceilings_enforced(), reason="RLIMIT_DATA bounds mmap only on Linux >= 4.7"
)


def task(device: str = "simulated", *, limit: int | None = 64 * MiB, **config: object) -> ConfigTask:
    return ConfigTask(
        model=ModelSpec(
            architecture="gpt2",
            config={"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, **config},
        ),
        seq_len=64,
        precision=Precision.FP32,
        gradient_checkpointing=False,
        device=device,
        memory_limit_bytes=limit,
    )


def test_each_trial_gets_the_ceiling_of_its_device() -> None:
    policy = HostMemoryPolicy(allowance_bytes=GiB, cuda_bytes=8 * GiB)
    assert policy.trial_ceiling(task("simulated")) == 64 * MiB + 32 * MiB + GiB  # cap + slack + allowance
    assert policy.trial_ceiling(task("predict", limit=80 * GiB)) == GiB  # fake tensors hold no memory
    assert policy.trial_ceiling(task("cuda:0", limit=None)) == 8 * GiB
    assert HostMemoryPolicy().trial_ceiling(task("cuda:0", limit=None)) is None
    assert HostMemoryPolicy(allowance_bytes=None, cuda_bytes=8 * GiB).trial_ceiling(task("cuda:0")) is None


@pytest.mark.parametrize(
    "policy",
    [
        HostMemoryPolicy(),
        HostMemoryPolicy(allowance_bytes=3 * GiB, cuda_bytes=9 * GiB),
        HostMemoryPolicy(None),
    ],
)
def test_the_policy_travels_as_flags(policy: HostMemoryPolicy) -> None:
    args = parser().parse_args(["run", "--spec", "s", "--result", "r", *policy.to_args()])
    assert host_memory_policy(args) == policy


def test_the_probe_command_defaults_to_ceilings() -> None:
    args = parser().parse_args(["run", "--spec", "s", "--result", "r"])
    assert host_memory_policy(args) == HostMemoryPolicy(allowance_bytes=DEFAULT_ALLOWANCE_BYTES)


def test_the_device_out_of_memory_is_not_a_host_failure() -> None:
    assert HOST_ALLOCATION_FAILED.search("OutOfMemoryError: CUDA out of memory.") is None
    assert HOST_ALLOCATION_FAILED.search("building the model: MemoryError: ") is not None


def test_a_refused_allocation_names_the_ceiling_only_under_one() -> None:
    message = "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes."
    script = (
        f"from probes.hostmem import *; limit_data({GiB}, final=True); "
        f"print(explain_host_failure({message!r}))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    if ceilings_enforced():
        assert out.stdout.strip() == f"{message} (the process reached its host-memory ceiling of 1.00 GiB)"
    assert explain_host_failure("ValueError: something else") == "ValueError: something else"


@needs_ceilings
def test_the_kernel_refuses_what_would_pass_the_ceiling() -> None:
    """A process under 1 GiB asks torch for 2 GiB: an error at once, and its resident set stays small."""
    script = textwrap.dedent(
        f"""
        from probes.hostmem import limit_data
        limit_data({GiB}, final=True)
        import torch
        try:
            torch.ones({2 * GiB}, dtype=torch.uint8)
        except RuntimeError as exc:
            print(str(exc).splitlines()[0])
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                print(int(line.split()[1]) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    error, peak = out.stdout.strip().splitlines()
    assert "can't allocate memory" in error
    assert int(peak) < GiB


@needs_ceilings
def test_no_ceiling_lifts_an_inherited_soft_limit() -> None:
    script = textwrap.dedent(
        f"""
        import resource
        from probes.hostmem import limit_data
        resource.setrlimit(resource.RLIMIT_DATA, ({GiB}, resource.RLIM_INFINITY))
        print(limit_data(None, final=True), resource.getrlimit(resource.RLIMIT_DATA))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None (-1, -1)"


@needs_ceilings
def test_a_parent_puts_a_child_it_started_under_a_ceiling() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        limit_process_data(child.pid, GiB, final=False)
        assert data_limit(child.pid) == GiB
        limit_process_data(child.pid, None, final=True)  # no ceiling: left as it is
        assert data_limit(child.pid) == GiB
    finally:
        child.communicate(b"")


@needs_ceilings
def test_a_trial_child_runs_under_its_ceiling() -> None:
    policy = HostMemoryPolicy(allowance_bytes=GiB)
    child = TrialChild(task(), host_memory=policy)
    try:
        info_from_reply(child.request(InfoRequest(), timeout_seconds=300))  # it has set its limit by now
        assert child.host_memory_bytes == 96 * MiB + GiB
        assert child.pid is not None
        assert data_limit(child.pid) == 96 * MiB + GiB
    finally:
        child.close()


@needs_ceilings
def test_a_trial_past_its_ceiling_is_an_oom_and_the_process_stays_under_it() -> None:
    """Weights of 102 MB fit a 192 MiB cap; the first forward asks for 1.53 GiB of logits at once.

    The kernel refuses it (the ceiling, 1.5 x the cap + 1 GiB, is less than the request alone); the
    simulated device reports the refused request as its out-of-memory, since it is past the cap too.
    """
    hungry = task(limit=192 * MiB, vocab_size=400_000).model_copy(update={"seq_len": 1024})
    policy = HostMemoryPolicy(allowance_bytes=GiB)
    with TreeWatch(os.getpid(), interval=0.02) as watch:
        child = TrialChild(hungry, host_memory=policy)
        assert child.host_memory_bytes == 288 * MiB + GiB
        try:
            pid = child.pid
            assert pid is not None
            reply = child.request(
                TrialRequest(batch_size=1, accumulation_steps=1, optimizer_steps=1), timeout_seconds=300
            )
        finally:
            child.close()
    trial, _ = trial_from_reply(1, reply)
    assert trial.outcome is Outcome.OOM, trial
    assert trial.message is not None
    assert "CUDA out of memory. Tried to allocate 1.53 GiB" in trial.message
    assert 0 < watch.seen[pid].peak_rss < 288 * MiB + GiB
