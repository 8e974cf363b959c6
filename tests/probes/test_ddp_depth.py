"""The full model's gradient order from the base depths' (``probes.ddp_depth``), without a model."""

from __future__ import annotations

import pytest

from probes.ddp_depth import extrapolate_ready_order, full_ready_order
from probes.depth import DepthMismatch

STACK = "base_model.model.model.layers"
BLOCK = (
    "mlp.down_proj.lora_B.default.weight",
    "mlp.down_proj.lora_A.default.weight",
    "self_attn.q_proj.weight",
)


def order(depth: int, *, swap_in_layer: int | None = None) -> list[str]:
    names = ["lm_head.weight", "model.norm.weight"]
    for layer in range(depth - 1, -1, -1):
        block = list(BLOCK)
        if layer == swap_in_layer:
            block.reverse()
        names += [f"{STACK}.{layer}.{rest}" for rest in block]
    return [*names, "model.embed_tokens.weight"]


def test_the_layers_blocks_repeat_down_to_the_first_layer() -> None:
    bases = {depth: order(depth) for depth in (3, 4, 5)}
    assert list(extrapolate_ready_order(bases, 32)) == order(32)


@pytest.mark.parametrize(
    ("bases", "message"),
    [
        ({3: order(3, swap_in_layer=1), 4: order(4), 5: order(5)}, "one repeated order"),
        ({3: order(3), 4: order(4)[:-1], 5: order(5)}, "differ beyond their layers"),
        ({3: [*order(3)[:2], *order(3)[5:8], *order(3)[2:5], *order(3)[8:]]}, "whole layer after another"),
        ({3: [*order(3), f"{STACK}.0.late.weight"]}, "after a name outside"),
    ],
)
def test_orders_that_are_not_one_block_per_layer_are_refused(
    bases: dict[int, list[str]], message: str
) -> None:
    with pytest.raises(DepthMismatch, match=message):
        extrapolate_ready_order(bases, 32)


def test_no_rebuild_anywhere_needs_no_order_and_a_partial_one_is_refused() -> None:
    assert full_ready_order({3: None, 4: None, 5: None}, (3, 4, 5), 32) is None
    with pytest.raises(DepthMismatch, match="some base depths and not at others"):
        full_ready_order({3: order(3), 4: None, 5: order(5)}, (3, 4, 5), 32)
    with pytest.raises(DepthMismatch, match="reported no gradient order"):
        full_ready_order({3: order(3), 4: order(4)}, (3, 4, 5), 32)
    assert full_ready_order({d: order(d) for d in (3, 4, 5)}, (3, 4, 5), 8) == tuple(order(8))
