"""LoRA and QLoRA: the model a fine-tuning job trains, built as the job's script builds it.

Where it sits in the recipe: it *builds* the model (QLoRA has to: the base is quantised as it is
placed on the device), before the strategy wrapper (DDP / FSDP2) and the optimizer. The interface::

    reason = unavailable_reason(spec, device.info().kind)         # in the child, before building
    if reason is not None: ...                                    # the config is skipped with it
    with device.build_context():
        model = build_finetuning_model(config, spec, precision=…, gradient_checkpointing=…,
                                       device=device.torch_device)
    device.adopt(resident_tensors(model))       # parameters, buffers and 4-bit quantisation state
    ... wrap for the strategy, optimizer over the parameters that require grad, steps ...
    counts = parameter_counts(model)            # trainable / frozen, for the memory floor
    peft_config = peft_config_kwargs(spec, model)                 # LoraConfig(**…), lora and qlora
    quantization = quantization_kwargs(precision)                 # BitsAndBytesConfig(**…), qlora

What is built, per method (``spec``: :class:`~probes.finetuning_spec.FinetuningSpec`):

- ``full``: :func:`probes.models.build_model`, unchanged.
- ``lora``: that model, then ``peft.get_peft_model(model, LoraConfig(**peft_config_kwargs(…)))``
  with task type ``CAUSAL_LM``: the base is frozen (no gradients, no optimizer state), the adapters
  are fp32 (peft's ``autocast_adapter_dtype``) whatever the base dtype.
- ``qlora``: the base is built in the compute dtype (bf16 / fp16 / fp32 by precision), every linear
  layer but the output head (transformers' bitsandbytes quantizer's choice) becomes a
  ``bitsandbytes.nn.Linear4bit`` whose weight is quantised NF4 with double quantisation as it is
  placed on the device (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=…)`` loads it so), then
  ``prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)`` (freezes everything,
  upcasts every unquantised weight to fp32), then LoRA as above. On ``cuda`` the unquantised base is
  built in host memory and each layer is quantised onto the GPU, as ``from_pretrained`` streams a
  checkpoint: the GPU never holds the unquantised model.
- Checkpointing is the model's own switch, non-reentrant (what ``TrainingArguments``
  ``activation_checkpointing=True`` turns on); it makes the embeddings' output require grad so that
  gradients reach the adapters through checkpointed layers of a frozen base, as transformers does
  for peft.

On ``predict`` (fake tensors) two things a real run does cannot run as they are, and are replaced by
what gives the same tensors (``tests/probes/test_finetuning.py`` checks every parameter's name,
dtype, shape and the counted peak against ``simulated``, to the byte):

- ``Module.to`` on fake parameters fails (torch swaps parameters of fake modules, and the fake
  mode's memo holds a weak reference to each); peft moves every new adapter to its base layer's
  device and dtype. While peft builds adapters on fake tensors, ``Module.to`` replaces each
  parameter that changes by a new one instead.
- ``bitsandbytes.nn.Params4bit`` cannot wrap a fake tensor (it is itself a tensor subclass). The
  weight is quantised by the same ``bitsandbytes.functional.quantize_4bit`` and kept as a fake
  parameter that carries ``Params4bit``'s attributes (``quant_state``, ``quant_type``, …), which is
  all ``Linear4bit.forward`` and peft read. bitsandbytes builds its 8-bit code table with
  ``.tolist()``, which fake tensors cannot answer: it is built real and handed to the fake mode.

bitsandbytes' ``gemm_4bit`` (the forward of a 4-bit layer) dequantises the whole weight inside one
custom op, where the counting mode cannot see it; on CUDA it does the same for training-sized inputs
(more than 512 rows: dequantise, then ``F.linear``), and bitsandbytes' CPU kernel always does. The
counting mode is told to run that composite instead (:func:`probes.devices.counting.count_inside`),
so the transient is in the peak on ``simulated`` and ``predict``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal, TypeGuard

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from probes.devices.counting import count_inside
from probes.errors import ProbeInputError
from probes.finetuning_spec import (
    ALL_LINEAR,
    NF4_BLOCKSIZE,
    QLORA_FSDP_REFUSAL,
    FinetuningFacts,
    FinetuningMethod,
    FinetuningSpec,
    LoraTargets,
    ParameterCounts,
    base_dtype_name,
    compute_dtype_name,
    kbit_preparation_kwargs,
)
from probes.finetuning_spec import peft_config_kwargs as _peft_kwargs_for_targets
from probes.models import build_model, meta_model
from probes.oom import one_line
from probes.spec import ConfigTask, Precision

DeviceKind = Literal["cuda", "simulated", "predict"]

_QUIET_DEPRECATIONS = (
    # transformers 5 deprecates the property peft reads to decide whether checkpointing is on
    r"`is_gradient_checkpointing` is deprecated",
)


# --- can it run here ----------------------------------------------------------------------------


def unavailable_reason(
    spec: FinetuningSpec,
    device_kind: DeviceKind,
    *,
    torch_device: torch.device | None = None,
    strategy: str | None = None,
) -> str | None:
    """``None`` when ``spec``'s method can run on this device here, else a sentence saying why not.

    ``lora`` needs peft. ``qlora`` needs peft and bitsandbytes, and a 4-bit NF4 layer is tried
    (quantised, run forward and backward) the way the probe will run it: real CPU tensors on
    ``simulated``, fake tensors on ``predict``, the GPU (``torch_device``, default the current one)
    on ``cuda``. The try is made once per process and device. ``strategy`` ``"fsdp"`` with ``qlora``
    is refused: the probe does not shard 4-bit weights.
    """
    if spec.method is FinetuningMethod.FULL:
        return None
    needed = ["peft"] + (["bitsandbytes"] if spec.quantized else [])
    for package in needed:
        problem = _import_problem(package)
        if problem is not None:
            return f"finetuning {spec.method.value!r} needs {package}, which {problem}"
    if not spec.quantized:
        return None
    if strategy == "fsdp":
        return QLORA_FSDP_REFUSAL
    if device_kind == "cuda":
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        where = str(torch_device or torch.device("cuda", index))
    else:
        where = "cpu"
    failure = _four_bit_failure(device_kind, where)
    if failure is None:
        return None
    import bitsandbytes

    version: str = getattr(bitsandbytes, "__version__", "?")
    what = {"cuda": where, "simulated": "the CPU", "predict": "fake tensors"}[device_kind]
    return f"finetuning 'qlora': bitsandbytes {version} cannot run a 4-bit NF4 layer on {what}: {failure}"


def _import_problem(package: str) -> str | None:
    """Why ``package`` cannot be imported (a clause), or ``None`` when it can."""
    try:
        __import__(package)
    except ModuleNotFoundError as exc:
        if exc.name == package:
            extra = "qlora" if package == "bitsandbytes" else "lora"
            return f"is not installed (pip install 'maxbatch[{extra}]')"
        return f"cannot be imported: {one_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason to skip, not a crash
        return f"cannot be imported: {one_line(exc)}"
    return None


@functools.cache
def _four_bit_failure(device_kind: DeviceKind, where: str) -> str | None:
    """One 4-bit layer quantised, forward and backward, as a probe runs it; the failure, if any."""
    device = torch.device(where)
    mode: AbstractContextManager[object] = FakeTensorMode() if device_kind == "predict" else nullcontext()
    try:
        with mode:
            linear = nn.Linear(128, 64, bias=True, device="cpu" if device_kind == "predict" else device)
            layer = _quantized_linear(linear, compute_dtype=torch.float32, device=device)
            inputs = torch.randn(4, 128, device=device, requires_grad=True)
            layer(inputs).sum().backward()
            if inputs.grad is None:
                return "no gradient reached the layer's input"
    except Exception as exc:  # noqa: BLE001 - whatever stops the layer is the reason
        return one_line(exc)
    return None


# --- building -----------------------------------------------------------------------------------


def build_finetuning_model(
    config: PretrainedConfig,
    spec: FinetuningSpec,
    *,
    precision: Precision,
    gradient_checkpointing: bool,
    device: torch.device | str,
    allow_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The model ``spec`` trains, on ``device``, in train mode; call it inside the device's build context.

    Raises :class:`~probes.errors.ProbeInputError` when ``lora_target_modules`` names no module of
    the model (or one LoRA cannot wrap).
    """
    device = torch.device(device)
    host = torch.device("cpu") if spec.quantized and device.type == "cuda" else device
    model = build_model(
        config,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        device=host,
        allow_remote_code=allow_remote_code,
        dtype=_dtype(base_dtype_name(spec, precision)),
        attn_implementation=attn_implementation,
    )
    if not spec.uses_adapters:
        return model
    if spec.quantized:
        quantize_base(model, compute_dtype=_dtype(compute_dtype_name(precision)), device=device)
        if host != device:
            model.to(device)  # what is not quantised: embeddings, norms, the output head
        import peft

        prepare: Any = peft.prepare_model_for_kbit_training  # untyped in peft
        model = prepare(model, **kbit_preparation_kwargs())
    return apply_lora(model, spec)


def builder(spec: FinetuningSpec) -> Callable[[PretrainedConfig, ConfigTask, torch.device], nn.Module]:
    """A ``probes.trial.ModelBuilder`` that builds the task's model for ``spec``."""

    def build(config: PretrainedConfig, task: ConfigTask, device: torch.device) -> nn.Module:
        return build_finetuning_model(
            config,
            spec,
            precision=task.precision,
            gradient_checkpointing=task.gradient_checkpointing,
            device=device,
            allow_remote_code=task.allow_remote_code,
            attn_implementation=task.attn_implementation.value,
        )

    return build


def apply_lora(model: nn.Module, spec: FinetuningSpec) -> nn.Module:
    """``get_peft_model(model, LoraConfig(**peft_config_kwargs(spec, model)))``: frozen base, fp32 adapters.

    Raises :class:`ProbeInputError` for targets peft cannot wrap.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**peft_config_kwargs(spec, model))
    moves = _fake_module_moves() if _is_fake(model) else nullcontext()
    with moves, warnings.catch_warnings():
        for message in _QUIET_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        try:
            peft_model: nn.Module = get_peft_model(model, config)
        except ValueError as exc:  # peft's word for targets it cannot wrap
            raise ProbeInputError(f"lora_target_modules: {one_line(exc, limit=400)}") from exc
    return peft_model


def quantize_base(model: nn.Module, *, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace the model's linear layers (all but the output head) by 4-bit NF4 layers on ``device``.

    Each weight is quantised as it is placed on ``device`` (bitsandbytes quantises in
    ``Params4bit.to``); the unquantised weight is dropped layer by layer. GPT-2's ``Conv1D`` weights
    are transposed first, as transformers' quantizer does. Sets ``model.is_loaded_in_4bit``, which
    peft reads to pick its 4-bit LoRA layer.
    """
    skipped = _not_quantized(model)
    for name, module in list(model.named_modules()):
        if name in skipped or not _is_plain_linear(module):
            continue
        model.set_submodule(name, _quantized_linear(module, compute_dtype=compute_dtype, device=device))
    model.is_loaded_in_4bit = True  # type: ignore[assignment]  # what from_pretrained sets


def _not_quantized(model: nn.Module) -> set[str]:
    """Module names transformers' bitsandbytes quantizer keeps unquantised: the output head, tied
    weights, and the model's ``_keep_in_fp32_modules``."""
    names: set[str] = set()
    output = _output_head(model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if output is not None and module is output:
            names.add(name)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    for shared in owners.values():
        if len(shared) > 1:
            names.update(shared)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, _ in model.named_modules():
        if any(name == k or name.endswith("." + k) for k in keep):
            names.add(name)
    return names


def _is_plain_linear(module: nn.Module) -> TypeGuard[nn.Linear | Conv1D]:
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def _quantized_linear(
    linear: nn.Linear | Conv1D, *, compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` holding ``linear``'s weight quantised NF4 on ``device``."""
    import bitsandbytes

    bnb_nn: Any = bitsandbytes.nn  # bitsandbytes' classes are untyped
    _count_4bit_matmul_inside()
    weight: torch.Tensor = linear.weight.data
    if isinstance(linear, Conv1D):
        weight = weight.t()  # Conv1D stores (in, out)
    out_features, in_features = weight.shape
    bias: nn.Parameter | None = linear.bias
    with _disable_current_modes():  # a meta placeholder; Params4bit cannot be made under a fake mode
        layer: nn.Module = bnb_nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
            device="meta",
        )
    if isinstance(weight, FakeTensor):
        layer.weight = _fake_4bit_weight(weight, layer)
    else:
        layer.weight = bnb_nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
            module=layer,
        ).to(device)
    if bias is not None:
        layer.bias = bias
    layer.requires_grad_(False)
    return layer


def _fake_4bit_weight(weight: FakeTensor, layer: nn.Module) -> nn.Parameter:
    """What ``Params4bit(weight).to(device)`` holds, as a fake parameter carrying its attributes."""
    import bitsandbytes

    functional: Any = bitsandbytes.functional
    with _fake_code_table(weight.fake_mode):
        packed, state = functional.quantize_4bit(
            weight.contiguous(),
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
        )
    parameter = nn.Parameter(packed, requires_grad=False)
    attributes = {
        "quant_state": state,
        "blocksize": NF4_BLOCKSIZE,
        "compress_statistics": True,
        "quant_type": "nf4",
        "quant_storage": torch.uint8,
        "bnb_quantized": True,
        "module": layer,
    }
    for name, value in attributes.items():
        setattr(parameter, name, value)
    setattr(layer, "quant_state", state)  # noqa: B010 - Linear4bit keeps it too; not a tensor or module
    return parameter


@contextmanager
def _fake_code_table(fake_mode: FakeTensorMode) -> Iterator[None]:
    """bitsandbytes' cached 8-bit code table as a fake tensor while quantising fake weights.

    ``create_dynamic_map`` reads values (``.tolist()``); it is built real and converted. The cache
    entry is restored afterwards, so real quantisation in the same process never meets a fake table.
    """
    import bitsandbytes

    functional: Any = bitsandbytes.functional
    cache: dict[str, torch.Tensor] = functional.name2qmap
    saved = cache.get("dynamic")
    with _disable_current_modes():
        table = functional.create_dynamic_map()
    cache["dynamic"] = fake_mode.from_tensor(table)
    try:
        yield
    finally:
        if saved is None:
            cache.pop("dynamic", None)
        else:
            cache["dynamic"] = saved


@functools.cache
def _count_4bit_matmul_inside() -> None:
    count_inside(torch.ops.bitsandbytes.gemm_4bit.default, _gemm_4bit_dequantize_then_linear)


def _gemm_4bit_dequantize_then_linear(
    inputs: torch.Tensor,
    packed: torch.Tensor,
    shape: list[int],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: torch.Tensor | None = None,
    absmax_8bit: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bitsandbytes::gemm_4bit`` as its kernels run it for training-sized inputs: dequantise, matmul."""
    ops = torch.ops.bitsandbytes
    if absmax_8bit is not None:  # double quantisation: the block scales are themselves 8-bit
        assert absmax_code is not None
        assert absmax_offset is not None
        absmax = ops.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256, torch.float32)
        absmax = absmax + absmax_offset
    weight = ops.dequantize_4bit.default(packed, absmax, blocksize, quant_type, shape, inputs.dtype)
    return torch.nn.functional.linear(inputs, weight, bias)


# --- fake tensors -------------------------------------------------------------------------------


def _is_fake(model: nn.Module) -> bool:
    return any(isinstance(parameter, FakeTensor) for parameter in model.parameters())


@contextmanager
def _fake_module_moves() -> Iterator[None]:
    """``Module.to`` that works on fake parameters: a parameter that changes is replaced, not swapped.

    Only modules whose tensors are all fake take this path; peft moves freshly made adapter modules
    (never tied weights), so replacing their parameters is what swapping them would have done.
    """
    original: Callable[..., nn.Module] = nn.Module.to

    def to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        tensors = [*module.parameters(), *module.buffers()]
        if not tensors or not all(isinstance(t, FakeTensor) for t in tensors):
            return original(module, *args, **kwargs)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, tensor in store.items():
                    if tensor is None:
                        continue
                    cast = dtype if dtype is not None and tensor.is_floating_point() else None
                    moved = tensor.to(device=device, dtype=cast)
                    if moved is tensor:
                        continue
                    if isinstance(tensor, nn.Parameter):
                        moved = nn.Parameter(moved, requires_grad=tensor.requires_grad)
                    store[key] = moved  # type: ignore[assignment]  # a Parameter where one was
        return module

    nn.Module.to = to  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.to = original  # type: ignore[method-assign,assignment]


# --- what the model holds -----------------------------------------------------------------------


def resident_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the model keeps on its device: parameters, buffers, and 4-bit quantisation state.

    A 4-bit weight's block scales, code tables and offset hang off the parameter (``quant_state``),
    not off the module's parameters or buffers: a device that counts what it adopts needs them too.
    """
    tensors = [*model.parameters(), *model.buffers()]
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            tensors.extend(_state_tensors(state))
    return tensors


def _state_tensors(state: object) -> Iterator[torch.Tensor]:
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif type(value) is type(state):  # the nested state of double quantisation
            yield from _state_tensors(value)


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """How many parameters train and how many are frozen, and the bytes each kind keeps resident."""
    trainable = frozen = quantized = 0
    trainable_bytes = frozen_bytes = 0
    seen: set[int] = set()

    def storage_bytes(tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in seen:
            return 0
        seen.add(key)
        return int(storage.nbytes())

    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        if parameter.requires_grad:
            trainable += parameter.numel()
            trainable_bytes += storage_bytes(parameter)
            continue
        if state is not None:
            count = int(torch.Size(state.shape).numel())
            quantized += count
            frozen += count
            frozen_bytes += storage_bytes(parameter) + sum(storage_bytes(t) for t in _state_tensors(state))
        else:
            frozen += parameter.numel()
            frozen_bytes += storage_bytes(parameter)
    buffer_bytes = sum(storage_bytes(buffer) for buffer in model.buffers())
    return ParameterCounts(
        trainable_parameters=trainable,
        frozen_parameters=frozen,
        quantized_parameters=quantized,
        trainable_bytes=trainable_bytes,
        frozen_bytes=frozen_bytes,
        buffer_bytes=buffer_bytes,
    )


# --- what the recommendation emits ---------------------------------------------------------------


def peft_config_kwargs(spec: FinetuningSpec, model: nn.Module) -> dict[str, Any]:
    """``peft.LoraConfig`` keyword arguments for ``model`` (before or after ``get_peft_model``)."""
    return _peft_kwargs_for_targets(spec, lora_targets(model, spec))


def describe(
    config: PretrainedConfig, spec: FinetuningSpec, *, allow_remote_code: bool = False
) -> FinetuningFacts:
    """The ``LoraConfig`` arguments and the parameter counts of ``spec``'s model, from the model and
    its adapters on the meta device (no memory, no values: seconds for an 8B model).

    QLoRA's adapters sit on the same modules (the quantizer replaces every linear layer but the
    output head, as ``"all-linear"`` selects them), but its 4-bit layers are ``nn.Linear``: GPT-2's
    ``Conv1D`` layers no longer need ``fan_in_fan_out``.
    """
    model = meta_model(config, allow_remote_code=allow_remote_code)
    targets = lora_targets(model, spec)
    if spec.quantized:
        targets = targets.model_copy(update={"fan_in_fan_out": False})
    adapted = apply_lora(model, spec)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in adapted.parameters() if not p.requires_grad)
    return FinetuningFacts(
        peft_config=_peft_kwargs_for_targets(spec, targets),
        trainable_parameters=trainable,
        frozen_parameters=frozen,
    )


def lora_targets(model: nn.Module, spec: FinetuningSpec) -> LoraTargets:
    """The modules ``spec.lora_target_modules`` selects in ``model``, as names peft matches.

    ``"all-linear"`` is peft's rule written out: every ``nn.Linear`` (bitsandbytes' 4-bit layer is
    one) and ``Conv1D`` but the output head; the names are the layers' last path components where
    those select exactly the same modules, else their full paths. Names given by the user are
    checked to select at least one module each. Raises :class:`ProbeInputError` otherwise.
    """
    modules = _modules(model)
    if spec.lora_target_modules == ALL_LINEAR:
        head = _output_head_name(model)
        linear = {name: kind for name, kind in modules.items() if _is_linear_kind(kind) and name != head}
        if not linear:
            raise ProbeInputError(
                f"{type(model).__name__} has no linear layer for lora_target_modules 'all-linear'"
            )
        short = sorted({name.rsplit(".", 1)[-1] for name in linear})
        chosen = short if _selected(short, modules) == set(linear) else sorted(linear)
        return _targets(chosen, {name: modules[name] for name in linear})
    names = list(spec.lora_target_modules)
    selected: dict[str, type[nn.Module]] = {}
    for target in names:
        hits = _selected([target], modules)
        if not hits:
            linear_names = sorted({n.rsplit(".", 1)[-1] for n, k in modules.items() if _is_linear_kind(k)})
            raise ProbeInputError(
                f"lora_target_modules: {target!r} names no module of {type(_base(model)).__name__}; "
                f"its linear layers are: {', '.join(linear_names)}"
            )
        selected.update({name: modules[name] for name in hits})
    return _targets(names, selected)


def _targets(names: list[str], modules: dict[str, type[nn.Module]]) -> LoraTargets:
    conv1d = [issubclass(kind, Conv1D) for kind in modules.values()]
    return LoraTargets(target_modules=tuple(names), fan_in_fan_out=all(conv1d), module_count=len(modules))


def _selected(targets: list[str], modules: dict[str, type[nn.Module]]) -> set[str]:
    """The module paths peft's list matching selects: the path is a name or ends in ``.name``."""
    return {path for path in modules if any(path == t or path.endswith("." + t) for t in targets)}


def _is_linear_kind(kind: type[nn.Module]) -> bool:
    return issubclass(kind, nn.Linear | Conv1D)


def _base(model: nn.Module) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and getattr(model, "peft_config", None) is not None:
        base: nn.Module = get_base_model()
        return base
    return model


def _modules(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Module path -> the kind of layer it is; an adapter-wrapped layer counts as its base layer,
    and the adapters' own modules are left out."""
    model = _base(model)
    kinds: dict[str, type[nn.Module]] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        get_base_layer = getattr(module, "get_base_layer", None)
        if callable(get_base_layer) and hasattr(module, "lora_A"):
            wrapped.append(name)
            kinds[name] = type(get_base_layer())
        else:
            kinds[name] = type(module)
    return kinds


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embeddings (the LM head), where it has the method that names them."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if not callable(get_output_embeddings):
        return None
    head = get_output_embeddings()
    return head if isinstance(head, nn.Module) else None


def _output_head_name(model: nn.Module) -> str | None:
    model = _base(model)
    head = _output_head(model)
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head or getattr(module, "base_layer", None) is head:
            return str(name)
    return None


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype
