"""HF ``optim`` names to the optimizer HF Trainer builds (transformers 5.24, ``trainer_optimizer.py``).

Trainer's ``create_optimizer`` puts the trainable parameters in two groups (weight decay / none: biases
and norm weights), and ``get_optimizer_cls_and_kwargs`` picks the class and options:

============================  ====================================================================
``adamw_torch``               ``torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8)``
``adamw_torch_fused``         the same with ``fused=True``
``adafactor``                 ``transformers.optimization.Adafactor(lr, scale_parameter=False,
                              relative_step=False)``
``sgd``                       ``torch.optim.SGD(lr)`` (no momentum: no state)
``adamw_bnb_8bit``            ``bitsandbytes.optim.AdamW(lr, betas, eps, optim_bits=8,
                              is_paged=False)``; every ``nn.Embedding`` weight registered for
                              32-bit state with bitsandbytes' ``GlobalOptimManager``
============================  ====================================================================

Where torch leaves ``foreach`` to the device (``adamw_torch``, ``sgd``), the trial passes
``foreach=True``: CUDA's default, whose temporaries for a whole parameter group at once set the
peak of a step; the CPU would loop per tensor. The learning rate is 0: memory does not depend on
it, and the weights stay as built, so every trial sees the same model.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from probes.spec import Optimizer

ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
"""``TrainingArguments``' defaults."""

_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
"""``Trainer.get_decay_parameter_names``' patterns."""


def keeps_state(name: Optimizer) -> bool:
    """Whether the optimizer creates state in its first ``step()`` (every one but momentum-less SGD)."""
    return name is not Optimizer.SGD


def parameter_groups(model: torch.nn.Module) -> list[dict[str, object]]:
    """Trainer's two groups: weight decay (0.0 by default) for most weights, none for biases and norms."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], list(_NO_DECAY_PATTERNS)))  # type: ignore[no-untyped-call]
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in named if name in decay], "weight_decay": 0.0},
        {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0},
    ]


def make_optimizer(name: Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer over ``model``'s trainable parameters, as Trainer builds it for ``name``."""
    groups = [group for group in parameter_groups(model) if group["params"]]
    if name is Optimizer.ADAMW_TORCH:
        return torch.optim.AdamW(groups, lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPSILON, foreach=True)
    if name is Optimizer.ADAMW_TORCH_FUSED:
        return torch.optim.AdamW(groups, lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPSILON, fused=True)
    if name is Optimizer.ADAFACTOR:
        from transformers.optimization import Adafactor

        adafactor: torch.optim.Optimizer = Adafactor(  # type: ignore[no-untyped-call]
            groups, lr=0.0, scale_parameter=False, relative_step=False
        )
        return adafactor
    if name is Optimizer.SGD:
        return torch.optim.SGD(groups, lr=0.0, foreach=True)
    if name is Optimizer.ADAMW_BNB_8BIT:
        return _bitsandbytes_adamw(groups, model)
    raise ValueError(f"no optimizer for {name!r}")


def _bitsandbytes_adamw(groups: list[dict[str, object]], model: torch.nn.Module) -> torch.optim.Optimizer:
    import bitsandbytes

    optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW(  # type: ignore[attr-defined, no-untyped-call]
        groups, lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPSILON, optim_bits=8, is_paged=False
    )
    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()  # type: ignore[attr-defined, no-untyped-call]
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def optimizer_constants(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Tensors an optimizer makes when it is built and keeps (bitsandbytes' quantisation maps).

    They are made outside the counted step (bitsandbytes computes them from values, which fake
    tensors do not have); the trial counts them like parameters. On fake tensors they are replaced by
    fake copies so that the step can use them.
    """
    maps = getattr(optimizer, "name2qmap", None)
    if not isinstance(maps, dict):
        return []
    fake_mode = _fake_mode_of(optimizer)
    if fake_mode is not None:
        for key, value in list(maps.items()):
            maps[key] = fake_mode.from_tensor(value)
    return [value for value in maps.values() if isinstance(value, torch.Tensor)]


def _fake_mode_of(optimizer: torch.optim.Optimizer) -> FakeTensorMode | None:
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            local = getattr(parameter, "_local_tensor", parameter)
            if isinstance(local, FakeTensor):
                mode: FakeTensorMode = local.fake_mode
                return mode
    return None
