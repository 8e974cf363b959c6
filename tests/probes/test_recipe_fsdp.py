"""FSDP2 as Accelerate applies it, on the fake process group, counted like a real rank."""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import AutoConfig, AutoModelForCausalLM

from probes.devices.counting import CountingMode
from probes.recipe.fsdp import wrap_fsdp
from probes.recipe.optimizers import make_optimizer
from probes.recipe.world import World
from probes.spec import Optimizer, Precision
from tests.probes.test_predict import DECODER, TINY

MODELS = {
    "llama-untied": ("llama", {**DECODER, "tie_word_embeddings": False}),
    "llama-tied": ("llama", {**DECODER, "tie_word_embeddings": True}),
    "gpt2": ("gpt2", TINY["gpt2"]),
}


@pytest.fixture
def world() -> Iterator[World]:
    opened = World(2)
    yield opened
    opened.close()


def _model(name: str) -> torch.nn.Module:
    architecture, config = MODELS[name]
    torch.manual_seed(0)
    built = AutoConfig.for_model(architecture, **config)
    built.use_cache = False
    model: torch.nn.Module = AutoModelForCausalLM.from_config(built)  # type: ignore[no-untyped-call]
    return model


def _units(model: torch.nn.Module) -> list[tuple[str, bool | None, str, tuple[str, ...]]]:
    """Per FSDP unit: name, reshard after forward, policy, parameters it manages (canonical names)."""
    names = {id(p): n.replace("._checkpoint_wrapped_module", "") for n, p in model.named_parameters()}
    units: list[tuple[str, bool | None, str, tuple[str, ...]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None:
            units.append((name, None, "", ()))
            continue
        params = tuple(sorted(names[id(p.sharded_param)] for p in group.fsdp_params))
        units.append(
            (
                name.replace("._checkpoint_wrapped_module", ""),
                group.post_forward_mesh_info is not None,
                str(group.mp_policy),
                params,
            )
        )
    return units


def _accelerate(name: str, precision: Precision, checkpointing: bool) -> torch.nn.Module:
    """Accelerate's own FSDP2 preparation, with the plugin TrainingArguments(fsdp=True, ...) builds."""
    from accelerate.utils import FullyShardedDataParallelPlugin  # type: ignore[import-untyped]
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model  # type: ignore[import-untyped]

    model = _model(name)
    mixed = {Precision.BF16_MIXED: "bf16", Precision.FP16_MIXED: "fp16"}.get(precision, "no")
    layer = "GPT2Block" if name == "gpt2" else "LlamaDecoderLayer"
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[layer],
        activation_checkpointing=checkpointing,
        cpu_ram_efficient_loading=False,
    )
    if mixed != "no":
        plugin.set_mixed_precision(mixed)
    accelerator: Any = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=mixed,
        is_main_process=True,
        device=torch.device("cpu"),
        torch_device_mesh=None,
        parallelism_config=None,
    )
    if checkpointing:
        model = fsdp2_apply_ac(accelerator, model)
    prepared: torch.nn.Module = fsdp2_prepare_model(accelerator, model)
    return prepared


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    ("precision", "checkpointing"),
    [
        (Precision.FP32, False),
        (Precision.BF16_MIXED, True),
        (Precision.FP16_MIXED, False),
        (Precision.BF16_TRUE, True),
    ],
)
def test_the_units_are_accelerates(
    world: World, name: str, precision: Precision, checkpointing: bool
) -> None:
    ours = wrap_fsdp(_model(name), precision=precision, checkpointing=checkpointing, mesh=world.mesh)
    theirs = _accelerate(name, precision, checkpointing)
    assert _units(ours) == _units(theirs)
    assert len(_units(ours)) >= 4  # layers, tail, root (and the embedding when untied)


def _sharded_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = itertools.chain(
        (p._local_tensor for p in model.parameters()),  # type: ignore[attr-defined]
        (
            getattr(v, "_local_tensor", v)
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ),
    )
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_between_steps_a_rank_holds_its_shards_and_nothing_unsharded(world: World) -> None:
    """The counting follows DTensor shards and FSDP2's ``storage.resize_``: at rest, live = shards."""
    model = _model("llama-untied")
    mode = CountingMode(granularity_bytes=1)
    with mode:
        wrap_fsdp(model, precision=Precision.FP32, checkpointing=False, mesh=world.mesh)
    mode.register(list(model.buffers()))
    optimizer = make_optimizer(Optimizer.ADAMW_TORCH, model)
    ids = torch.randint(0, 1000, (2, 16))
    with mode:
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    assert mode.live_bytes == _sharded_bytes(model, optimizer) + buffers
    # Half of (weights + two AdamW moments) on each of 2 ranks; the unsharded copies (another 1.0x)
    # would be counted forever if storage resizes went unseen.
    full = sum(p.numel() * 4 for p in _model("llama-untied").parameters())
    assert 1.5 * full <= mode.live_bytes < 1.6 * full


@pytest.mark.parametrize("optimizer", [Optimizer.ADAFACTOR, Optimizer.ADAMW_BNB_8BIT])
def test_adafactor_and_bnb_fail_on_fsdp2_shards(world: World, optimizer: Optimizer) -> None:
    """Why fsdp with these optimizers is skipped: their first step fails on DTensor shards."""
    pytest.importorskip("bitsandbytes")
    model = wrap_fsdp(_model("llama-untied"), precision=Precision.FP32, checkpointing=False, mesh=world.mesh)
    built = make_optimizer(optimizer, model)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(
        RuntimeError, match=r"mixed torch\.Tensor and DTensor|does not have a sharding strategy"
    ):
        built.step()


def test_world_uses_an_existing_group_and_leaves_it_open() -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        world = World(4)
        assert world.fake
        world.close()
        assert dist.is_initialized()
        with pytest.raises(RuntimeError, match="4 ranks exists"):
            World(2)
    finally:
        dist.destroy_process_group()
