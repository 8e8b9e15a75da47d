"""The reference kernel: the chapter's stages, `[H, Lq, Lk]` scores in memory.

    scores  = score_mod(softcap(q kᵀ · scale) (+ ALiBi)) (+ bias) [H, Lq, Lk]  float32
    weights = softmax(scores, where=visible) [H, Lq, Lk]  float32, hidden entries exactly 0
    heads   = dropout(weights) · v           [Lq, H, Dh]

With sinks, each head's logit `sinks[h]` joins every row's softmax as one more
always-visible column with no value: the weights of the keys then sum to less
than 1 (a row with no visible key gives zeros: the sink takes all the mass).

The spec every other kernel is tested against; it supports every option
(dropout, returning the weights) at O(L²) memory.
"""

from __future__ import annotations

import jax.numpy as jnp

from mha_jax import alibi, masks, score_mod
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


def run(q, k, v, *, mask, bias, structure, options, rng, sinks=None):
    """`[Lq, H, Dh], [Lk, Hkv, Dh] x2 -> (heads [Lq, H, Dh], weights [H, Lq, Lk])`."""
    length_q, length_k = q.shape[0], k.shape[0]
    if not structure.is_trivial:
        heads = structure.head_offset + jnp.arange(q.shape[1])  # the layer's numbers (mask_mod)
        rules = structure.allows_per_head(
            jnp.arange(length_q), jnp.arange(length_k), heads
        )  # [H or 1, Lq, Lk]
        mask = masks.combine(mask, rules if structure.mask_mod is not None else rules[0])
    scores = soft_cap(attention_scores(q, k, options.scale), options.softcap)  # [H, Lq, Lk] float32
    # ALiBi and a score function read the rules' positions and the layer's head numbers.
    q_pos, k_pos = jnp.arange(length_q) + structure.q_offset, jnp.arange(length_k) + structure.k_offset
    if options.alibi:
        slopes = alibi.head_slopes(options.alibi, scores.shape[0], structure.head_offset)
        scores = alibi.add(scores, slopes, q_pos, k_pos)
    if options.score_mod is not None:
        heads = structure.head_offset + jnp.arange(scores.shape[0])
        scores = score_mod.apply(options.score_mod, scores, heads, q_pos, k_pos)
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    if sinks is None:
        weights = attention_weights(scores, mask).astype(v.dtype)  # [H, Lq, Lk]
    else:  # the sink as column Lk, visible to every row, dropped after the softmax
        num_heads = scores.shape[0]
        column = jnp.broadcast_to(sinks.astype(scores.dtype)[:, None, None], (num_heads, length_q, 1))
        if mask is not None:
            mask = jnp.broadcast_to(mask, (mask.shape[0] if mask.ndim == 3 else 1, length_q, length_k))
            mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], length_q, 1), bool)], axis=-1)
        weights = attention_weights(jnp.concatenate([scores, column], axis=-1), mask)
        weights = weights[..., :length_k].astype(v.dtype)  # [H, Lq, Lk]
    rate = options.dropout_rate
    kept = weights if rate == 0.0 else dropout_weights(weights, rate, rng)
    heads = apply_weights(kept, v)  # [Lq, H, Dh]
    return heads, weights
