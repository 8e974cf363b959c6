"""An estimate of a training step's time on a card, from the model's FLOPs: to rank configs on ``predict``.

``predict`` names a card but runs no kernel on it, so its step times are CPU times. To choose among
configs that reach a plan, what matters on the GPU is how long an optimizer step at the target
effective batch takes:

- **compute**: a training token costs ``6 N + 12 L d s`` FLOPs (N: parameters a token passes
  through, L layers, d hidden size, s sequence length; forward 1/3, backward 2/3; the second term
  is attention's score and value products, PaLM's accounting). Gradient checkpointing runs the
  forward again during the backward: ``8 N + 16 L d s``, a third more.
- **the card's throughput** for the precision's matmuls (:data:`CARD_THROUGHPUT`, dense datasheet
  figures): bf16/fp16 tensor cores for the mixed and ``bf16-true`` precisions, plain fp32 for
  ``32-true`` (PyTorch leaves TF32 off for matmuls by default, and Trainer does too unless ``tf32``
  is set).
- **micro-batch efficiency**: a small micro batch leaves the GPU partly idle (launch overhead,
  small matmuls). The share of peak reached is ``MAX_UTILISATION * t / (t + HALF_UTILISATION_TOKENS)``
  for ``t`` tokens per micro batch — assumed figures, to be checked against measured tokens/s when
  a GPU is lent (``bench/gpu_check.py``); only the ranking is used, never the seconds as a claim.
- **the optimizer step**, once per effective batch: AdamW reads and writes weights, gradients and
  two moments: memory-bound, ``OPTIMIZER_BYTES_PER_PARAMETER`` bytes a parameter (half with bf16
  weights) over the card's memory bandwidth.

So the accumulation count costs nothing at a fixed effective batch once the micro batch keeps the
card busy, and checkpointing costs its third: the ranking a GPU's measured throughput would give.

Pure Python, no torch: the engine (parent) ranks with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from probes.spec import ConfigResult, Precision

TERA = 10**12
GIGA = 10**9

MAX_UTILISATION = 0.5
"""The share of the datasheet's dense peak a large micro batch reaches in a transformer's training step
(assumed: published model-FLOPs utilisation of well-tuned training is 0.4-0.55)."""

HALF_UTILISATION_TOKENS = 512
"""Tokens per micro batch at which the card reaches half of :data:`MAX_UTILISATION` (assumed)."""

OPTIMIZER_BYTES_PER_PARAMETER = 32
"""AdamW's traffic per parameter with fp32 weights: read weight, gradient and two moments, write weight
and two moments (7 x 4 bytes), plus the clipping's read of the gradient (4)."""


@dataclass(frozen=True)
class CardThroughput:
    """A card's dense matmul throughput and memory bandwidth (datasheet figures, no sparsity)."""

    name: str
    #: bf16 tensor-core TFLOPS (``None``: no native bf16)
    bf16_tflops: float | None
    #: fp16 tensor-core TFLOPS
    fp16_tflops: float
    #: fp32 (non-tensor) TFLOPS
    fp32_tflops: float
    #: memory bandwidth, GB/s
    memory_bandwidth_gbs: float
    #: where the figures come from
    source: str

    def matmul_flops_per_second(self, precision: Precision) -> float:
        """Peak matmul FLOP/s for ``precision``'s compute dtype."""
        if precision is Precision.FP32:
            return self.fp32_tflops * TERA
        if precision is Precision.FP16_MIXED:
            return self.fp16_tflops * TERA
        if self.bf16_tflops is None:
            raise ValueError(f"{self.name} has no native bf16")
        return self.bf16_tflops * TERA


_DATASHEET = "NVIDIA datasheet, dense"
CARD_THROUGHPUT: tuple[CardThroughput, ...] = (
    CardThroughput("A100-40GB", 312, 312, 19.5, 1555, f"{_DATASHEET}, A100 40GB"),
    CardThroughput("A100-80GB", 312, 312, 19.5, 1935, f"{_DATASHEET}, A100 80GB PCIe (SXM: 2039 GB/s)"),
    CardThroughput("H100-80GB", 989, 989, 67, 3350, f"{_DATASHEET}, H100 SXM"),
    CardThroughput("H200-141GB", 989, 989, 67, 4800, f"{_DATASHEET}, H200 SXM"),
    CardThroughput("L4-24GB", 121, 121, 30.3, 300, f"{_DATASHEET}, L4"),
    CardThroughput("A10G-24GB", 125, 125, 31.2, 600, f"{_DATASHEET}, A10 (A10G is its cloud variant)"),
    CardThroughput("L40S-48GB", 362, 362, 91.6, 864, f"{_DATASHEET}, L40S"),
    CardThroughput("RTX4090-24GB", 165, 165, 82.6, 1008, "Ada whitepaper, RTX 4090, fp32 accumulate"),
    CardThroughput("T4-16GB", None, 65, 8.1, 320, f"{_DATASHEET}, T4"),
    CardThroughput("V100-16GB", None, 125, 15.7, 900, f"{_DATASHEET}, V100 SXM2"),
    CardThroughput("V100-32GB", None, 112, 14, 900, f"{_DATASHEET}, V100 PCIe"),
)
"""One entry per card of the predict table (``probes.gpus.GPUS``; a test keeps them in step)."""

_SEPARATORS = re.compile(r"[\s_]+")
_BY_KEY = {card.name.upper(): card for card in CARD_THROUGHPUT}


def card_throughput(name: str) -> CardThroughput | None:
    """The card ``name`` names (case-insensitive, as ``probes.gpus.lookup_gpu`` reads names), if known."""
    return _BY_KEY.get(_SEPARATORS.sub("-", name.strip()).upper())


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs depend on."""

    #: parameters a token passes through (for mixture-of-experts: the routed experts' share only)
    active_parameter_count: int
    #: all parameters (the optimizer step touches every one)
    parameter_count: int
    layers: int
    hidden_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any], parameter_count: int) -> ModelShape:
        """Read layers, width and experts from a transformers config's ``to_dict()``.

        ``ValueError`` when the config names no depth or width.
        """
        layers = _first_int(config, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
        hidden = _first_int(config, ("hidden_size", "n_embd", "d_model", "dim"))
        if layers is None or hidden is None:
            raise ValueError("the config names no depth or hidden size; no FLOPs estimate")
        active = parameter_count
        experts = _first_int(config, ("num_local_experts", "num_experts", "n_routed_experts"))
        chosen = _first_int(config, ("num_experts_per_tok", "top_k", "moe_top_k"))
        width = _first_int(config, ("moe_intermediate_size", "intermediate_size"))
        if experts and chosen and width and experts > chosen:
            expert_parameters = layers * experts * 3 * hidden * width  # gate, up and down projections
            idle = expert_parameters * (experts - chosen) // experts
            active = max(parameter_count - idle, 0)
        return cls(
            active_parameter_count=active, parameter_count=parameter_count, layers=layers, hidden_size=hidden
        )


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def training_flops_per_token(shape: ModelShape, seq_len: int, *, gradient_checkpointing: bool) -> int:
    """Forward and backward FLOPs a token: ``6 N + 12 L d s``; ``8 N + 16 L d s`` with recomputation."""
    passes = 4 if gradient_checkpointing else 3  # forward, backward (2 forwards' worth), recomputed forward
    return passes * (2 * shape.active_parameter_count + 4 * shape.layers * shape.hidden_size * seq_len)


def utilisation(tokens_per_micro_batch: int) -> float:
    """The share of the card's peak a micro batch of this many tokens reaches (see the module docstring)."""
    if tokens_per_micro_batch < 1:
        raise ValueError(f"a micro batch has at least one token, got {tokens_per_micro_batch}")
    return MAX_UTILISATION * tokens_per_micro_batch / (tokens_per_micro_batch + HALF_UTILISATION_TOKENS)


@dataclass(frozen=True)
class StepEstimate:
    """The estimated time of one optimizer step at the effective batch (a ranking figure)."""

    seconds: float
    compute_seconds: float
    optimizer_seconds: float
    tokens_per_second: float
    flops_per_token: int
    utilisation: float


def estimate_step(
    shape: ModelShape,
    card: CardThroughput,
    *,
    seq_len: int,
    precision: Precision,
    gradient_checkpointing: bool,
    micro_batch_size: int,
    accumulation_steps: int,
) -> StepEstimate:
    """One optimizer step (``accumulation_steps`` micro batches of ``micro_batch_size``) on ``card``.

    ``ValueError`` for a bf16 precision on a card without bf16, or sizes under 1.
    """
    if micro_batch_size < 1 or accumulation_steps < 1 or seq_len < 1:
        raise ValueError("micro batch size, accumulation steps and seq_len must be at least 1")
    flops_per_token = training_flops_per_token(shape, seq_len, gradient_checkpointing=gradient_checkpointing)
    share = utilisation(micro_batch_size * seq_len)
    tokens = micro_batch_size * accumulation_steps * seq_len
    compute = tokens * flops_per_token / (card.matmul_flops_per_second(precision) * share)
    bytes_per_parameter = OPTIMIZER_BYTES_PER_PARAMETER // (2 if precision is Precision.BF16_TRUE else 1)
    optimizer = shape.parameter_count * bytes_per_parameter / (card.memory_bandwidth_gbs * GIGA)
    seconds = compute + optimizer
    return StepEstimate(
        seconds=seconds,
        compute_seconds=compute,
        optimizer_seconds=optimizer,
        tokens_per_second=tokens / seconds,
        flops_per_token=flops_per_token,
        utilisation=share,
    )


def rank_configs(
    configs: list[ConfigResult],
    shape: ModelShape,
    card: CardThroughput,
    *,
    seq_len: int,
) -> list[tuple[ConfigResult, StepEstimate]]:
    """Configs with a plan, fastest estimated optimizer step first (ties: as given).

    Configs without a plan, and bf16 configs on a card without bf16, are left out.
    """
    ranked = []
    for config in configs:
        plan = config.plan
        if plan is None or (config.precision.needs_bf16 and card.bf16_tflops is None):
            continue
        estimate = estimate_step(
            shape,
            card,
            seq_len=seq_len,
            precision=config.precision,
            gradient_checkpointing=config.gradient_checkpointing,
            micro_batch_size=plan.per_device_train_batch_size,
            accumulation_steps=plan.gradient_accumulation_steps,
        )
        ranked.append((config, estimate))
    return sorted(ranked, key=lambda pair: pair[1].seconds)


def ranking_reason(ranked: list[tuple[ConfigResult, StepEstimate]], card: CardThroughput) -> str:
    """The ``why`` of a recommendation chosen by :func:`rank_configs` (its first entry)."""
    best, estimate = ranked[0]
    reason = (
        f"fastest estimated optimizer step on {card.name} ({estimate.seconds:.3g} s, "
        f"~{estimate.tokens_per_second:,.0f} tokens/s) from the model's FLOPs"
        f"{' (recomputation counted)' if best.gradient_checkpointing else ''}, the card's "
        f"{'fp32' if best.precision is Precision.FP32 else 'tensor-core'} throughput and the micro batch's "
        "utilisation: an estimate for ranking, not a measurement"
    )
    if len(ranked) > 1:
        runner_up, other = ranked[1]
        reason += (
            f"; next: {runner_up.precision.value}"
            f"{' with checkpointing' if runner_up.gradient_checkpointing else ''} at {other.seconds:.3g} s"
        )
    return reason
