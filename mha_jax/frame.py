"""The layer frame's per-head stages between the projections and the kernel: QK-norm, then
RoPE, on `[L, H, Dh]` heads (one example's rows, or a batch's B·L rows for QK-norm).

    q, k = normalize_qk(params, q, k, options)              # when params hold q_norm, k_norm
    q = rotate(q, positions, options.rope)                  # query i at positions[i]

The batched call, the decode step and the mesh layer all run these, in this order.
"""

from __future__ import annotations

import jax.numpy as jnp

from mha_jax.options import Options
from mha_jax.params import MHAParams
from mha_jax.qk_norm import qk_norm
from mha_jax.rope import RoPE, apply_rope


def normalize_qk(params: MHAParams, q, k, options: Options):
    """QK-norm when the params hold its scales: RMS over each head's Dh features, before RoPE."""
    if params.q_norm is None:
        return q, k
    return (qk_norm(q, params.q_norm, eps=options.qk_norm_eps),
            qk_norm(k, params.k_norm, eps=options.qk_norm_eps))  # fmt: skip


def rotate(x, first_position, rope: RoPE | None):
    """RoPE of one example's `[L, H, Dh]` heads at positions `first_position + arange(L)`."""
    if rope is None:
        return x
    positions = jnp.arange(x.shape[0], dtype=jnp.int32) + jnp.asarray(first_position, jnp.int32)
    return apply_rope(x, positions, rope)
