"""Pieces for decoder models: rotary position embeddings and QK-norm.

Pure functions on one sequence, like the rest of mha_jax (the batch comes from
`jax.vmap`). Legend additions: R = rotated features per head (`RoPE.rotary_dim`,
even, <= Dh); F = R/2 rotation frequencies.

    q = apply_rope(qk_norm(q, q_scale), positions, rope)   # [L, H, Dh]
    k = apply_rope(qk_norm(k, k_scale), positions, rope)   # [L, Hkv, Dh]
"""

from mha_jax.decoding.cache import KVCache, init_cache
from mha_jax.decoding.qk_norm import qk_norm, rms_norm
from mha_jax.decoding.rope import (
    HF_ROPE_TYPES,
    LAYOUTS,
    LinearScaling,
    Llama3Scaling,
    RoPE,
    Scaling,
    apply_rope,
    interleaved_to_half,
    inverse_frequencies,
    scaling_from_hf,
)

__all__ = [
    "KVCache",
    "cached_attention",
    "init_cache",
    "HF_ROPE_TYPES",
    "LAYOUTS",
    "LinearScaling",
    "Llama3Scaling",
    "RoPE",
    "Scaling",
    "apply_rope",
    "interleaved_to_half",
    "inverse_frequencies",
    "qk_norm",
    "rms_norm",
    "scaling_from_hf",
]


def __getattr__(name: str):
    # The cached call builds on mha_jax.core, which imports this package's RoPE and
    # QK-norm: it is loaded on first use, so that importing either never cycles.
    if name == "cached_attention":
        from mha_jax.decoding.step import cached_attention

        return cached_attention
    raise AttributeError(f"module 'mha_jax.decoding' has no attribute {name!r}")
