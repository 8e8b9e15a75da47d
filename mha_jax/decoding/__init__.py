"""Pieces for decoder models: rotary position embeddings and QK-norm.

Pure functions on one sequence, like the rest of mha_jax (the batch comes from
`jax.vmap`). Legend additions: R = rotated features per head (`RoPE.rotary_dim`,
even, <= Dh); F = R/2 rotation frequencies.

    q = apply_rope(qk_norm(q, q_scale), positions, rope)   # [L, H, Dh]
    k = apply_rope(qk_norm(k, k_scale), positions, rope)   # [L, Hkv, Dh]
"""

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
