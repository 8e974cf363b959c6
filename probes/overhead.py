"""What a real GPU needs beyond the tensors the ``predict`` device counts: the overhead model.

The ``predict`` device counts live tensor bytes exactly as the ``simulated`` device does (each
storage rounded up to the caching allocator's 512-byte blocks). A real card also holds:

1. the **CUDA context** and the kernel images loaded into it (torch's, cuBLAS's, the attention
   kernels'): outside the caching allocator, invisible to ``torch.cuda.memory_*`` counters;
2. **library workspaces**: cuBLAS and cuBLASLt scratch space, taken through the caching allocator
   per (handle, stream), never freed while the process lives;
3. the **allocator's slack**: segments reserved but not handed out at the peak (partly used 2 MiB
   small-pool segments, 20 MiB segments for 1-10 MiB requests, 2 MiB rounding of larger ones,
   blocks that cannot merge across segments).

For a card with ``M`` bytes, the memory left for tensors is
``(M - context - workspaces - small_pool) * (1 - slack_fraction)``, and the overhead that
:func:`overhead_for` reports is ``M`` minus that. It is a fixed number per card, so the engine can
take it off the capacity once (``capacity = total - headroom - overhead``).

Calibration status (2026-11-28, one NVIDIA H200, driver 580.159.04, torch 2.11.0+cu130,
``bench/gpu_check.py``, figures in ``bench/RESULTS.md``): the memory outside the caching allocator
was 0.73-0.75 GiB in every run (a ~0.85B and a 7B Llama, two precisions, checkpointing off and
on), under the 1 GiB assumed for the context below. The allocator's slack could not be isolated
(the 7B runs reached the card's capacity, where freed blocks stay cached), so the workspace, pool
and slack constants remain conservative estimates from public reports, each marked with where it
comes from; a prediction made with them errs towards a smaller batch. Re-measure them with
``bench/gpu_check.py`` on each card family and record the date, the card and the driver here.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class OverheadConstant:
    """One constant of the model, with where its value comes from."""

    value: float
    #: what the constant stands for
    what: str
    #: where and when it was measured, or why it is an estimate
    source: str


# -- every constant of the model, in one place ---------------------------------------------------

CUDA_CONTEXT_BYTES = OverheadConstant(
    value=1 * GiB,
    what="CUDA context plus the kernel images loaded into it, outside the caching allocator",
    source=(
        "measured 2026-11-28 on an H200 (driver 580.159.04, torch 2.11.0+cu130): 0.73-0.75 GiB "
        "outside the caching allocator during ~0.85B and 7B Llama training steps; kept at 1 GiB "
        "for other drivers, cards and kernel sets (public reports: 300-600 MiB on A100/H100)"
    ),
)

LIBRARY_WORKSPACE_BYTES = OverheadConstant(
    value=128 * MiB,
    what="cuBLAS and cuBLASLt workspaces, taken through the caching allocator and kept",
    source=(
        "estimate, not measured: torch's default cuBLAS workspace is up to 32 MiB per handle and "
        "stream on Hopper (CUBLAS_WORKSPACE_CONFIG :4096:8), cuBLASLt's as much again; doubled for "
        "a second stream"
    ),
)

SMALL_POOL_BYTES = OverheadConstant(
    value=64 * MiB,
    what="partly used 2 MiB segments of the allocator's small-block pool (requests up to 1 MiB)",
    source="estimate, not measured: a few dozen small-pool segments, typical of a training step",
)

ALLOCATOR_SLACK_FRACTION = OverheadConstant(
    value=0.05,
    what="share of the reserved memory the caching allocator holds but has not handed out at the peak",
    source=(
        "estimate, not measured: reserved exceeds allocated by 2-10 % in published training-step "
        "memory snapshots; 5 % sits at the cautious side of the common case"
    ),
)

# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overhead:
    """The overhead predicted for one card, by part (bytes)."""

    context_bytes: int
    workspace_bytes: int
    small_pool_bytes: int
    allocator_slack_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.context_bytes + self.workspace_bytes + self.small_pool_bytes + self.allocator_slack_bytes

    @property
    def calibrated(self) -> bool:
        """Whether the constants were measured on a GPU (not yet: see the module docstring)."""
        return False


def overhead_for(card_memory_bytes: int) -> Overhead:
    """The overhead on a card with ``card_memory_bytes`` (its total memory as torch reports it).

    Raises ``ValueError`` when the fixed parts alone would not fit on the card.
    """
    context = int(CUDA_CONTEXT_BYTES.value)
    workspace = int(LIBRARY_WORKSPACE_BYTES.value)
    small_pool = int(SMALL_POOL_BYTES.value)
    fixed = context + workspace + small_pool
    if card_memory_bytes <= fixed:
        raise ValueError(
            f"a card of {card_memory_bytes} bytes leaves nothing for tensors after {fixed} bytes of "
            "CUDA context, workspaces and allocator pools"
        )
    slack = -(-(card_memory_bytes - fixed) * round(ALLOCATOR_SLACK_FRACTION.value * 10_000) // 10_000)
    return Overhead(
        context_bytes=context,
        workspace_bytes=workspace,
        small_pool_bytes=small_pool,
        allocator_slack_bytes=slack,
    )


def tensor_capacity(card_memory_bytes: int) -> int:
    """Bytes left for tensors (as the counting mode charges them) on a card: total minus overhead."""
    return card_memory_bytes - overhead_for(card_memory_bytes).total_bytes
