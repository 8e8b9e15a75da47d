"""The reference kernel: the chapter's stages, `[H, Lq, Lk]` scores in memory.

    scores  = softcap(q kᵀ · scale) (+ bias) [H, Lq, Lk]  float32
    weights = softmax(scores, where=visible) [H, Lq, Lk]  float32, hidden entries exactly 0
    heads   = dropout(weights) · v           [Lq, H, Dh]

The spec every other kernel is tested against; it supports every option
(dropout, returning the weights) at O(L²) memory.
"""

from __future__ import annotations

import jax.numpy as jnp

from mha_jax import masks
from mha_jax.kernels.request import Request
from mha_jax.stages import (
    apply_weights,
    attention_scores,
    attention_weights,
    dropout_weights,
    soft_cap,
)


def cannot(request: Request) -> list[str]:
    return []


def run(q, k, v, *, mask, bias, structure, options, rng):
    """`[Lq, H, Dh], [Lk, Hkv, Dh] x2 -> (heads [Lq, H, Dh], weights [H, Lq, Lk])`."""
    length_q, length_k = q.shape[0], k.shape[0]
    if not structure.is_trivial:
        rules = structure.allows(jnp.arange(length_q), jnp.arange(length_k))  # [Lq, Lk]
        mask = masks.combine(mask, rules)
    scores = soft_cap(attention_scores(q, k, options.scale), options.softcap)  # [H, Lq, Lk] float32
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    weights = attention_weights(scores, mask).astype(v.dtype)  # [H, Lq, Lk]
    rate = options.dropout_rate
    kept = weights if rate == 0.0 else dropout_weights(weights, rate, rng)
    heads = apply_weights(kept, v)  # [Lq, H, Dh]
    return heads, weights
