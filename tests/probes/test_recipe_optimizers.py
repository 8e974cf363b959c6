"""The optimizer a trial builds is the one HF Trainer builds for the same ``optim`` name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from probes.recipe.optimizers import make_optimizer, parameter_groups
from probes.spec import Optimizer


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama",
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    built: torch.nn.Module = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return built


@pytest.mark.parametrize("name", list(Optimizer))
def test_class_and_options_are_trainers(model: torch.nn.Module, name: Optimizer, tmp_path: object) -> None:
    if name is Optimizer.ADAMW_BNB_8BIT:
        pytest.importorskip("bitsandbytes")
    args = TrainingArguments(output_dir=str(tmp_path), optim=name.value, use_cpu=True, report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)  # type: ignore[arg-type]
    ours = make_optimizer(name, model)
    assert type(ours) is cls
    # bitsandbytes keeps optim_bits on its args and is_paged on the optimizer, not in the defaults
    defaults = dict(ours.defaults)
    if hasattr(ours, "args"):
        defaults.update(vars(ours.args), is_paged=getattr(ours, "is_paged", None))
    for key, value in kwargs.items():
        if key == "lr":
            continue  # the trial steps with lr 0: memory does not depend on it
        assert defaults[key] == (tuple(value) if isinstance(value, list) else value), key
    if name in (Optimizer.ADAMW_TORCH, Optimizer.SGD):
        assert defaults["foreach"] is True  # CUDA's default, which the trial emulates


def test_groups_are_trainers(model: torch.nn.Module, tmp_path: object) -> None:
    trainer = Trainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    )
    decay = set(trainer.get_decay_parameter_names(model))
    ours = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in ours[0]["params"]} == decay  # type: ignore[attr-defined]
    assert {names[id(p)] for p in ours[1]["params"]} == set(names.values()) - decay  # type: ignore[attr-defined]
