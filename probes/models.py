"""From a ``ModelSpec`` to a config, to facts about the model, to a randomly initialised model.

Weights are never downloaded: a probe needs the architecture and the shapes, and random values use
the same memory as trained ones. A config comes from one of three places:

- ``architecture`` + ``config`` overrides: ``AutoConfig.for_model(architecture, **overrides)``;
- a local directory holding ``config.json`` (overrides are merged into its contents);
- a hub id: only ``config.json`` is fetched, and only when the hub answers quickly (otherwise
  :class:`~probes.errors.ModelNotFound` says to pass a local path or an architecture).

Remote code (``trust_remote_code``) runs only when the request asks for it *and* the operator allows it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from probes.errors import (
    ModelNotFound,
    ProbeInputError,
    RemoteCodeRefused,
    SequenceTooLong,
    TooManyLayers,
    UnknownArchitecture,
)
from probes.spec import ModelFacts, ModelSpec, Precision
from probes.step_time import ModelShape

try:  # huggingface_hub >= 1.0 validates config fields strictly
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub

    class _StrictDataclassError(Exception):  # type: ignore[no-redef]
        """Stands in for the strict-dataclass error of newer huggingface_hub versions."""


_REJECTED_VALUE: tuple[type[Exception], ...] = (TypeError, ValueError, _StrictDataclassError)
"""What a config raises for an override value it does not accept."""

HUB_CONNECT_TIMEOUT_SECONDS = 3.0
"""How long to wait for the hub's TCP port before saying it is unreachable."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WHERE_INSTEAD = (
    "pass model.name_or_path as a local directory holding config.json, "
    "or model.architecture (e.g. llama) with config overrides"
)


def causal_lm_architectures() -> list[str]:
    """Every model type the installed transformers can build as a causal LM."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def load_config(model: ModelSpec, *, allow_remote_code: bool) -> PretrainedConfig:
    """The config ``model`` names, with its overrides applied.

    Raises :class:`RemoteCodeRefused`, :class:`UnknownArchitecture`, :class:`ModelNotFound` or
    :class:`ProbeInputError` (an override the config does not know, or a value it rejects).
    """
    if model.trust_remote_code and not allow_remote_code:
        raise RemoteCodeRefused(
            "model.trust_remote_code was requested, but this service does not allow remote code; "
            "ask the operator to allow it, or use a built-in architecture"
        )
    trust = model.trust_remote_code and allow_remote_code
    if model.architecture is not None:
        return _config_for_architecture(model.architecture.strip(), model.config)
    assert model.name_or_path is not None  # ModelSpec validates exactly one source
    name = model.name_or_path.strip()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"directory {name!r} holds no config.json; {_WHERE_INSTEAD}")
        config = _from_pretrained(str(path), trust=trust, local_only=True)
        return _with_overrides(config, _raw_config(path / "config.json"), model.config)
    if path.exists() or not _HUB_ID.match(name):
        raise ModelNotFound(
            f"{name!r} is neither a directory holding config.json nor a hub id; {_WHERE_INSTEAD}"
        )
    config = _config_from_hub(name, trust=trust)
    return _with_overrides(config, config.to_diff_dict(), model.config)


def _config_for_architecture(architecture: str, overrides: dict[str, Any]) -> PretrainedConfig:
    known = causal_lm_architectures()
    if architecture not in known or architecture not in CONFIG_MAPPING:
        raise UnknownArchitecture(
            f"unknown causal-LM architecture {architecture!r}; use a transformers model type such as "
            "gpt2, llama, mistral or qwen2",
            known=known,
        )
    _check_override_keys(CONFIG_MAPPING[architecture](), overrides, source=architecture)
    try:
        config: PretrainedConfig = AutoConfig.for_model(architecture, **overrides)
    except _REJECTED_VALUE as exc:
        raise ProbeInputError(f"config overrides rejected by {architecture}: {exc}") from exc
    return config


def _check_override_keys(config: PretrainedConfig, overrides: dict[str, Any], *, source: str) -> None:
    unknown = [key for key in overrides if not _config_knows(config, key)]
    if unknown:
        raise ProbeInputError(
            f"config override(s) {', '.join(repr(k) for k in sorted(unknown))} unknown to {source}'s config"
        )


def _config_knows(config: PretrainedConfig, key: str) -> bool:
    if key in config.attribute_map or key in config.to_dict():
        return True
    try:
        value = getattr(config, key)
    except AttributeError:
        return False
    return not callable(value)


def _raw_config(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        raw = json.load(handle)
    if not isinstance(raw, dict):
        raise ProbeInputError(f"{path} does not hold a JSON object")
    return raw


def _with_overrides(
    config: PretrainedConfig, raw: dict[str, Any], overrides: dict[str, Any]
) -> PretrainedConfig:
    """``config`` rebuilt from ``raw`` + ``overrides``, as if the overrides were written into config.json.

    Rebuilding (rather than setting attributes) lets the config derive its dependent fields from the new
    values, as loading an edited file would.
    """
    if not overrides:
        return config
    _check_override_keys(config, overrides, source=str(raw.get("model_type", type(config).__name__)))
    try:
        rebuilt: PretrainedConfig = type(config).from_dict({**raw, **overrides})
    except _REJECTED_VALUE as exc:
        raise ProbeInputError(f"config overrides rejected: {exc}") from exc
    return rebuilt


def _from_pretrained(name: str, *, trust: bool, local_only: bool) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(
            name, trust_remote_code=trust, local_files_only=local_only
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RemoteCodeRefused(
                f"{name!r} needs remote code (trust_remote_code) to build its config; set "
                "model.trust_remote_code and ask the operator to allow remote code"
            ) from exc
        raise ProbeInputError(f"cannot read the config of {name!r}: {exc}") from exc
    except (TypeError, _StrictDataclassError) as exc:
        raise ProbeInputError(f"cannot read the config of {name!r}: {exc}") from exc
    except OSError as exc:
        raise ModelNotFound(f"no config for {name!r}: {_first_line(exc)}; {_WHERE_INSTEAD}") from exc
    return config


def _config_from_hub(name: str, *, trust: bool) -> PretrainedConfig:
    """``config.json`` of a hub id: from the local cache, else from the hub if it answers at once."""
    try:
        return _from_pretrained(name, trust=trust, local_only=True)
    except ModelNotFound:
        pass
    if hub_offline():
        raise ModelNotFound(f"{name!r} is not in the local cache and the hub is offline; {_WHERE_INSTEAD}")
    if not hub_reachable():
        raise ModelNotFound(
            f"{name!r} is not in the local cache and the hub cannot be reached; {_WHERE_INSTEAD}"
        )
    return _from_pretrained(name, trust=trust, local_only=False)


def hub_offline() -> bool:
    """Whether huggingface_hub was told to stay offline (``HF_HUB_OFFLINE``)."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_SECONDS) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` seconds.

    Behind an HTTPS proxy the endpoint cannot be dialled directly; then the hub client's own
    timeouts decide, and this returns ``True``.
    """
    import huggingface_hub.constants

    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    host = endpoint.hostname
    if host is None:
        return False
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language-model part of a config (the config itself for plain causal LMs)."""
    sub: PretrainedConfig = config.get_text_config()
    return sub


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the config's position embeddings allow, where it states one."""
    for candidate in (config, text_config(config)):
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(candidate, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def vocab_size(config: PretrainedConfig) -> int:
    for candidate in (config, text_config(config)):
        value = getattr(candidate, "vocab_size", None)
        if isinstance(value, int) and value > 0:
            return value
    raise ProbeInputError(f"the {config.model_type} config states no vocab_size")


def architecture_class(config: PretrainedConfig) -> str:
    """The class name ``AutoModelForCausalLM`` builds for ``config``."""
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if isinstance(name, str):
        return name
    auto_map = getattr(config, "auto_map", None) or {}
    remote = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if isinstance(remote, str):
        return remote.rsplit(".", 1)[-1]
    architectures = getattr(config, "architectures", None) or []
    return str(architectures[0]) if architectures else type(config).__name__


MAX_LAYERS = 1024
"""The most decoder layers a probe builds: 8 times the deepest published causal LMs (~126). A trial
builds every layer for real, and the weight count past :data:`FULL_COUNT_MAX_LAYERS` is only a lower
bound: a deep, narrow config (10**6 layers 8 wide) passed that count under a large cap and then held
the probe queue while its trial built layer after layer, until the trial's timeout."""


def inspect_model(model: ModelSpec, seq_len: int, *, allow_remote_code: bool) -> ModelFacts:
    """Validate the request's model against ``seq_len`` and count its parameters (on the meta device).

    The count is :func:`count_weights`'s: exact for configs of up to :data:`FULL_COUNT_MAX_LAYERS`
    layers, a lower bound (the first that many layers) beyond. Raises the errors of
    :func:`load_config`, :class:`SequenceTooLong`, and :class:`TooManyLayers` past :data:`MAX_LAYERS`.
    """
    config = load_config(model, allow_remote_code=allow_remote_code)
    layers = layer_count(config)
    if layers is not None and layers > MAX_LAYERS:
        raise TooManyLayers(
            f"the {config.model_type} config asks for {layers} decoder layers; maxbatch probes models of at "
            f"most {MAX_LAYERS} (a trial builds every layer; the deepest published models have ~126)"
        )
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise SequenceTooLong(
            f"seq_len {seq_len} exceeds the {config.model_type} config's {limit} positions "
            "(override max_position_embeddings / n_positions if the model allows longer sequences)"
        )
    count = count_weights(config, dtype=torch.float32, allow_remote_code=allow_remote_code)
    try:
        shape: ModelShape | None = ModelShape.from_config(config.to_dict(), count.parameters)
    except ValueError:
        shape = None  # no depth or width in the config: no FLOPs estimate
    return ModelFacts(
        model_type=str(config.model_type),
        architecture_class=architecture_class(config),
        parameter_count=count.parameters,
        max_positions=limit,
        vocab_size=vocab_size(config),
        decoder_layer_classes=list(count.layer_classes),
        layers=shape.layers if shape else None,
        hidden_size=shape.hidden_size if shape else None,
        active_parameter_count=shape.active_parameter_count if shape else None,
    )


def meta_model(config: PretrainedConfig, *, allow_remote_code: bool) -> torch.nn.Module:
    """The config's causal LM (fp32) on the meta device: shapes and names, no memory, no values."""
    with torch.device("meta"):
        return _from_config(config, dtype=torch.float32, allow_remote_code=allow_remote_code)


def decoder_layer_classes(model: torch.nn.Module) -> list[str]:
    """The classes the model says must not be split (``_no_split_modules``), present in it.

    These are what Accelerate's transformer wrap policy (and so FSDP) makes one unit each of.
    """
    names = getattr(model, "_no_split_modules", None) or []
    present = {type(module).__name__ for module in model.modules()}
    return [name for name in names if name in present]


FULL_COUNT_MAX_LAYERS = 128
"""Configs with at most this many decoder layers are counted exactly, every layer built on meta.

Building a layer on the meta device costs Python objects and time, not tensor memory: 4-8 ms per
GPT-2 or Llama layer on our 2-core machine, ~35 ms per layer of a 256-expert MoE (a full build of
10**4 GPT-2 layers took 119 s and 0.7 GB). The largest causal LMs published have ~126 layers; a
config asking for more is counted on its first this-many layers (a lower bound, see
:func:`count_weights`)."""

FIRST_LOOK_LAYERS = 8
"""With ``enough_bytes``, the first count builds this many layers: when they alone exceed it, the
answer is known without building more."""


@dataclass(frozen=True)
class WeightCount:
    """What a model's weights take where it is built, counted on the meta device (nothing allocated)."""

    #: distinct parameters (tied weights once)
    parameters: int
    #: their bytes in the dtype they are built in
    parameter_bytes: int
    #: bytes of the buffers the model registers (masks, rotary tables, position ids)
    buffer_bytes: int
    #: decoder layers the config asks for (``None``: it states no ``num_hidden_layers``)
    layers: int | None
    #: how many of them were built to count (equal to ``layers`` when all were)
    layers_built: int | None
    #: the classes not to split (:func:`decoder_layer_classes`) of the model built to count
    layer_classes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.buffer_bytes

    @property
    def exact(self) -> bool:
        """True when every layer was built; otherwise the counts are lower bounds."""
        return self.layers_built == self.layers

    def describe(self) -> str:
        """How it was counted, for a person: ``"counted on the first 8 of 10000 layers"``, or ``""``."""
        if self.exact:
            return ""
        return f"counted on the first {self.layers_built} of {self.layers} layers"


def layer_count(config: PretrainedConfig) -> int | None:
    """The number of decoder layers the (text) config asks for, where it states one."""
    try:
        value = getattr(text_config(config), "num_hidden_layers", None)
    except (NotImplementedError, ValueError):  # e.g. ProphetNet's encoder/decoder counts
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def weight_dtype(precision: Precision) -> torch.dtype:
    """The dtype :func:`build_model` builds the weights in: bfloat16 for ``bf16-true``, else float32."""
    return torch.bfloat16 if precision is Precision.BF16_TRUE else torch.float32


def count_weights(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype,
    allow_remote_code: bool = False,
    enough_bytes: int | None = None,
    max_layers: int = FULL_COUNT_MAX_LAYERS,
) -> WeightCount:
    """The parameters and buffers ``config``'s model has when built in ``dtype``, without allocating.

    The model is built on the meta device (shapes, no storage). When the config asks for more than
    ``max_layers`` decoder layers, only the first ``max_layers`` are built (per-layer lists such as
    ``layer_types`` cut to match): the count is then a *lower bound*, because a model's non-layer
    weights do not depend on the layer count and layer ``i`` is built from the config and ``i``
    alone, so the first ``k`` layers of a model are the ``k``-layer model's layers. (Extrapolating
    from a few layers is not safe: across the installed transformers' causal LMs, hybrid and MoE
    stacks made a linear extrapolation from 1-3 layers up to 1.96x too large.)

    ``enough_bytes``: the caller only needs to know whether the weights exceed it; the first count
    then builds :data:`FIRST_LOOK_LAYERS` layers and stops there when those alone exceed it.
    Raises what building the model raises, and :class:`ProbeInputError` when a config of more than
    ``max_layers`` layers cannot be cut down to count.
    """
    layers = layer_count(config)
    if layers is not None and enough_bytes is not None and layers > FIRST_LOOK_LAYERS:
        first = _count_first_layers(config, dtype, allow_remote_code, layers=layers, keep=FIRST_LOOK_LAYERS)
        if first is not None and first.total_bytes > enough_bytes:
            return first
    if layers is None or layers <= max_layers:
        with torch.device("meta"):
            meta = _from_config(config, dtype=dtype, allow_remote_code=allow_remote_code)
        return _counted(meta, layers=layers, built=layers)
    prefix = _count_first_layers(config, dtype, allow_remote_code, layers=layers, keep=max_layers)
    if prefix is None:
        raise ProbeInputError(
            f"the {config.model_type} config asks for {layers} layers, and its first {max_layers} do not "
            f"build on their own to count the weights; use at most {max_layers} layers"
        )
    return prefix


def _count_first_layers(
    config: PretrainedConfig, dtype: torch.dtype, allow_remote_code: bool, *, layers: int, keep: int
) -> WeightCount | None:
    """The count of the model's first ``keep`` layers, or ``None`` when the cut-down config does not build
    (some configs tie their layer kinds to the layer count, e.g. Gemma 3n's KV-sharing layers)."""
    cut = _first_layers(config, layers, keep)
    with torch.device("meta"):
        try:
            meta = _from_config(cut, dtype=dtype, allow_remote_code=allow_remote_code)
        except RemoteCodeRefused:
            raise
        except Exception:  # noqa: BLE001 - any failure of the cut-down build only means "cannot count so"
            return None
    return _counted(meta, layers=layers, built=keep)


def _counted(meta: torch.nn.Module, *, layers: int | None, built: int | None) -> WeightCount:
    parameters = list(meta.parameters())
    return WeightCount(
        parameters=sum(p.numel() for p in parameters),
        parameter_bytes=sum(p.numel() * p.element_size() for p in parameters),
        buffer_bytes=sum(b.numel() * b.element_size() for b in meta.buffers()),
        layers=layers,
        layers_built=built,
        layer_classes=tuple(decoder_layer_classes(meta)),
    )


def _first_layers(config: PretrainedConfig, layers: int, keep: int) -> PretrainedConfig:
    """``config`` with only its first ``keep`` of ``layers`` decoder layers (per-layer lists cut too)."""
    cut = copy.deepcopy(config)
    inner = text_config(cut)
    for key, value in list(vars(inner).items()):
        if isinstance(value, list | tuple) and len(value) == layers:
            setattr(inner, key, type(value)(value[:keep]))
    inner.num_hidden_layers = keep
    return cut


def _from_config(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype,
    allow_remote_code: bool,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    trust = allow_remote_code and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    extra: dict[str, Any] = {}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        model: torch.nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, trust_remote_code=trust, **extra
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "Unrecognized configuration class" in str(exc):
            raise RemoteCodeRefused(
                f"the {config.model_type} model needs remote code (trust_remote_code), which is not allowed"
            ) from exc
        raise
    return model


def build_model(
    config: PretrainedConfig,
    *,
    precision: Precision,
    gradient_checkpointing: bool,
    device: torch.device | str,
    allow_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """A randomly initialised causal LM on ``device``, in train mode, set up as HF Trainer would.

    ``bf16-true`` builds the weights in bfloat16 (as ``from_pretrained(..., dtype=torch.bfloat16)``
    loads them); every other precision keeps fp32 weights, unless ``dtype`` says otherwise (a QLoRA
    base is loaded in its compute dtype before it is quantised). ``use_cache`` is off (Trainer's
    default for training). Checkpointing uses the model's own switch, non-reentrant, as Trainer turns
    it on.
    ``attn_implementation`` is passed as ``from_pretrained`` takes it (``None``: the model's default).
    """
    config = copy.deepcopy(config)
    config.use_cache = False
    inner = text_config(config)
    if inner is not config:
        inner.use_cache = False
    if dtype is None:
        dtype = weight_dtype(precision)
    with torch.device(device):
        model = _from_config(
            config, dtype=dtype, allow_remote_code=allow_remote_code, attn_implementation=attn_implementation
        )
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation (gradient) checkpointing under whichever name this transformers uses."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers before activation_checkpointing_enable existed
        enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ProbeInputError(f"{type(model).__name__} does not support gradient checkpointing")
    enable()
