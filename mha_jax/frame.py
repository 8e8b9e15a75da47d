"""The layer frame: one function runs every attention layer's data path, around an attend step
that each entrance plugs in (the batched call, the decode step, the mesh layer):

    x_q [B, Lq, D], x_kv [B, Lk, D_kv]
      ─ cast to the computation dtype, hide(x_q, x_kv): zero the inputs no query may see
      ─ project_heads on the B·L rows ─► q [B, Lq, H, Dh], k and v [B, Lk, Hkv, Dh]
      ─ QK-norm (when the params hold its scales), then RoPE at the given positions
      ─ attend(q, k, v, sinks) ─► heads [B, Lq, H, Dh] (and whatever the step returns besides)
      ─ merge_project on the B·Lq rows, reduce (the mesh layer's sum over head shards), + b_o
      ─► out [B, Lq, D_out]

Hiding inputs first matters: masking the scores cannot stop `0 · NaN` in the projections'
gradients when padding holds garbage (pytorch#101967). The stages are called in their
unchecked forms (`*_unchecked`): each entrance validated its call once, at its boundary, and
the checks are not repeated on the data path (tests/test_layering.py holds this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax.options import Options
from mha_jax.params import MHAParams
from mha_jax.qk_norm import rms_norm_unchecked
from mha_jax.rope import apply_rope_unchecked
from mha_jax.stages import merge_project_unchecked, project_heads_unchecked


def layer(
    params: MHAParams,
    x_q: Array,
    x_kv: Array,
    *,
    num_heads: int,
    options: Options,
    hide: Callable[[Array, Array], tuple[Array, Array]],
    attend: Callable[[Array, Array, Array, Array | None], tuple[Array, Any]],
    positions: tuple[Array, Array] | None = None,
    rope_length: Array | None = None,
    reduce: Callable[[Array], Array] | None = None,
) -> tuple[Array, Any]:
    """`[B, Lq, D], [B, Lk, D_kv] -> (out [B, Lq, D_out], what attend returned besides the heads)`.

    num_heads: the query heads these params hold (a mesh device's share of them); the kv
    head count follows from `params.w_k`. positions: `(q [B, Lq], k [B, Lk])` int RoPE
    positions, needed when `options.rope` is set. rope_length: `[B]` int, the sequence length
    dynamic NTK RoPE scales for (default: per row, the largest query or key position + 1; the
    mesh layer gives the whole sequence's). attend gets the params' sinks `[H]` (or
    None) in float32 or wider: they join the float32 softmax.
    """
    dtype = x_q.dtype if options.dtype is None else options.dtype
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    x_q, x_kv = hide(x_q.astype(dtype), x_kv.astype(dtype))
    (batch, length_q, _), length_k = x_q.shape, x_kv.shape[1]
    num_kv_heads = params.w_k.shape[1] * num_heads // params.w_q.shape[1]

    rows = lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # [B, L, ...] -> [B·L, ...]
    unrows = lambda x, length: x.reshape(batch, length, *x.shape[1:])
    q = project_heads_unchecked(rows(x_q), params.w_q, params.b_q, num_heads)  # [B·Lq, H, Dh]
    k = project_heads_unchecked(rows(x_kv), params.w_k, params.b_k, num_kv_heads)  # [B·Lk, Hkv, Dh]
    v = project_heads_unchecked(rows(x_kv), params.w_v, params.b_v, num_kv_heads)  # [B·Lk, Hkv, Dh]
    q, k = normalize_qk(params, q, k, options)
    q, k, v = unrows(q, length_q), unrows(k, length_k), unrows(v, length_k)
    if options.rope is not None:  # each row at its own position
        if rope_length is None:  # only dynamic NTK reads it
            rope_length = jnp.maximum(positions[0].max(axis=1), positions[1].max(axis=1)) + 1  # [B]
        rotate = jax.vmap(apply_rope_unchecked, in_axes=(0, 0, None, 0))
        q = rotate(q, positions[0], options.rope, rope_length)
        k = rotate(k, positions[1], options.rope, rope_length)

    sinks = None if params.sinks is None else params.sinks.astype(jnp.promote_types(dtype, jnp.float32))
    heads, extra = attend(q, k, v, sinks)  # [B, Lq, H, Dh]
    out = merge_project_unchecked(rows(heads), params.w_o, None)  # [B·Lq, D_out]
    out = out if reduce is None else reduce(out)
    out = out if params.b_o is None else out + params.b_o
    return unrows(out, length_q), extra  # [B, Lq, D_out]


def normalize_qk(params: MHAParams, q, k, options: Options):
    """QK-norm when the params hold its scales: RMS over each head's Dh features, before RoPE."""
    if params.q_norm is None:
        return q, k
    return (rms_norm_unchecked(q, params.q_norm, eps=options.qk_norm_eps),
            rms_norm_unchecked(k, params.k_norm, eps=options.qk_norm_eps))  # fmt: skip


def default_positions(offset, batch: int, length: int) -> Array:
    """`[B, L]` positions `offset + arange(L)`, for an int offset, a scalar or `[B]`."""
    offset = jnp.asarray(offset, jnp.int32)
    offset = offset[:, None] if offset.ndim == 1 else offset
    return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))
