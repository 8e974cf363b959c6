"""What a fine-tuning job trains, and what the recommendation tells it: torch-free.

:class:`FinetuningSpec` says how the job trains the model: every weight (``full``), low-rank
adapters on a frozen base (``lora``, through peft), or adapters on a 4-bit NF4 base (``qlora``,
peft + bitsandbytes). The builders that run it live in :mod:`probes.recipe.finetuning` (torch
side); this module holds only what the service, the search and the recommendation need, so it
imports neither torch nor transformers nor peft, and it does not import :mod:`probes.spec` at run
time either (``probes.spec`` may import this module to carry a ``FinetuningSpec``).

The recommendation's outputs are plain JSON-serialisable dicts, built against what the probe
measured:

- :func:`peft_config_kwargs`: ``peft.LoraConfig(**kwargs)``, from the spec and the
  :class:`LoraTargets` the child resolved on the model (``"all-linear"`` written out as module
  names, so the emitted config does not depend on peft's rule for it);
- :func:`quantization_kwargs`: ``transformers.BitsAndBytesConfig(**kwargs)`` for QLoRA;
- :func:`kbit_preparation_kwargs`: ``peft.prepare_model_for_kbit_training(model, **kwargs)``;
- :func:`base_dtype_name`: the ``dtype`` to load the base model in (``from_pretrained(..., dtype=…)``).
"""

from __future__ import annotations

import importlib.util
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # probes.spec may import this module: no run-time import back
    from probes.spec import Precision

ALL_LINEAR: Literal["all-linear"] = "all-linear"
"""peft's shorthand for every linear layer but the output head (``LoraConfig(target_modules=…)``)."""

DEFAULT_LORA_R = 16
DEFAULT_LORA_ALPHA = 32
DEFAULT_LORA_DROPOUT = 0.05
"""Not peft's default (0.0): the value most published LoRA/QLoRA recipes use. It also costs memory
(peft puts an ``nn.Dropout`` before every adapter, whose mask and output backward keeps), so a plan
measured with it stays safe for a job that trains without dropout, and not the other way round."""

PEFT_TASK_TYPE = "CAUSAL_LM"
"""``LoraConfig(task_type=…)`` for the causal-LM task (``peft.TaskType.CAUSAL_LM``)."""

NF4_BLOCKSIZE = 64
"""bitsandbytes' block size for 4-bit weights (``quantize_4bit``'s default, what transformers uses)."""

_COMPUTE_DTYPE: dict[str, str] = {
    "32-true": "float32",
    "16-mixed": "float16",
    "bf16-mixed": "bfloat16",
    "bf16-true": "bfloat16",
}
"""``bnb_4bit_compute_dtype`` per precision (keyed by ``Precision`` value)."""


class FinetuningMethod(StrEnum):
    """How the job trains the model."""

    #: every weight is trained (AdamW state and gradients for all of them)
    FULL = "full"
    #: low-rank adapters on a frozen base in the precision's weight dtype (peft ``get_peft_model``)
    LORA = "lora"
    #: low-rank adapters on a frozen 4-bit NF4 base (bitsandbytes, ``prepare_model_for_kbit_training``)
    QLORA = "qlora"


ModuleName = Annotated[str, Field(min_length=1, max_length=200)]


class FinetuningSpec(BaseModel):
    """How the job trains: ``method`` and, for ``lora``/``qlora``, the adapters' settings.

    The ``lora_*`` fields are peft's ``LoraConfig`` arguments ``r``, ``lora_alpha``,
    ``lora_dropout`` and ``target_modules``; they are kept (and validated) for ``full`` too, so a
    request can switch methods without restating them. Frozen and strict, like every spec type.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: FinetuningMethod = FinetuningMethod.FULL
    lora_r: int = Field(
        default=DEFAULT_LORA_R, ge=1, le=65_536, description="adapter rank (peft needs r > 0)"
    )
    lora_alpha: int = Field(
        default=DEFAULT_LORA_ALPHA,
        ge=1,
        le=1_000_000,
        description="adapter scale numerator (scaling = alpha / r)",
    )
    lora_dropout: float = Field(
        default=DEFAULT_LORA_DROPOUT,
        ge=0,
        lt=1,
        description="dropout before each adapter; > 0 keeps a mask and a copy of the input for backward",
    )
    lora_target_modules: Literal["all-linear"] | tuple[ModuleName, ...] = Field(
        default=ALL_LINEAR,
        description="'all-linear' (every linear layer but the output head) or module names such as q_proj",
    )

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        return parse_target_modules(value)

    @property
    def uses_adapters(self) -> bool:
        """Whether only adapters train (``lora``, ``qlora``)."""
        return self.method is not FinetuningMethod.FULL

    @property
    def quantized(self) -> bool:
        """Whether the base is 4-bit (``qlora``)."""
        return self.method is FinetuningMethod.QLORA


def parse_target_modules(value: object) -> object:
    """``lora_target_modules`` as given (a list, or the CLI's comma-separated string) made canonical:
    ``"all-linear"`` in any case, or a tuple of distinct stripped names; ``ValueError`` says what is wrong.
    Anything else is returned for pydantic to refuse."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lower() == ALL_LINEAR:
            return ALL_LINEAR
        value = stripped.split(",")
    if isinstance(value, list | tuple):
        names = [v.strip() if isinstance(v, str) else v for v in value]
        if not names:
            raise ValueError("lora_target_modules must name at least one module, or be 'all-linear'")
        if any(isinstance(name, str) and not name for name in names):
            raise ValueError("lora_target_modules holds an empty module name")
        if any(name == ALL_LINEAR for name in names):
            raise ValueError("'all-linear' cannot be combined with module names; give it alone")
        seen: list[object] = []
        for name in names:
            if name not in seen:
                seen.append(name)
        return tuple(seen)
    return value


class LoraTargets(BaseModel):
    """The modules LoRA wraps in one model, as the child resolved them.

    ``target_modules`` are names peft matches against module paths (a name matches a module whose
    path is the name or ends in ``.name``); ``fan_in_fan_out`` is true when they are GPT-2-style
    ``Conv1D`` layers, whose weight is stored transposed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_modules: tuple[str, ...]
    fan_in_fan_out: bool = False
    module_count: int = Field(ge=1, description="how many modules of the model the names select")


class ParameterCounts(BaseModel):
    """Trainable and frozen parameters of a prepared model, and the bytes they keep resident.

    ``frozen_parameters`` counts a 4-bit weight by its original element count (what the model has),
    not by its packed storage (two weights per byte). Bytes are storage bytes, unrounded.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    trainable_parameters: int = Field(ge=0)
    frozen_parameters: int = Field(ge=0)
    quantized_parameters: int = Field(ge=0, description="frozen parameters stored in 4 bits")
    trainable_bytes: int = Field(ge=0, description="storage of the trainable parameters")
    frozen_bytes: int = Field(
        ge=0, description="storage of the frozen parameters and their quantisation state"
    )
    buffer_bytes: int = Field(ge=0)

    @property
    def total_parameters(self) -> int:
        return self.trainable_parameters + self.frozen_parameters

    @property
    def resident_bytes(self) -> int:
        """What the prepared model keeps on the device before any step: weights, quant state, buffers."""
        return self.trainable_bytes + self.frozen_bytes + self.buffer_bytes


class FinetuningFacts(BaseModel):
    """What the first trial child learns about a LoRA/QLoRA model (built on the meta device): the
    ``LoraConfig`` arguments with the target modules resolved, and the parameter counts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    peft_config: dict[str, Any]
    trainable_parameters: int = Field(ge=0)
    frozen_parameters: int = Field(ge=0)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ADAPTER_BYTES = 4
"""peft keeps adapters in fp32 whatever the base dtype (``autocast_adapter_dtype``)."""


def memory_floor_bytes(
    spec: FinetuningSpec,
    precision: Precision,
    *,
    trainable_parameters: int,
    frozen_parameters: int,
    optimizer_states: int,
    shards: int = 1,
) -> int:
    """A lower bound of one rank's memory before any activation: the weights resident, plus one
    gradient and ``optimizer_states`` states (AdamW: two moments) per trainable weight, split over
    ``shards`` ranks (FSDP).

    ``full``: every weight trains, in the precision's weight dtype. ``lora``: the frozen base in
    that dtype, the adapters in fp32. ``qlora``: the frozen base at half a byte per weight (the
    packed NF4 storage alone; quantisation state and the unquantised embeddings and head are left
    out, so the bound stays a bound).
    """
    weight_bytes = _DTYPE_BYTES[base_dtype_name(spec, precision)]
    trainable_bytes = trainable_parameters * (_ADAPTER_BYTES if spec.uses_adapters else weight_bytes)
    frozen_bytes = frozen_parameters // 2 if spec.quantized else frozen_parameters * weight_bytes
    total = frozen_bytes + trainable_bytes * (2 + optimizer_states)
    return total // max(1, shards)


def compute_dtype_name(precision: Precision) -> str:
    """The dtype 4-bit layers compute in for ``precision`` (``bnb_4bit_compute_dtype``)."""
    try:
        return _COMPUTE_DTYPE[str(precision)]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}") from None


def base_dtype_name(spec: FinetuningSpec, precision: Precision) -> str:
    """The dtype the job loads its base model in (``from_pretrained(..., dtype=…)``).

    ``full`` and ``lora``: bfloat16 for ``bf16-true``, else float32 (the precision's weights).
    ``qlora``: the compute dtype: the 4-bit weights are quantised from it and dequantised back to
    it, and every weight that stays unquantised is upcast to float32 by
    ``prepare_model_for_kbit_training`` whatever it was loaded in.
    """
    if spec.quantized:
        return compute_dtype_name(precision)
    return "bfloat16" if str(precision) == "bf16-true" else "float32"


def peft_config_kwargs(spec: FinetuningSpec, targets: LoraTargets) -> dict[str, Any]:
    """Keyword arguments for ``peft.LoraConfig``: what the probe built its adapters with."""
    if not spec.uses_adapters:
        raise ValueError(f"finetuning {spec.method.value!r} has no adapters and no peft config")
    kwargs: dict[str, Any] = {
        "task_type": PEFT_TASK_TYPE,
        "r": spec.lora_r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": list(targets.target_modules),
        "bias": "none",
    }
    if targets.fan_in_fan_out:
        kwargs["fan_in_fan_out"] = True
    return kwargs


def quantization_kwargs(precision: Precision) -> dict[str, Any]:
    """Keyword arguments for ``transformers.BitsAndBytesConfig``: a QLoRA base as the probe built it."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute_dtype_name(precision),
        "bnb_4bit_quant_storage": "uint8",
    }


def kbit_preparation_kwargs() -> dict[str, Any]:
    """Keyword arguments for ``peft.prepare_model_for_kbit_training`` (QLoRA).

    Checkpointing is left to ``TrainingArguments`` (``activation_checkpointing``), which switches it
    on non-reentrant with input gradients, as the probe measured; peft's own switch would turn it on
    whatever the plan says, reentrant (torch warns), through a method transformers 5 deprecates.
    """
    return {"use_gradient_checkpointing": False}


QLORA_FSDP_REFUSAL = (
    "finetuning 'qlora' is not probed with fsdp: sharding 4-bit weights needs "
    "bnb_4bit_quant_storage equal to the other weights' dtype, which this probe does not build"
)
"""Why a QLoRA config under FSDP is skipped (the child's check and the engine's say the same)."""


def missing_packages_reason(spec: FinetuningSpec) -> str | None:
    """A sentence naming the distributions ``spec`` needs that are not installed, or ``None``."""
    missing = missing_packages(spec)
    if not missing:
        return None
    return (
        f"finetuning {spec.method.value!r} needs {' and '.join(missing)}, which "
        f"{'is' if len(missing) == 1 else 'are'} not installed (pip install 'maxbatch[{spec.method.value}]')"
    )


def missing_packages(spec: FinetuningSpec) -> list[str]:
    """The distributions ``spec`` needs that are not installed here (looked up, not imported)."""
    needed = {
        FinetuningMethod.FULL: (),
        FinetuningMethod.LORA: ("peft",),
        FinetuningMethod.QLORA: ("peft", "bitsandbytes"),
    }
    return [name for name in needed[spec.method] if importlib.util.find_spec(name) is None]
