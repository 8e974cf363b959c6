"""The probe's request and result types: frozen, validated, JSON-serialisable.

The field names that ``docs/architecture.md`` lists as fixed ("Resource shapes and fixed names")
are relied on by clients and keep their spelling here. Every type is a frozen pydantic model, so
one definition validates the CLI's flags, the API's body and the child's input, and
``model_dump(mode="json")`` is the wire form.

This module imports no torch: the service and the search use it too.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from probes.finetuning_spec import (
    ALL_LINEAR,
    DEFAULT_LORA_ALPHA,
    DEFAULT_LORA_DROPOUT,
    DEFAULT_LORA_R,
    FinetuningMethod,
    FinetuningSpec,
    ModuleName,
    parse_target_modules,
)
from probes.gpu_types import normalise_gpu_type
from probes.gpus import canonical_gpu_name, card_key

JsonValue = Any
"""A value that ``json.dumps`` accepts (kept loose: model configs nest freely)."""


class Frozen(BaseModel):
    """Base for every spec and result type: immutable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Precision(StrEnum):
    """Training precision, in Lightning's names."""

    #: plain fp32 weights and compute
    FP32 = "32-true"
    #: fp16 autocast with a gradient scaler, fp32 master weights (HF ``fp16=True``)
    FP16_MIXED = "16-mixed"
    #: bf16 autocast, fp32 master weights (HF ``bf16=True``)
    BF16_MIXED = "bf16-mixed"
    #: weights, grads and optimizer state in bf16 (a model loaded with ``dtype=bfloat16``)
    BF16_TRUE = "bf16-true"

    @property
    def needs_bf16(self) -> bool:
        return self in (Precision.BF16_MIXED, Precision.BF16_TRUE)


PRECISION_ALIASES: dict[str, Precision] = {
    "32-true": Precision.FP32,
    "32": Precision.FP32,
    "fp32": Precision.FP32,
    "float32": Precision.FP32,
    "16-mixed": Precision.FP16_MIXED,
    "16": Precision.FP16_MIXED,
    "fp16": Precision.FP16_MIXED,
    "float16": Precision.FP16_MIXED,
    "bf16-mixed": Precision.BF16_MIXED,
    "bf16": Precision.BF16_MIXED,
    "bfloat16": Precision.BF16_MIXED,
    "bf16-true": Precision.BF16_TRUE,
}
"""Accepted spellings (Lightning's names and the HF ``TrainingArguments`` flags)."""


def parse_precision(value: str) -> Precision:
    """The precision a user's spelling names; ``ValueError`` lists the accepted ones."""
    key = value.strip().lower()
    if key in PRECISION_ALIASES:
        return PRECISION_ALIASES[key]
    known = ", ".join(sorted(PRECISION_ALIASES))
    raise ValueError(f"unknown precision {value!r}; use one of: {known}")


class Strategy(StrEnum):
    """How the job spreads over its ``world_size`` ranks; one process measures one rank."""

    #: one process trains the whole model (no wrapper): a one-GPU job
    SINGLE = "single"
    #: torch ``DistributedDataParallel`` with the arguments HF Trainer and Accelerate pass
    DDP = "ddp"
    #: FSDP2 ``fully_shard`` as Accelerate applies it for ``fsdp_version: 2`` (full shard)
    FSDP = "fsdp"


_STRATEGY_NOT_YET = re.compile(r"^(deepspeed|ds|zero)", re.IGNORECASE)


def parse_strategy(value: str) -> Strategy:
    """The strategy a user's spelling names; ``ValueError`` says what is accepted."""
    key = value.strip().lower().replace("-", "_")
    for strategy in Strategy:
        if key == strategy.value:
            return strategy
    if _STRATEGY_NOT_YET.match(key):
        raise ValueError(
            f"strategy {value!r}: DeepSpeed ZeRO is not supported yet; use ddp, or fsdp "
            "(FSDP2 shards weights, gradients and optimizer state like ZeRO-3)"
        )
    raise ValueError(f"unknown strategy {value!r}; use one of: single, ddp, fsdp")


def default_strategies(world_size: int) -> tuple[Strategy, ...]:
    """``[single]`` for one rank; ``[ddp, fsdp]`` for more."""
    return (Strategy.SINGLE,) if world_size <= 1 else (Strategy.DDP, Strategy.FSDP)


class Optimizer(StrEnum):
    """The optimizer, in HF ``TrainingArguments.optim`` names."""

    #: ``torch.optim.AdamW`` (CUDA's default implementation, ``foreach``)
    ADAMW_TORCH = "adamw_torch"
    #: ``torch.optim.AdamW(fused=True)``
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    #: transformers' ``Adafactor`` (``scale_parameter=False, relative_step=False``, as Trainer builds it)
    ADAFACTOR = "adafactor"
    #: ``torch.optim.SGD`` (no momentum: Trainer passes only the learning rate)
    SGD = "sgd"
    #: bitsandbytes' 8-bit ``AdamW`` (embeddings kept in 32-bit state, as Trainer registers them)
    ADAMW_BNB_8BIT = "adamw_bnb_8bit"


OPTIMIZER_ALIASES: dict[str, Optimizer] = {
    **{optimizer.value: optimizer for optimizer in Optimizer},
    # the only name before the optimizer axis existed; it always meant torch's AdamW
    "adamw": Optimizer.ADAMW_TORCH,
    # HF's alias of adamw_bnb_8bit
    "adamw_8bit": Optimizer.ADAMW_BNB_8BIT,
}


class AttnImplementation(StrEnum):
    """The attention kernel, as ``from_pretrained(attn_implementation=...)`` names it."""

    #: ``torch.nn.functional.scaled_dot_product_attention`` (the kernel the GPU would pick)
    SDPA = "sdpa"
    #: transformers' own matmul-softmax-matmul
    EAGER = "eager"
    #: the flash-attn package's kernels (CUDA only)
    FLASH_ATTENTION_2 = "flash_attention_2"


class Outcome(StrEnum):
    """What one trial at one batch size came to."""

    #: the steps ran and the peak left at least the headroom free
    FIT = "fit"
    #: the device ran out of memory (typed error, or a recognised message)
    OOM = "oom"
    #: the steps ran, but the peak left less free memory than the headroom
    OVER_HEADROOM = "over_headroom"
    #: any other exception; the child that saw it is discarded
    ERROR = "error"
    #: the trial ran past its time limit and its child was killed
    TIMEOUT = "timeout"
    #: the child process died (signal, abort, non-zero exit without a report)
    CRASH = "crash"


class ConfigStatus(StrEnum):
    #: searched; ``max_batch_size`` is set (or no size fits: then it is ``None`` with a reason)
    OK = "ok"
    #: not run, for the reason given (bf16 on a GPU without native bf16, say)
    SKIPPED = "skipped"
    #: the search could not finish (errors, crashes, timeouts), for the reason given
    FAILED = "failed"


DEVICE_PATTERN = re.compile(r"^(cuda(:\d+)?|simulated|predict)$")
FLEET_DEVICE = "gpu"
"""A GPU of the kind ``gpu_type`` names, wherever the service's dispatcher finds one (fleet placement)."""


def normalize_device(value: str) -> str:
    """The device a user's spelling names: lower case, ``cuda`` as ``cuda:0``; ``ValueError`` otherwise."""
    name = value.strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"unknown device {name!r}; use cuda:N, simulated or predict")
    return "cuda:0" if name == "cuda" else name


DeviceName = Annotated[str, AfterValidator(normalize_device)]
"""A device field: ``cuda:N``, ``simulated`` or ``predict`` (validated and normalised once, here)."""


def normalize_request_device(value: str) -> str:
    """A request's device: a :data:`DeviceName`, or ``gpu`` (a kind of GPU the service places)."""
    if value.strip().lower() == FLEET_DEVICE:
        return FLEET_DEVICE
    try:
        return normalize_device(value)
    except ValueError:
        raise ValueError(
            f"unknown device {value.strip().lower()!r}; use cuda:N, gpu (with gpu_type), simulated or predict"
        ) from None


RequestDeviceName = Annotated[str, AfterValidator(normalize_request_device)]
"""``ProbeSpec.device``: what a child runs on (:data:`DeviceName`), or ``gpu`` for fleet placement."""


# --- request bounds --------------------------------------------------------------------------
# Every number a request carries has an upper bound: what the engine, the plan arithmetic and the
# clients that read the answer (JavaScript numbers are exact only below 2**53) can take. The
# bounds are generous for real training jobs; docs/hardening.md gives the reasoning per field.

MAX_SEQ_LEN = 2**20
"""1,048,576 tokens: the longest context windows of published models (1M)."""
MAX_BATCH = 2**20
"""Samples per optimizer step (target) or per device (batch-size cap): 1,048,576, far above any
published pre-training batch (a few thousand sequences)."""
MAX_WORLD_SIZE = 2**17
"""131,072 devices: above the largest training clusters reported (about 100,000 GPUs)."""
MAX_MEMORY_BYTES = 2**44
"""16 TiB: no accelerator has 1 TiB of memory; byte counts stay exact in every JSON client."""
MAX_DATASET_SIZE = 2**40
"""Samples: with MAX_EPOCHS, ``max_steps`` stays below 2**53."""
MAX_EPOCHS = 1_000.0
MAX_SEED = 2**32 - 1
"""``torch.manual_seed`` takes up to 2**64 - 1, but seeds above 2**53 are not exact in
JavaScript clients and 2**32 seeds are plenty; numpy's legacy seeding stops at 2**32 - 1 too."""
MAX_NAME_LENGTH = 4096
"""``model.name_or_path``: PATH_MAX on Linux."""

DEFAULT_CUDA_ALLOC_CONF = "expandable_segments:True"
"""``PYTORCH_CUDA_ALLOC_CONF`` a request gets unless it names its own: segments grow in place instead of
new blocks of every size (torch's own advice in its out-of-memory message)."""
CUDA_ALLOC_CONF_PATTERN = r"^([a-z_]+:[A-Za-z0-9_.:]+(,[a-z_]+:[A-Za-z0-9_.:]+)*)?$"
"""``option:value`` pairs separated by commas, as torch's allocator parses them (empty: torch's defaults)."""
MAX_VARIED_STEPS = 256


def _check_finite(config: dict[str, Any]) -> None:
    """Refuse NaN and ±Infinity anywhere in ``config``: JSON cannot carry them back (pydantic writes
    them as null), and no config can use them. Walked without recursion: nesting is unbounded."""
    stack: list[tuple[str, object]] = [("model.config", config)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} is {value}; config values must be finite numbers")
        if isinstance(value, dict):
            stack.extend((f"{where}.{key}", item) for key, item in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    """An optional string field's schema without its null branch and default."""
    out = {k: v for k, v in field.items() if k not in ("anyOf", "default")}
    out.update(next(branch for branch in field["anyOf"] if branch.get("type") != "null"))
    return out


def _one_source_schema(schema: dict[str, Any]) -> None:
    """The JSON Schema of :class:`ModelSpec`: exactly one of ``architecture`` and ``name_or_path``.

    Written as a ``oneOf`` of the two shapes the validator accepts (the other field absent or
    null), so that a client generator, or a fuzzer, builds only requests the service takes.
    """
    properties = schema.pop("properties")
    schema.pop("required", None)
    schema.pop("additionalProperties", None)
    null: dict[str, Any] = {"type": "null"}
    shared = {"config": properties["config"], "trust_remote_code": properties["trust_remote_code"]}
    by_architecture, by_name = (_not_null(properties[name]) for name in ("architecture", "name_or_path"))
    schema["oneOf"] = [
        {
            "title": "By architecture",
            "type": "object",
            "properties": {"architecture": by_architecture, **shared, "name_or_path": null},
            "required": ["architecture"],
            "additionalProperties": False,
        },
        {
            "title": "By name or path",
            "type": "object",
            "properties": {"name_or_path": by_name, **shared, "architecture": null},
            "required": ["name_or_path"],
            "additionalProperties": False,
        },
    ]


class ModelSpec(Frozen):
    """Which model to build: an architecture with config overrides, or a name or local path."""

    model_config = ConfigDict(allow_inf_nan=False, json_schema_extra=_one_source_schema)

    architecture: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="a transformers model type, e.g. gpt2, llama, mistral, qwen2",
        examples=["gpt2", "llama"],
    )
    config: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="overrides for the architecture's default config (numbers must be finite)",
        examples=[{"n_layer": 2, "n_embd": 64, "n_head": 2}],
    )
    name_or_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="a local directory holding config.json, or a hub id",
    )
    trust_remote_code: Bool = False

    @field_validator("config")
    @classmethod
    def _finite_config(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        _check_finite(value)
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        if (self.architecture is None) == (self.name_or_path is None):
            raise ValueError("give exactly one of model.architecture or model.name_or_path")
        return self

    @property
    def label(self) -> str:
        """A short human name for lists and logs."""
        return self.architecture or self.name_or_path or "?"


PositiveInt = Annotated[int, Field(gt=0)]

MAX_CARDS = 16
"""Cards one ``predict`` request may compare: more than the predict table's 11 (every distinct card
fits, with room for the table to grow); a job runs them one after another."""
GpuName = Annotated[str, Field(min_length=1, max_length=64)]


def _dedupe(values: list[Any]) -> tuple[Any, ...]:
    """Drop repeats, keep order; unhashable items are left for the type check to reject. Items of
    different types are never repeats (``1 == True``, but 1 is no boolean)."""
    seen: list[Any] = []
    for value in values:
        if not any(type(s) is type(value) and s == value for s in seen):
            seen.append(value)
    return tuple(seen)


Int = Annotated[int, Strict()]
"""An integer as JSON Schema means it: not "64", not true (the validator below takes 64.0)."""
Float = Annotated[float, Strict()]
"""A number: not "1.5", not true."""
Bool = Annotated[bool, Strict()]
"""true or false: not 1, not "yes"."""
SeqLen = Annotated[Int, Field(gt=0, le=MAX_SEQ_LEN, description="tokens per sequence")]
MemoryBytes = Annotated[Int, Field(gt=0, le=MAX_MEMORY_BYTES)]


DEVICE_SCHEMA_PATTERN = r"^(cuda(:[0-9]+)?|gpu|simulated|predict)$"
GPU_TYPE_SCHEMA_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.+-]*[A-Za-z0-9.+])?$"
"""``gpu_type`` in the JSON Schema: the canonical spellings (``H100-80GB``, ``A100``); the validator
also reads ``_`` and spaces as ``-`` (:func:`probes.gpu_types.parse_gpu_type`)."""
"""The device names in the JSON Schema: the canonical spellings (the validator also takes other
cases and surrounding spaces, and normalises them)."""


def _given(field: str) -> dict[str, Any]:
    """JSON Schema: ``field`` is present and not null."""
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


def _device(name: str) -> dict[str, Any]:
    """JSON Schema: the device is ``name`` (an absent device is ``simulated``, the default)."""
    rule: dict[str, Any] = {"properties": {"device": {"const": name}}}
    return rule if name == "simulated" else {**rule, "required": ["device"]}


def _request_schema(schema: dict[str, Any]) -> None:
    """What the validators take, as JSON Schema: the spellings ``precisions``, ``strategies`` and
    ``gradient_checkpointing`` accept (one value or a non-empty list; precision aliases; strategies
    also null for the default by world size), the optimizer's names and aliases, and the
    rules between fields that :meth:`ProbeSpec._memory_for_simulated` and
    :meth:`ProbeSpec._sync_each_batch_with_fsdp` check as ``if``/``then`` (all but
    ``headroom_bytes < memory_limit_bytes``, which JSON Schema cannot state)."""
    properties = schema["properties"]
    properties["device"]["pattern"] = DEVICE_SCHEMA_PATTERN
    spellings = {"type": "string", "enum": sorted(PRECISION_ALIASES)}
    properties["precisions"] = {
        **{k: v for k, v in properties["precisions"].items() if k not in ("items", "type")},
        "anyOf": [{"type": "array", "items": spellings, "minItems": 1}, spellings],
    }
    strategies = {"type": "string", "enum": [strategy.value for strategy in Strategy]}
    properties["strategies"] = {
        **{k: v for k, v in properties["strategies"].items() if k not in ("items", "type", "default")},
        "anyOf": [{"type": "array", "items": strategies, "minItems": 1}, strategies, {"type": "null"}],
    }
    properties["optimizer"] = {
        **{k: v for k, v in properties["optimizer"].items() if k not in ("$ref", "allOf", "enum", "type")},
        "type": "string",
        "enum": sorted(OPTIMIZER_ALIASES),
    }
    boolean = {"type": "boolean"}
    properties["gradient_checkpointing"] = {
        **{k: v for k, v in properties["gradient_checkpointing"].items() if k not in ("items", "type")},
        "anyOf": [{"type": "array", "items": boolean, "minItems": 1}, boolean],
    }
    name = {"type": "string", "minLength": 1, "maxLength": 64}
    properties["gpu"] = {
        **{k: v for k, v in properties["gpu"].items() if k not in ("anyOf", "type")},
        "anyOf": [
            name,
            {"type": "array", "items": name, "minItems": 1, "maxItems": MAX_CARDS},
            {"type": "null"},
        ],
    }
    schema["allOf"] = [
        {"if": _device("simulated"), "then": _given("memory_limit_bytes")},
        {"if": _device("predict"), "then": {"anyOf": [_given("memory_limit_bytes"), _given("gpu")]}},
        {"if": _given("gpu"), "then": _device("predict")},
        {"if": _device(FLEET_DEVICE), "then": _given("gpu_type")},
        {"if": _given("gpu_type"), "then": {"properties": {"device": {"not": {"pattern": "^cuda"}}}}},
        {
            "if": {"required": ["sync_each_batch"], "properties": {"sync_each_batch": {"const": True}}},
            "then": _with_fsdp(),
        },
    ]


def _with_fsdp() -> dict[str, Any]:
    """JSON Schema: ``fsdp`` is among the strategies — named, or by default (null or absent
    strategies with ``world_size`` above 1)."""
    fsdp = {"const": Strategy.FSDP.value}
    named = {"anyOf": [{"type": "array", "contains": fsdp}, fsdp]}
    by_default = {"properties": {"strategies": {"type": "null"}, "world_size": {"minimum": 2}}}
    return {
        "anyOf": [
            {"required": ["strategies"], "properties": {"strategies": named}},
            {**by_default, "required": ["world_size"]},
        ]
    }


_TARGET_NAME = r"[^,\s][^,]{0,199}"
LoraTargetModules = Annotated[
    Literal["all-linear"] | tuple[ModuleName, ...],
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "pattern": rf"^\s*{_TARGET_NAME}(,\s*{_TARGET_NAME})*$",
                    "description": "'all-linear' (any case), or module names separated by commas",
                },
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "string",
                        "pattern": r"\S",
                        "maxLength": 200,
                        "not": {"const": "all-linear"},
                    },
                },
            ]
        }
    ),
]
"""What the service takes for ``lora_target_modules``, stated as JSON Schema: the CLI's comma form
is accepted over HTTP too (:func:`~probes.finetuning_spec.parse_target_modules`)."""


class ProbeSpec(Frozen):
    """One request: a model, a shape, the configs to try, the device and the target."""

    model_config = ConfigDict(allow_inf_nan=False, json_schema_extra=_request_schema)

    model: ModelSpec
    task: Literal["causal-lm"] = "causal-lm"
    seq_len: SeqLen
    precisions: tuple[Precision, ...] = tuple(Precision)
    gradient_checkpointing: tuple[Bool, ...] = (False, True)
    strategies: tuple[Strategy, ...] = Field(
        default=(Strategy.SINGLE,),
        description="single, ddp, fsdp; default [single] for world_size 1, [ddp, fsdp] above",
    )
    optimizer: Optimizer = Field(default=Optimizer.ADAMW_TORCH, description="an HF optim name")
    attn_implementation: AttnImplementation = AttnImplementation.SDPA
    finetuning: FinetuningMethod = Field(
        default=FinetuningMethod.FULL,
        description="full (every weight), lora (peft adapters on a frozen base) or qlora (adapters on a "
        "4-bit NF4 base, bitsandbytes)",
    )
    lora_r: Int = Field(default=DEFAULT_LORA_R, ge=1, le=65_536, description="LoRA rank (lora, qlora)")
    lora_alpha: Int = Field(
        default=DEFAULT_LORA_ALPHA,
        ge=1,
        le=1_000_000,
        description="LoRA scale numerator (scaling = alpha / r)",
    )
    lora_dropout: Float = Field(
        default=DEFAULT_LORA_DROPOUT, ge=0, lt=1, description="dropout before each adapter (it costs memory)"
    )
    lora_target_modules: LoraTargetModules = Field(
        default=ALL_LINEAR,
        description="'all-linear' (peft's: every linear layer but the output head) or module names, "
        "e.g. [q_proj, v_proj]",
    )
    sync_each_batch: Bool = Field(
        default=False,
        description="fsdp with gradient accumulation: reduce-scatter the gradients after every "
        "micro-batch (Accelerate's sync_each_batch) instead of keeping the unsharded gradients until "
        "the last one; less memory, one reduce-scatter per micro-batch. The trials run so, and the "
        "recommendation's training_arguments set it in accelerator_config",
    )
    target_effective_batch_size: Int = Field(gt=0, le=MAX_BATCH)
    world_size: Int = Field(default=1, gt=0, le=MAX_WORLD_SIZE)
    device: RequestDeviceName = "simulated"
    memory_limit_bytes: MemoryBytes | None = Field(
        default=None,
        description="memory for tensors; required for simulated and predict, optional on cuda",
    )
    gpu: GpuName | tuple[GpuName, ...] | None = Field(
        default=None,
        description="predict: a GPU name from the predict table, e.g. H100-80GB; or a list of them "
        f"(1 to {MAX_CARDS}, repeats merged) to compare cards in one job: the result then carries one "
        "full result per card in `cards`",
    )
    gpu_type: str | None = Field(
        default=None,
        max_length=64,
        json_schema_extra={"pattern": GPU_TYPE_SCHEMA_PATTERN},
        description="run on a node with this kind of GPU: a predict-table name (H100-80GB) or a bare "
        "model (H100); required with device 'gpu', placement only with simulated and predict",
    )
    headroom_bytes: Int = Field(
        default=0, ge=0, le=MAX_MEMORY_BYTES, description="free memory a passing trial must leave"
    )
    max_batch_size_limit: Int | None = Field(default=None, gt=0, le=MAX_BATCH)
    dataset_size: Int | None = Field(default=None, gt=0, le=MAX_DATASET_SIZE)
    num_train_epochs: Float | None = Field(default=None, gt=0, le=MAX_EPOCHS)
    warmup_ratio: Float | None = Field(default=None, ge=0, lt=1)
    trial_accumulation_steps: Int = Field(
        default=2, ge=2, le=16, description="micro-steps per optimizer step in every trial (>= 2)"
    )
    trial_optimizer_steps: Int = Field(
        default=2, ge=2, le=16, description="optimizer steps per trial (>= 2: AdamW state exists after one)"
    )
    confirm_optimizer_steps: Int = Field(
        default=4, ge=2, le=64, description="optimizer steps of the fresh-process confirmation"
    )
    confirm_varied_steps: Int | None = Field(
        default=None,
        ge=0,
        le=MAX_VARIED_STEPS,
        description="optimizer steps at varying sequence lengths (dynamic padding) that the confirmation "
        "runs after its worst-case steps, in the same process; null: 16 on cuda, 2 on simulated "
        "(predict has no confirmation); 0: none",
    )
    cuda_alloc_conf: str = Field(
        default=DEFAULT_CUDA_ALLOC_CONF,
        max_length=512,
        pattern=CUDA_ALLOC_CONF_PATTERN,
        description="PYTORCH_CUDA_ALLOC_CONF the job will use: every trial child runs with it, and the "
        "recommendation's env carries it; empty: torch's defaults",
    )
    trial_timeout_seconds: Float = Field(default=600.0, gt=0, le=86_400)
    seed: Int = Field(default=0, ge=0, le=MAX_SEED, description="torch.manual_seed in every trial")
    predict_seeding: Bool = Field(
        default=True,
        description="on cuda and simulated: predict each config first (CPU, no GPU held) and let the "
        "device confirm the predicted bracket; the ordinary search takes over where it disagrees",
    )

    @field_validator(
        "seq_len",
        "lora_r",
        "lora_alpha",
        "target_effective_batch_size",
        "world_size",
        "memory_limit_bytes",
        "headroom_bytes",
        "max_batch_size_limit",
        "dataset_size",
        "trial_accumulation_steps",
        "trial_optimizer_steps",
        "confirm_optimizer_steps",
        "confirm_varied_steps",
        "seed",
        mode="before",
    )
    @classmethod
    def _json_integer(cls, value: object) -> object:
        """Integers are strict (no "64" for 64, no true for 1, as the JSON Schema says), but 64.0 is
        an integer in JSON Schema and some JSON writers send it so."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_strategies(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("strategies") is None:
            world_size = data.get("world_size", 1)
            if isinstance(world_size, float) and world_size.is_integer():
                world_size = int(world_size)  # 2.0 is 2 in JSON Schema, as the field takes it
            ranks = world_size if isinstance(world_size, int) and not isinstance(world_size, bool) else 1
            data = {**data, "strategies": default_strategies(ranks)}
        return data

    @field_validator("strategies", mode="before")
    @classmethod
    def _parse_strategies(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return _dedupe([parse_strategy(v) if isinstance(v, str) else v for v in value])
        return value

    @field_validator("strategies")
    @classmethod
    def _non_empty_strategies(cls, value: tuple[Strategy, ...]) -> tuple[Strategy, ...]:
        if not value:
            raise ValueError("strategies must name at least one of single, ddp, fsdp")
        return value

    @field_validator("optimizer", mode="before")
    @classmethod
    def _parse_optimizer(cls, value: object) -> object:
        if isinstance(value, str):
            key = value.strip().lower()
            if key not in OPTIMIZER_ALIASES:
                known = ", ".join(o.value for o in Optimizer)
                raise ValueError(f"unknown optimizer {value!r}; use one of: {known}")
            return OPTIMIZER_ALIASES[key]
        return value

    @field_validator("finetuning", mode="before")
    @classmethod
    def _parse_finetuning(cls, value: object) -> object:
        if isinstance(value, str):
            key = value.strip().lower()
            for method in FinetuningMethod:
                if key == method.value:
                    return method
            known = ", ".join(m.value for m in FinetuningMethod)
            raise ValueError(f"unknown finetuning {value!r}; use one of: {known}")
        return value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _parse_target_modules(cls, value: object) -> object:
        return parse_target_modules(value)

    @field_validator("precisions", mode="before")
    @classmethod
    def _parse_precisions(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            parsed = [parse_precision(v) if isinstance(v, str) else v for v in value]
            return _dedupe(parsed)
        return value

    @field_validator("precisions")
    @classmethod
    def _non_empty_precisions(cls, value: tuple[Precision, ...]) -> tuple[Precision, ...]:
        if not value:
            raise ValueError("precisions must name at least one precision")
        return value

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _dedupe_checkpointing(cls, value: object) -> object:
        if isinstance(value, bool):
            return (value,)
        if isinstance(value, list | tuple):
            return _dedupe(list(value))
        return value

    @field_validator("gradient_checkpointing")
    @classmethod
    def _non_empty_checkpointing(cls, value: tuple[bool, ...]) -> tuple[bool, ...]:
        if not value:
            raise ValueError("gradient_checkpointing must list at least one of false, true")
        return value

    @field_validator("gpu", mode="before")
    @classmethod
    def _parse_cards(cls, value: object) -> object:
        """A list of cards: repeats merged (the same card however it is spelled, first spelling
        kept), known names in their canonical spelling; empty or too long is refused. One name
        stays a string: that request, and its result, are exactly the one-card ones."""
        if not isinstance(value, list | tuple):
            return value
        if not value:
            raise ValueError("gpu must name at least one card (or give one name as a string)")
        if len(value) > MAX_CARDS:
            raise ValueError(f"gpu lists {len(value)} cards; compare at most {MAX_CARDS} in one request")
        if not all(isinstance(item, str) for item in value):
            return value  # the type check names the item
        merged: dict[str, str] = {}
        for name in value:
            merged.setdefault(card_key(name), canonical_gpu_name(name))
        return tuple(merged.values())

    @field_validator("gpu_type")
    @classmethod
    def _canonical_gpu_type(cls, value: str | None) -> str | None:
        return normalise_gpu_type(value) if value is not None else None

    @model_validator(mode="after")
    def _memory_for_simulated(self) -> ProbeSpec:
        if self.device == "simulated" and self.memory_limit_bytes is None:
            raise ValueError("device 'simulated' needs memory_limit_bytes (the memory cap to simulate)")
        if self.device == "predict" and self.memory_limit_bytes is None and self.gpu is None:
            raise ValueError("device 'predict' needs memory_limit_bytes or gpu (e.g. H100-80GB)")
        if self.gpu is not None and self.device != "predict":
            raise ValueError("gpu names a card to predict for; use it with device 'predict'")
        if self.device == FLEET_DEVICE and self.gpu_type is None:
            raise ValueError("device 'gpu' needs gpu_type, the kind of GPU to run on (e.g. H100-80GB)")
        if self.gpu_type is not None and self.device.startswith("cuda"):
            raise ValueError(
                f"{self.device} names one GPU of the service's machine; to ask for a kind of GPU "
                "use device 'gpu' with gpu_type"
            )
        if self.memory_limit_bytes is not None and self.headroom_bytes >= self.memory_limit_bytes:
            raise ValueError("headroom_bytes must be smaller than memory_limit_bytes")
        return self

    @model_validator(mode="after")
    def _sync_each_batch_with_fsdp(self) -> ProbeSpec:
        if self.sync_each_batch and Strategy.FSDP not in self.strategies:
            named = ", ".join(s.value for s in self.strategies)
            raise ValueError(
                f"sync_each_batch changes how fsdp accumulates gradients; strategies has no fsdp ({named})"
            )
        return self

    @property
    def cards(self) -> tuple[str, ...]:
        """The cards a multi-card ``predict`` request compares (``gpu`` given as a list); ``()`` for
        every other request, a one-card one included."""
        return self.gpu if isinstance(self.gpu, tuple) else ()

    @property
    def card(self) -> str | None:
        """The one card ``gpu`` names as a string (``None``: no card, or a list of cards)."""
        return self.gpu if isinstance(self.gpu, str) else None

    def for_card(self, card: str) -> ProbeSpec:
        """This request for one of its :attr:`cards`: the one-card request it stands for."""
        if card not in self.cards:
            raise ValueError(f"{card!r} is not one of this request's cards: {', '.join(self.cards)}")
        return self.model_copy(update={"gpu": card})

    @property
    def device_kind(self) -> Literal["cuda", "gpu", "simulated", "predict"]:
        if self.device.startswith("cuda"):
            return "cuda"
        if self.device == FLEET_DEVICE:
            return "gpu"
        return "simulated" if self.device == "simulated" else "predict"

    @property
    def cuda_index(self) -> int | None:
        if not self.device.startswith("cuda"):
            return None
        return int(self.device.split(":")[1])

    @property
    def finetuning_spec(self) -> FinetuningSpec:
        """The fine-tuning fields as the recipe takes them."""
        return FinetuningSpec(
            method=self.finetuning,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_target_modules=self.lora_target_modules,
        )

    def configs(self) -> list[tuple[Precision, bool, Strategy]]:
        """Every (precision, checkpointing, strategy) to probe, in request order."""
        return [
            (p, c, s) for p in self.precisions for c in self.gradient_checkpointing for s in self.strategies
        ]


class TrialRecord(Frozen):
    """One trial: a batch size run for a few optimizer steps in a child process."""

    batch_size: int
    outcome: Outcome
    peak_reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    step_seconds: float | None = Field(default=None, description="mean seconds per optimizer step")
    accumulation_steps: int = 1
    optimizer_steps: int = 0
    message: str | None = None
    loss_flag: str | None = Field(
        default=None, description="'nan', 'inf' or 'zero' when the fp16 loss overflowed or vanished"
    )
    needed_bytes: int | None = Field(
        default=None,
        description="out of memory: the bytes the trial needed at least (in use + requested at the failed "
        "allocation)",
    )
    lengths: tuple[int, ...] | None = Field(
        default=None,
        description="a confirmation under dynamic padding: each micro-batch's padded length, in order "
        "(null: every micro-batch at seq_len)",
    )
    micro_steps_done: int | None = Field(
        default=None,
        description="with lengths: the micro-batches whose forward and backward completed (on a failure, "
        "it came in the next one or in the optimizer step after the last completed one)",
    )
    cuda_alloc_conf: str | None = Field(
        default=None, description="PYTORCH_CUDA_ALLOC_CONF as the trial's process saw it (null: unset)"
    )
    layers: int | None = Field(
        default=None,
        description="the decoder layers the trial's model had when it was cut below the model's own depth "
        "(predict's depth extrapolation); null: the model as given",
    )

    @property
    def peak_bytes(self) -> int | None:
        """The peak that decides fit: reserved where the device reports it, else allocated."""
        return self.peak_reserved_bytes if self.peak_reserved_bytes is not None else self.peak_allocated_bytes


class Plan(Frozen):
    """``per_device_train_batch_size × gradient_accumulation_steps × world_size``."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    effective_batch_size: int
    exact: bool = Field(description="true when effective_batch_size equals the target")
    note: str | None = None


class Seeding(Frozen):
    """How a config's search on the device was seeded by ``predict`` (``predict_seeding``)."""

    #: the bracket ``predict`` found for the device's capacity (``None``, ``None``: none, see ``reason``)
    predicted_max_batch_size: int | None = None
    predicted_first_failing_batch_size: int | None = None
    #: the device agreed with the prediction (``None``: no prediction, or the search was aborted)
    prediction_right: bool | None = None
    #: trials on ``predict`` (CPU) and on the device, the confirmation included
    predict_trials: int = 0
    device_trials: int = 0
    #: why there was no prediction to seed with
    reason: str | None = None


class Confirmation(Frozen):
    """How the answer was confirmed: the worst case, then dynamic padding, with the job's allocator."""

    batch_size: int
    worst_case_optimizer_steps: int = Field(description="optimizer steps with every sequence at seq_len")
    varied_optimizer_steps: int = Field(description="optimizer steps at varying lengths after them")
    varied_lengths: tuple[int, ...] = Field(
        default=(), description="the padded lengths of the varying micro-batches, in order"
    )
    all_fit: bool = Field(description="every step, the varying ones included, fitted")
    cuda_alloc_conf: str | None = Field(
        default=None, description="PYTORCH_CUDA_ALLOC_CONF in the confirming process (null: unset)"
    )
    reserved_minus_allocated_bytes: int | None = Field(
        default=None,
        description="cuda: max_memory_reserved - max_memory_allocated over the confirmation (the cache's "
        "rounding and fragmentation); null where it is not measurable (simulated counts bytes)",
    )
    derived_headroom_bytes: int | None = Field(
        default=None,
        description="cuda with headroom_bytes 0: that margin rounded up to 2 MiB, which the answer's peak "
        "had to leave free; null otherwise",
    )
    failed_sizes: tuple[int, ...] = Field(
        default=(),
        description="larger sizes that passed the worst-case steps and then failed a varying one (or the "
        "derived headroom): what a worst-case-only confirmation would have returned",
    )


class DepthExtrapolation(Frozen):
    """How ``predict`` answered a config of a deep model (``probes.deep_predict``).

    ``extrapolated``: the answer came from the affine timelines of the model cut to ``base_depths``
    layers, extrapolated to its ``layers`` (or, ``base_depths`` empty, from the floor alone: weights,
    gradients and optimizer state exceed the capacity, no trial ran); else the ordinary search ran
    at full depth and ``note`` says why.
    """

    extrapolated: bool
    #: the model's own decoder layers (``None`` where the config states none)
    layers: int | None = None
    #: the depths the trials ran at (empty when the search ran at full depth)
    base_depths: tuple[int, ...] = ()
    note: str


class ConfigResult(Frozen):
    """The search result for one (precision, checkpointing, strategy)."""

    precision: Precision
    gradient_checkpointing: bool
    strategy: Strategy = Strategy.SINGLE
    status: ConfigStatus
    reason: str | None = None
    max_batch_size: int | None = None
    first_failing_batch_size: int | None = None
    peak_memory_bytes: int | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    confirmed: bool = False
    warnings: tuple[str, ...] = ()
    trials: tuple[TrialRecord, ...] = ()
    plan: Plan | None = None
    min_batch_needs_bytes: int | None = Field(
        default=None,
        description="when batch size 1 does not fit: the memory it needs per device (a lower bound "
        "when min_batch_need_is_lower_bound)",
    )
    min_batch_need_is_lower_bound: bool = False
    fits_with: tuple[Strategy, ...] = Field(
        default=(),
        description="when batch size 1 does not fit: the probed strategies with the same precision and "
        "checkpointing where it does",
    )
    seeding: Seeding | None = Field(
        default=None, description="on cuda and simulated with predict_seeding: the prediction and the trials"
    )
    confirmation: Confirmation | None = Field(
        default=None, description="the answer's confirmation (cuda and simulated; predict has none)"
    )
    depth_extrapolation: DepthExtrapolation | None = Field(
        default=None,
        description="on predict: whether the answer was extrapolated from shallower copies of the model "
        "(their trials carry their layers) or searched at full depth, and why",
    )


class DeviceInfo(Frozen):
    kind: Literal["cuda", "simulated", "predict"]
    name: str
    total_memory_bytes: int
    memory_limit_bytes: int | None = None
    compute_capability: str | None = None
    bf16_supported: bool
    timings_are_gpu_times: bool = False
    predicted: bool = False
    overhead_bytes: int = Field(default=0, description="predicted GPU overhead added to every peak")
    capacity_bytes: int | None = Field(
        default=None,
        description="the peak a passing trial may reach: (memory limit, else total) - headroom - overhead; "
        "reported by the device (absent from results of earlier versions)",
    )
    uuid: str | None = None


class Recommendation(Frozen):
    precision: Precision
    gradient_checkpointing: bool
    strategy: Strategy = Strategy.SINGLE
    plan: Plan
    training_arguments: dict[str, JsonValue]
    model_init_kwargs: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="keyword arguments for from_pretrained (attn_implementation, dtype): the model as "
        "measured; TRL's SFTConfig takes the same dict as model_init_kwargs",
    )
    finetuning: FinetuningMethod = FinetuningMethod.FULL
    peft_config: dict[str, JsonValue] | None = Field(
        default=None,
        description="lora, qlora: keyword arguments for peft.LoraConfig, the adapters as measured (the "
        "target modules written out)",
    )
    quantization_config: dict[str, JsonValue] | None = Field(
        default=None,
        description="qlora: keyword arguments for transformers.BitsAndBytesConfig, passed to "
        "from_pretrained(quantization_config=...)",
    )
    prepare_model_for_kbit_training: dict[str, JsonValue] | None = Field(
        default=None, description="qlora: keyword arguments for peft.prepare_model_for_kbit_training"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables for the training job: PYTORCH_CUDA_ALLOC_CONF as the "
        "confirmation ran with it (cuda_alloc_conf)",
    )
    why: str


class Versions(Frozen):
    maxbatch: str
    python: str
    torch: str | None = None
    transformers: str | None = None
    cuda: str | None = None
    driver: str | None = None


class CardResult(Frozen):
    """One card of a multi-card ``predict`` request: everything a one-card request for it returns
    (its configs equal that request's), and what it took from the other cards' measurements."""

    gpu: str = Field(description="the card, as the predict table spells it")
    device: DeviceInfo
    configs: tuple[ConfigResult, ...]
    recommendation: Recommendation | None = None
    elapsed_seconds: float
    timing_note: str | None = None
    trials_run: int = Field(default=0, description="trials run for this card")
    trials_reused: int = Field(
        default=0,
        description="trials taken from another card with the same compute capability (same kernels, "
        "same counted bytes) whose peak fits this card: the same run, not run twice",
    )


class ProbeResult(Frozen):
    spec: ProbeSpec
    device: DeviceInfo
    configs: tuple[ConfigResult, ...]
    recommendation: Recommendation | None = None
    versions: Versions
    elapsed_seconds: float
    timing_note: str | None = None
    cards: tuple[CardResult, ...] | None = Field(
        default=None,
        description="a request whose gpu is a list: one full result per card, in the request's order; "
        "device, configs and recommendation above are then the first card's (for clients that read one "
        "card). Absent (null) for every other request",
    )

    def card_results(self) -> tuple[CardResult, ...]:
        """Every card's result: :attr:`cards`, or the one result as a card (any request)."""
        if self.cards is not None:
            return self.cards
        card = CardResult(
            gpu=self.spec.card or self.device.name,
            device=self.device,
            configs=self.configs,
            recommendation=self.recommendation,
            elapsed_seconds=self.elapsed_seconds,
            timing_note=self.timing_note,
            trials_run=sum(len(c.trials) for c in self.configs),
        )
        return (card,)

    def all_configs(self) -> tuple[ConfigResult, ...]:
        """The configs of every card (the configs for a one-card request)."""
        return tuple(config for card in self.card_results() for config in card.configs)


Phase = Literal["search", "confirm"]
"""Which part of a config's run a trial belongs to."""


class EventKind(StrEnum):
    #: the search of one config starts
    CONFIG_STARTED = "config_started"
    #: one trial finished (any outcome)
    TRIAL = "trial"
    #: one config is done: searched, confirmed, planned (or skipped / failed)
    CONFIG_DONE = "config_done"


class ProbeEvent(Frozen):
    """Progress of a running probe, as the engine reports it to its caller."""

    kind: EventKind
    precision: Precision
    gradient_checkpointing: bool
    strategy: Strategy = Strategy.SINGLE
    config_index: int = Field(description="0-based position of the config in spec.configs()")
    config_count: int
    trial: TrialRecord | None = None
    config: ConfigResult | None = None
    phase: Phase | None = None
    gpu: str | None = Field(
        default=None,
        description="a multi-card request: the card this event is for (config_index then counts "
        "across cards: card k's configs are k * configs + 0, 1, ...)",
    )


class ConfigTask(Frozen):
    """What a trial child needs to build one config: the parent sends it once per child."""

    model: ModelSpec
    seq_len: SeqLen
    precision: Precision
    gradient_checkpointing: bool
    strategy: Strategy = Strategy.SINGLE
    world_size: PositiveInt = 1
    optimizer: Optimizer = Optimizer.ADAMW_TORCH
    attn_implementation: AttnImplementation = AttnImplementation.SDPA
    finetuning: FinetuningSpec = Field(default_factory=FinetuningSpec)
    #: ``fsdp``: reduce-scatter after every micro-step (Accelerate's ``sync_each_batch``); false for
    #: other strategies, whose steps it does not change
    sync_each_batch: bool = False
    device: DeviceName
    memory_limit_bytes: int | None = None
    headroom_bytes: int = 0
    gpu: str | None = None
    seed: int = 0
    allow_remote_code: bool = False
    #: PYTORCH_CUDA_ALLOC_CONF the child sets before CUDA starts (``None``: leave the environment as is)
    cuda_alloc_conf: str | None = None

    @classmethod
    def for_config(
        cls,
        spec: ProbeSpec,
        precision: Precision,
        checkpointing: bool,
        strategy: Strategy = Strategy.SINGLE,
        *,
        allow_remote_code: bool = False,
    ) -> ConfigTask:
        return cls(
            model=spec.model,
            seq_len=spec.seq_len,
            precision=precision,
            gradient_checkpointing=checkpointing,
            strategy=strategy,
            world_size=spec.world_size,
            optimizer=spec.optimizer,
            attn_implementation=spec.attn_implementation,
            finetuning=spec.finetuning_spec,
            sync_each_batch=spec.sync_each_batch and strategy is Strategy.FSDP,
            device=spec.device,
            memory_limit_bytes=spec.memory_limit_bytes,
            headroom_bytes=spec.headroom_bytes,
            gpu=spec.card,
            seed=spec.seed,
            allow_remote_code=allow_remote_code,
            cuda_alloc_conf=spec.cuda_alloc_conf,
        )


class ModelFacts(Frozen):
    """What building the config taught us (reported by the first child; validates the request)."""

    model_type: str
    architecture_class: str
    parameter_count: int
    max_positions: int | None
    vocab_size: int
    decoder_layer_classes: list[str] = Field(
        default_factory=list, description="the model's _no_split_modules: what FSDP wraps one unit each"
    )
    layers: int | None = Field(default=None, description="decoder layers (for the FLOPs estimate)")
    hidden_size: int | None = None
    active_parameter_count: int | None = Field(
        default=None, description="parameters a token passes through (mixture-of-experts: the chosen experts)"
    )
