"""Tiny configs (2 layers, 64 wide, vocabulary 1000) of the decoder families people fine-tune.

Each builds offline from ``AutoConfig.for_model(model_type, **overrides)``. The token ids are
moved into the small vocabulary (several configs default them to ids of the real one); sliding
windows are shorter than the tests' sequences (32), so sliding layers differ from full ones.
"""

from __future__ import annotations

from typing import Any

DECODER: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
"""Llama-style keys shared by most families."""

GPT2: dict[str, Any] = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "vocab_size": 1000,
    "n_positions": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

_HEAD_DIM = {"head_dim": 16}
_MOE = {"num_experts_per_tok": 2}

FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": GPT2,
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "qwen3": {**DECODER, **_HEAD_DIM},
    "gemma": {**DECODER, **_HEAD_DIM},
    "gemma2": {**DECODER, **_HEAD_DIM, "sliding_window": 16},
    "gemma3_text": {**DECODER, **_HEAD_DIM, "sliding_window": 16},
    "phi3": DECODER,
    "phi": DECODER,
    "olmo2": DECODER,
    "granite": DECODER,
    "stablelm": DECODER,
    "starcoder2": DECODER,
    "cohere": DECODER,
    "smollm3": DECODER,
    "gpt_neox": {key: value for key, value in DECODER.items() if key != "num_key_value_heads"},
    "falcon": {
        **{
            key: value
            for key, value in DECODER.items()
            if key not in ("num_key_value_heads", "intermediate_size")
        },
        "num_kv_heads": 2,
        "new_decoder_architecture": True,
    },
    "mixtral": {**DECODER, **_MOE, "num_local_experts": 4},
    "qwen3_moe": {**DECODER, **_MOE, "num_experts": 4, "moe_intermediate_size": 64},
    "qwen2_moe": {
        **DECODER,
        **_MOE,
        "num_experts": 4,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
    },
}
"""model type -> config overrides of a 2-layer model."""

MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")

DEPTH_KEY = {"gpt2": "n_layer"}
"""The layer-count key where it is not ``num_hidden_layers``."""

EAGER_ONLY = frozenset({"gemma2"})
"""Families transformers builds without an SDPA path ("does not support an attention implementation
through torch.nn.functional.scaled_dot_product_attention yet"): they run with ``eager``."""


def attn_implementation(model_type: str) -> str:
    """The attention kernel a family's tiny model is probed with: ``sdpa`` (the default) where it exists."""
    return "eager" if model_type in EAGER_ONLY else "sdpa"


def tiny(model_type: str, *, layers: int | None = None) -> dict[str, Any]:
    """The tiny overrides of ``model_type``, optionally ``layers`` deep."""
    overrides = dict(FAMILIES[model_type])
    if layers is not None:
        overrides[DEPTH_KEY.get(model_type, "num_hidden_layers")] = layers
    return overrides
