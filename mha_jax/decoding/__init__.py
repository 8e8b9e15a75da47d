"""Decoding: a KV cache, and one call for prefill and decode against it.

    cache = init_cache(batch, capacity, num_kv_heads, head_dim)     # KVCache(k, v, length)
    out, cache = cached_attention(params, x [B, T, D], cache, num_heads=H)

RoPE and QK-norm, which every call runs (not only decoding), live in `mha_jax.rope` and
`mha_jax.qk_norm`; they are re-exported here, where decoder models look for them.
Legend additions: S = cache capacity (slots); T = new tokens per step; R = rotated
features per head (`RoPE.rotary_dim`, even, <= Dh); F = R/2 rotation frequencies.
"""

from mha_jax.decoding.cache import KVCache, init_cache
from mha_jax.decoding.step import cached_attention
from mha_jax.qk_norm import qk_norm, rms_norm
from mha_jax.rope import (
    HF_ROPE_TYPES,
    LAYOUTS,
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    RoPE,
    Scaling,
    YarnScaling,
    apply_rope,
    interleaved_to_half,
    inverse_frequencies,
    scaling_from_hf,
)

__all__ = [
    "KVCache",
    "cached_attention",
    "init_cache",
    "DynamicNTKScaling",
    "HF_ROPE_TYPES",
    "LAYOUTS",
    "LinearScaling",
    "Llama3Scaling",
    "RoPE",
    "Scaling",
    "YarnScaling",
    "apply_rope",
    "interleaved_to_half",
    "inverse_frequencies",
    "qk_norm",
    "rms_norm",
    "scaling_from_hf",
]
