"""ALiBi (Press et al., 2022; BLOOM, MPT): a linear bias on the distance between key and query.

    scores[h, i, j] += slope_h · (t_j - p_i)     (key position t, query position p)

Head h's slope is BLOOM's (`build_alibi_tensor`): for the largest power of two n <= H,
`2^(-8h/n)` for h = 1..n, and the H - n heads beyond take every other slope of a
2n-head layer, `2^(-4(2h - 1)/n)` for h = 1..H - n. BLOOM adds `slope_h · t_j` alone,
which differs from the above by `slope_h · p_i`, the same for every key of a row: the
softmax cannot tell them apart (with sinks, whose logit has no position, it can: here
the bias is 0 at the query's own position). Being a function of positions, it travels
like the mask rules: by the rules' offsets in a ring or a cache, with the heads'
offset when a call holds a share of the layer's heads (a mesh device).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


def slopes(num_heads: int) -> np.ndarray:
    """float64 `[H]`: BLOOM's slopes for a layer of `num_heads` heads."""
    n = 2 ** math.floor(math.log2(num_heads))
    powers = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    extra = 2.0 ** (-4.0 * np.arange(1, 2 * (num_heads - n), 2) / n)
    return np.concatenate([powers, extra])


def head_slopes(alibi: bool | int, num_heads: int, head_offset) -> Array:
    """`[H]` slopes of a call's `num_heads` heads, heads `head_offset ...` of a layer of
    `alibi` heads (True: the call holds the whole layer). Float32, float64 under x64."""
    total = num_heads if alibi is True else alibi
    every = jnp.asarray(slopes(total))
    if total == num_heads and isinstance(head_offset, int) and head_offset == 0:
        return every
    return jax.lax.dynamic_slice_in_dim(every, head_offset, num_heads)


def add(scores: Array, head_slopes: Array, q_pos: Array, k_pos: Array) -> Array:
    """`scores [H, Lq, Lk] + slope_h · (k_pos - q_pos)`, in the scores' dtype (positions
    are exact in float32 up to 2^24)."""
    distance = (k_pos[None, :] - q_pos[:, None]).astype(scores.dtype)  # [Lq, Lk]
    return scores + head_slopes.astype(scores.dtype)[:, None, None] * distance[None]
