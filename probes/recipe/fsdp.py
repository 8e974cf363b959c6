"""FSDP2 as Accelerate 1.15 applies it for ``fsdp_version: 2`` (``fsdp2_prepare_model``).

What HF Trainer gets from ``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``:

1. activation checkpointing, when ``fsdp_config["activation_checkpointing"]`` is set: each decoder
   layer is replaced by ``checkpoint_wrapper(layer, preserve_rng_state=False)`` (non-reentrant),
   before sharding; the model's own gradient checkpointing stays off;
2. ``fully_shard`` on every module the transformer wrap policy matches — the classes in the model's
   ``_no_split_modules`` (one unit per decoder layer) — with ``reshard_after_forward=True``;
3. the input embedding in its own unit (when it is not tied to the output embedding);
4. the "tail" — the final norm and the output embedding (and the input embedding when tied) — as
   one unit with ``reshard_after_forward=False``;
5. ``fully_shard`` on the root, with torch's default ``reshard_after_forward`` (``False`` for the
   root).

Every unit gets the mixed-precision policy Accelerate sets for the precision
(``FullyShardedDataParallelPlugin.set_mixed_precision``): ``param_dtype``, ``reduce_dtype`` and
``output_dtype`` all bf16 for ``bf16-mixed`` (fp16 for ``16-mixed``); no policy for ``32-true`` and
``bf16-true``. Accelerate applies no autocast under FSDP2: the policy casts the parameters.

Gradient accumulation as Accelerate does it for FSDP2: ``set_requires_gradient_sync(False)`` on
every micro-step but the last, so the *unsharded* gradients accumulate on every rank until the last
micro-step's reduce-scatter — a different memory picture from DDP's ``no_sync``. With Accelerate's
``sync_each_batch`` (the request's field of that name) every micro-step reduce-scatters and FSDP2
adds the result to the sharded gradients, so no unsharded gradient outlives its micro-step.

``tests/probes/test_recipe_fsdp.py`` applies Accelerate's own ``fsdp2_prepare_model`` to the same
model and compares the units, their flags and policies with ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from probes.spec import Precision

_POLICY_DTYPE: dict[Precision, torch.dtype] = {
    Precision.BF16_MIXED: torch.bfloat16,
    Precision.FP16_MIXED: torch.float16,
}


def mixed_precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    dtype = _POLICY_DTYPE.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)


def layer_classes(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The classes named in ``_no_split_modules`` that occur in ``model``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: dict[str, type[torch.nn.Module]] = {}
    for module in model.modules():
        inner = getattr(module, "_checkpoint_wrapped_module", module)
        if type(inner).__name__ in names:
            found[type(inner).__name__] = type(inner)
    return tuple(found.values())


def _is_layer(module: torch.nn.Module, classes: tuple[type[torch.nn.Module], ...]) -> bool:
    return bool(classes) and isinstance(getattr(module, "_checkpoint_wrapped_module", module), classes)


def _bottom_up(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Named modules, children before parents, the root last (Accelerate's order)."""
    ordered: list[tuple[str, torch.nn.Module]] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)
        ordered.append((prefix, module))

    visit("", model)
    return ordered


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The last direct child of the base model whose class name says ``Norm`` (Accelerate's rule)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    if not isinstance(base, torch.nn.Module):
        return None
    norm = None
    for _, child in base.named_children():
        if "Norm" in type(child).__name__:
            norm = child
    return norm


def wrap_fsdp(
    model: torch.nn.Module, *, precision: Precision, checkpointing: bool, mesh: DeviceMesh | None = None
) -> torch.nn.Module:
    """Shard ``model`` in place over ``mesh`` (default: the default process group), as Accelerate does."""
    classes = layer_classes(model)
    if checkpointing:
        for name, module in _bottom_up(model)[:-1]:
            if _is_layer(module, classes):
                model.set_submodule(name, checkpoint_wrapper(module, preserve_rng_state=False))
    policy = mixed_precision_policy(precision)
    for _, module in _bottom_up(model)[:-1]:
        if _is_layer(module, classes) and not isinstance(module, FSDPModule):
            fully_shard(module, reshard_after_forward=True, mp_policy=policy, mesh=mesh)
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    input_embed = get_input() if callable(get_input) else None
    output_embed = get_output() if callable(get_output) else None
    input_weight = getattr(input_embed, "weight", None)
    tied = input_weight is not None and input_weight is getattr(output_embed, "weight", None)
    if not tied and isinstance(input_embed, torch.nn.Module) and not isinstance(input_embed, FSDPModule):
        fully_shard(input_embed, reshard_after_forward=True, mp_policy=policy, mesh=mesh)
    norm = _final_norm(model)
    candidates = (norm, input_embed, output_embed) if tied else (norm, output_embed)
    tail = [m for m in candidates if isinstance(m, torch.nn.Module) and not isinstance(m, FSDPModule)]
    if tail:
        fully_shard(tail, reshard_after_forward=False, mp_policy=policy, mesh=mesh)
    if not isinstance(model, FSDPModule):
        fully_shard(model, mp_policy=policy, mesh=mesh)
    return model


@contextmanager
def fsdp_micro_step(model: torch.nn.Module, index: int, count: int) -> Iterator[None]:
    """``set_requires_gradient_sync(False)`` on every micro-step but the last (Accelerate's ``no_sync``)."""
    if index >= count - 1 or not isinstance(model, FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
