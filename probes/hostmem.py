"""Host-memory ceilings of probe processes: how large each one is, and how it is enforced.

Every process that builds or inspects models runs under a ceiling on the host memory it may
allocate, so that a model the size check (:mod:`probes.weights_fit`) lets through, or that runs
away in a way no count foresees (one huge activation, a config that makes Python build 10**9
objects), fails inside that process instead of taking the machine's memory:

============================  =====================================================
process                       ceiling
============================  =====================================================
trial child, ``simulated``    1.5 × the simulated cap (``memory_limit_bytes``) + allowance
trial child, ``predict``      the allowance (fake tensors hold no memory)
trial child, ``cuda``         ``cuda_bytes`` when the operator sets one, else none
probe child and forkserver    the allowance (soft; trial children set their own)
model inspector               its own setting (``inspector_bytes``)
============================  =====================================================

The allowance is what a probe process needs besides the tensors it is measuring: the imported
torch and transformers (~0.4 GB of private data after the forkserver preloads them), the model's
Python objects, the autograd graph. On ``simulated`` the tensors are real host memory, and the
heap holds more than the live tensors the device counts: freed blocks glibc keeps, the outputs of
the op that takes the count past the cap (allocated before they are counted). That part grows with
the tensors, hence :data:`CAP_SLACK`. See ``docs/hardening-processes.md`` for the measurements.

The mechanism is ``RLIMIT_DATA`` (``setrlimit``), set by each process on itself:

- Since Linux 4.7 it bounds the private writable mappings (heap, anonymous ``mmap``: every
  tensor, every Python object), and the kernel refuses the allocation that would pass it. The
  refusal is an error in the process (torch raises ``RuntimeError: DefaultCPUAllocator: can't
  allocate memory``, Python ``MemoryError``), so the trial or the inspection reports it as its
  outcome; the process never grows past the ceiling, however fast it allocates.
- Unlike ``RLIMIT_AS`` it does not count address space that is only reserved (``PROT_NONE``):
  glibc's per-thread arenas and CUDA's unified address range. CUDA under ``RLIMIT_DATA`` is still
  unverified here (no GPU), so cuda trials get a ceiling only when the operator sets one.
- It needs no privileges (cgroups do) and no polling (an RSS watchdog misses a fast allocation
  between two polls). It counts what a process *allocates*, not what it touches: a ceiling is an
  upper bound of the private memory the process can hold (its RSS adds only the file-backed pages
  of the libraries it maps, ~0.1 GB).

This module imports no torch: the service builds its policy from its settings.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from dataclasses import dataclass

from probes.spec import ConfigTask
from probes.units import format_bytes

GIB = 1024**3

DEFAULT_ALLOWANCE_BYTES = GIB
"""Host memory a probe process may hold besides the tensors it measures (see the module docstring)."""

CAP_SLACK = 0.5
"""On ``simulated``, host memory a trial may hold beyond the cap, as a share of the cap.

Measured (``python -m bench.trial_host_memory``, 2-core VM, glibc malloc): the private data of
fitting trials exceeded the counted peak by the import baseline (396 MiB) plus 8-18 % of the
counted bytes (small GPT-2 and Llama at 0.4-0.7 GiB, GPT-2 124M at 2.3-2.8 GiB; 22 % once in an
earlier run): heap that freed tensors left behind. Half the cap covers that twice."""

DEFAULT_INSPECTOR_BYTES = GIB
"""Ceiling of a model inspector: it peaked at 0.44 GB RSS (0.40 GB private data) inspecting every
causal-LM architecture of transformers 5.24 at its default size, then the hostile configs of issue 12."""

MIN_DATA_KERNEL = (4, 7)
"""The first Linux whose ``RLIMIT_DATA`` counts anonymous ``mmap`` (before it, only ``brk``)."""


@dataclass(frozen=True)
class HostMemoryPolicy:
    """The ceilings of a probe run's processes; ``allowance_bytes=None`` turns every ceiling off."""

    allowance_bytes: int | None = DEFAULT_ALLOWANCE_BYTES
    #: ceiling of a cuda trial process (``None``: none)
    cuda_bytes: int | None = None

    def trial_ceiling(self, task: ConfigTask) -> int | None:
        """The ceiling of the process that runs ``task``'s trials (``None``: none)."""
        if self.allowance_bytes is None:
            return None
        if task.device == "simulated":
            cap = task.memory_limit_bytes or 0
            return cap + math.ceil(cap * CAP_SLACK) + self.allowance_bytes
        if task.device == "predict":
            return self.allowance_bytes
        return self.cuda_bytes

    def to_args(self) -> list[str]:
        """The ``python -m probes run`` flags that give the child this policy."""
        if self.allowance_bytes is None:
            return ["--no-host-ceilings"]
        args = ["--host-allowance-bytes", str(self.allowance_bytes)]
        if self.cuda_bytes is not None:
            args += ["--cuda-host-memory-bytes", str(self.cuda_bytes)]
        return args


def ceilings_enforced() -> bool:
    """Whether ``RLIMIT_DATA`` bounds every private allocation here (Linux >= 4.7)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_DATA_KERNEL


def limit_data(limit: int | None, *, final: bool) -> int | None:
    """Put this process under ``limit`` bytes of private data (``RLIMIT_DATA``); returns the soft limit.

    ``limit=None`` lifts the soft limit as far as the hard limit allows (a child whose parent
    ran under a lower soft limit). ``final`` lowers the hard limit too, so that nothing this
    process starts can raise it again (a trial child, an inspector); without it children may set
    their own (the probe child, whose trial children get larger ceilings than its own). A limit
    above an inherited hard limit is clamped to it. Does nothing where the limit is not enforced.
    """
    if not ceilings_enforced():
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    unlimited = hard == resource.RLIM_INFINITY  # -1 on Linux: min() would pick it
    soft = hard if limit is None or not (unlimited or limit < hard) else limit
    if final:
        hard = soft
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    return None if soft == resource.RLIM_INFINITY else soft


def limit_process_data(pid: int, limit: int | None, *, final: bool) -> None:
    """Put process ``pid`` (a child just started) under ``limit`` at once, as :func:`limit_data` would.

    A child sets its own ceiling as it starts, after its interpreter has started; the parent calls
    this right after starting it, so that the ceiling holds from the first moments too. A process
    that is already gone is left alone. ``limit=None`` does nothing.
    """
    if limit is None or not ceilings_enforced():
        return
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_DATA)
        unlimited = hard == resource.RLIM_INFINITY
        soft = limit if unlimited or limit < hard else hard
        resource.prlimit(pid, resource.RLIMIT_DATA, (soft, soft if final else hard))
    except (ProcessLookupError, PermissionError):
        return


def current_ceiling() -> int | None:
    """This process's soft ``RLIMIT_DATA`` in bytes (``None``: unlimited or not enforced)."""
    if not ceilings_enforced():
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else soft


HOST_ALLOCATION_FAILED = re.compile(r"can't allocate memory|(?<![A-Za-z])MemoryError")
"""How a refused host allocation reads: torch's CPU allocator (``c10/core/impl/alloc_cpu.cpp``:
"DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") and Python's
``MemoryError`` as :func:`probes.oom.one_line` renders it (not ``OutOfMemoryError``, the device's)."""


def explain_host_failure(message: str) -> str:
    """``message`` with this process's ceiling added when it says a host allocation was refused."""
    ceiling = current_ceiling()
    if ceiling is None or HOST_ALLOCATION_FAILED.search(message) is None:
        return message
    return f"{message} (the process reached its host-memory ceiling of {format_bytes(ceiling)})"
