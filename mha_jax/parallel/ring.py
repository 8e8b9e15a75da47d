"""Ring attention: context parallelism over one mesh axis, inside `jax.shard_map`.

Each of the N devices on `axis_name` holds one chunk of the sequence (`C = L / N`
rows, placed by a `Layout`): queries `[Cq, H, Dh]`, keys and values `[Ck, Hkv, Dh]`.
The key/value chunks travel around the ring, one hop per step, while every device
attends its own queries to the chunk it holds; after N steps every query has met
every key, and no device ever held more than two key/value chunks (the one it
attends to and the one arriving):

              step 0      step 1      step 2      step 3      (N = 4)
    device 0  Q0·KV0      Q0·KV3      Q0·KV2      Q0·KV1
    device 1  Q1·KV1      Q1·KV0      Q1·KV3      Q1·KV2
    device 2  Q2·KV2      Q2·KV1      Q2·KV0      Q2·KV3
    device 3  Q3·KV3      Q3·KV2      Q3·KV1      Q3·KV0
              each step: ppermute the K/V chunk to device d+1 (in flight during the
              step's attention: the two do not depend on each other), attend with the
              blockwise kernel, merge (out, lse) into the running result

One step is the blockwise kernel on (local queries, one key chunk), whose mask rules
are the global ones moved to local positions (`_chunk_rules`): a contiguous or
striped chunk pair is again "causal with an offset, padded at a length", so the
kernel skips the tiles the mask rules out. Steps merge exactly through their
log-sum-exp: `lse = logaddexp(lse_a, lse_b)`, `out = out_a·e^(lse_a-lse) + out_b·e^(lse_b-lse)`.

Backward (`jax.custom_vjp`): the same ring once more. Each step recomputes its
chunk's probabilities from the saved *total* `lse`, adds to the local `dq`, and
adds to `dk`, `dv` accumulators that travel with their K/V chunk; after the last
step one more hop brings every chunk's `dk`, `dv` home. Memory per device stays
O(L/N): the residuals are the local q, k, v, out and lse.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from mha_jax import _checks
from mha_jax.kernels import blockwise
from mha_jax.masks import Structure, normalize_window
from mha_jax.parallel.layout import Layout, bound_axis_size, check_layout_for


class Ring(NamedTuple):
    """Everything static about one ring call (hashable: it keys the custom VJP)."""

    axis_name: str
    axis_size: int
    layout: str  # "contiguous" | "striped"
    is_causal: bool
    window: tuple[int, int] | None
    padded: bool  # a kv_length was given
    scale: float | None
    softcap: float | None
    block_sizes: tuple[int, int] | None


def ring_attention(
    q: Array,  # [Cq, H, Dh] this device's queries
    k: Array,  # [Ck, Hkv, Dh] this device's keys
    v: Array,  # [Ck, Hkv, Dh]
    *,
    axis_name: str,
    is_causal: bool = False,
    q_offset: int | Array = 0,
    kv_length: int | Array | None = None,
    window: int | tuple[int, int] | None = None,
    layout: Layout | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> Array:  # [Cq, H, Dh]
    """Attention of this device's queries to the keys of every device on `axis_name`:
    one example, called per device inside `jax.shard_map` (vmap it for a batch).

    is_causal, q_offset, kv_length, window: the mask rules in *global* positions, as in
    `mha_jax.attention` (window only with the contiguous layout: a striped chunk pair
    is not a band). layout: where the rows lie (None: contiguous; `Layout("striped", N)`
    balances causal work). The global lengths are `N·Cq` and `N·Ck`.
    """
    ring, q_offset, kv_length = _settle(
        q, k, v, axis_name, is_causal, q_offset, kv_length, window, layout, scale, softcap, block_sizes
    )
    return _ring(q, k, v, q_offset, kv_length, ring)


def _settle(q, k, v, axis_name, is_causal, q_offset, kv_length, window, layout, scale, softcap, block_sizes):
    """Check one call (trace time) and make its static `Ring` and traced positions."""
    axis_size = bound_axis_size(axis_name)
    layout = check_layout_for(layout, axis_name, axis_size)
    _checks.check_bool_flag("is_causal", is_causal)
    _checks.check_rank("q", q, 3, "[Cq, H, Dh]")
    _checks.check_rank("k", k, 3, "[Ck, Hkv, Dh]")
    _checks.check_shape("v", v, k.shape, "[Ck, Hkv, Dh] (the shape of k)")
    _checks.check_shape("k", k, (None, None, q.shape[2]), "[Ck, Hkv, Dh] (Dh of q)")
    _checks.check_divides("q.shape[1] (H)", q.shape[1], "k.shape[1] (Hkv)", k.shape[1])
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise _checks.fail("q and k", "hold at least one row per device", f"shapes {q.shape}, {k.shape}")
    window = normalize_window(window)
    if window is not None and layout.kind == "striped":
        raise _checks.fail(
            "window", "be None with a striped layout (a striped chunk pair is not a band)", window
        )
    if block_sizes is not None:
        _checks.check_block_sizes(block_sizes)
    ring = Ring(
        axis_name=axis_name,
        axis_size=axis_size,
        layout=layout.kind,
        is_causal=bool(is_causal),
        window=window,
        padded=kv_length is not None,
        scale=None if scale is None else float(scale),
        softcap=None if softcap is None else float(softcap),
        block_sizes=None if block_sizes is None else tuple(block_sizes),
    )
    kv_length = axis_size * k.shape[0] if kv_length is None else kv_length
    return ring, jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_length, jnp.int32)


def _chunk_rules(ring: Ring, me, src, q_offset, kv_length, length_q: int, length_k: int) -> Structure:
    """The global rules seen from device `me`'s queries and device `src`'s key chunk, in
    local row numbers (`Cq = length_q`, `Ck = length_k` rows per device).

    contiguous: query row a is at me·Cq + a, key row b at src·Ck + b, so causality
    `key <= query + q_offset` is `b <= a + (me·Cq - src·Ck + q_offset)`.
    striped: query row a is at a·N + me, key row b at b·N + src, so it is
    `b <= a + floor((me - src + q_offset) / N)`: a causal triangle shifted by 0 or -1
    rows, the same work on every device. Padding `key < kv_length` becomes
    `b < kv_length - src·Ck`, or `b < ceil((kv_length - src) / N)`.
    """
    n = ring.axis_size
    if ring.layout == "striped":
        offset = jnp.floor_divide(me - src + q_offset, n)
        valid = -jnp.floor_divide(src - kv_length, n)  # ceil((kv_length - src) / N)
    else:
        offset = me * length_q - src * length_k + q_offset
        valid = kv_length - src * length_k
    return Structure(
        is_causal=ring.is_causal,
        q_offset=offset,
        kv_length=jnp.clip(valid, 0, length_k) if ring.padded else None,
        window=ring.window,
    )


def _pass_on(arrays, ring: Ring):
    """Send each array to the next device on the ring (device d to d+1, the last to 0)."""
    perm = [(d, (d + 1) % ring.axis_size) for d in range(ring.axis_size)]
    return jax.lax.ppermute(arrays, ring.axis_name, perm)


def _merge(out, lse, out_step, lse_step):
    """Two softmax-weighted averages over disjoint keys, as one: `[Cq, H, Dh]`, `[Cq, H]`."""
    total = jnp.logaddexp(lse, lse_step)
    safe = jnp.where(jnp.isfinite(total), total, 0.0)  # no key yet on either side: weights 0
    weight = lambda x: jnp.exp(x - safe)[..., None]
    return out * weight(lse) + out_step * weight(lse_step), total


def _forward(q, k, v, q_offset, kv_length, ring: Ring):
    me = jax.lax.axis_index(ring.axis_name)
    length_q, length_k = q.shape[0], k.shape[0]

    def visit(step, k_chunk, v_chunk, out, lse):  # attend to the chunk of device me - step
        src = (me - step) % ring.axis_size
        rules = _chunk_rules(ring, me, src, q_offset, kv_length, length_q, length_k)
        out_step, lse_step = blockwise.attention_with_lse(
            q,
            k_chunk,
            v_chunk,
            structure=rules,
            scale=ring.scale,
            softcap=ring.softcap,
            block_sizes=ring.block_sizes,
        )
        return _merge(out, lse, out_step.astype(out.dtype), lse_step)

    def hop(step, carry):
        k_chunk, v_chunk, out, lse = carry
        k_next, v_next = _pass_on((k_chunk, v_chunk), ring)  # in flight while this step attends
        out, lse = visit(step, k_chunk, v_chunk, out, lse)
        return k_next, v_next, out, lse

    # float32 (float64 for float64) running result, as the kernel's. *_like q: the carries
    # vary over the same mesh axes as the inputs (shard_map checks).
    out = jnp.zeros_like(q, jnp.promote_types(q.dtype, jnp.float32))  # [Cq, H, Dh]
    lse = jnp.full_like(out[..., 0], -jnp.inf)  # [Cq, H]
    k_chunk, v_chunk, out, lse = jax.lax.fori_loop(0, ring.axis_size - 1, hop, (k, v, out, lse))
    out, lse = visit(ring.axis_size - 1, k_chunk, v_chunk, out, lse)  # the last chunk: no hop after it
    return out.astype(q.dtype), lse


def _backward(ring: Ring, residuals, d_out):
    q, k, v, out, lse, q_offset, kv_length = residuals
    me = jax.lax.axis_index(ring.axis_name)
    length_q, length_k = q.shape[0], k.shape[0]

    def visit(step, k_chunk, v_chunk):  # this chunk's share of dq, and its dk, dv from our queries
        src = (me - step) % ring.axis_size
        rules = _chunk_rules(ring, me, src, q_offset, kv_length, length_q, length_k)
        return blockwise.attention_backward_with_lse(
            q,
            k_chunk,
            v_chunk,
            out,
            lse,
            d_out,
            structure=rules,
            scale=ring.scale,
            softcap=ring.softcap,
            block_sizes=ring.block_sizes,
        )

    def hop(step, carry):
        k_chunk, v_chunk, dk, dv, dq = carry
        k_next, v_next = _pass_on((k_chunk, v_chunk), ring)  # in flight while this step computes
        dq_step, dk_step, dv_step = visit(step, k_chunk, v_chunk)
        dk, dv = _pass_on((dk + dk_step, dv + dv_step), ring)  # a chunk's gradients travel with it
        return k_next, v_next, dk, dv, dq + dq_step

    acc = jnp.promote_types(q.dtype, jnp.float32)  # gradients add up in float32 over the steps
    dq, dk = jnp.zeros_like(q, acc), jnp.zeros_like(k, acc)
    carry = jax.lax.fori_loop(0, ring.axis_size - 1, hop, (k, v, dk, dk, dq))
    k_chunk, v_chunk, dk, dv, dq = carry
    dq_step, dk_step, dv_step = visit(ring.axis_size - 1, k_chunk, v_chunk)
    dk, dv = _pass_on((dk + dk_step, dv + dv_step), ring)  # the last hop: every chunk's gradients home
    return (dq + dq_step).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_offset, kv_length, ring):
    return _forward(q, k, v, q_offset, kv_length, ring)[0]


def _ring_fwd(q, k, v, q_offset, kv_length, ring):
    out, lse = _forward(q, k, v, q_offset, kv_length, ring)
    return out, (q, k, v, out, lse, q_offset, kv_length)


_ring.defvjp(_ring_fwd, _backward)


def ring_work(
    *,
    axis_size: int,
    length_q: int,
    length_k: int | None = None,
    is_causal: bool = False,
    q_offset: int = 0,
    kv_length: int | None = None,
    layout: Layout | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> np.ndarray:
    """`[N]`: the (query block, key block) tiles each device's forward computes over the
    whole ring, read from the kernel's own loop bounds (`blockwise.visited_blocks`) for
    the rules each step hands it. Global lengths; the load balance of a layout."""
    length_k = length_q if length_k is None else length_k
    layout = check_layout_for(layout, "axis_size", axis_size)
    _checks.check_divides("length_q", length_q, "axis_size", axis_size)
    _checks.check_divides("length_k", length_k, "axis_size", axis_size)
    ring = Ring("", axis_size, layout.kind, is_causal, None, kv_length is not None, None, None, block_sizes)
    chunk_q, chunk_k = length_q // axis_size, length_k // axis_size
    kv_length = length_k if kv_length is None else kv_length
    work = np.zeros(axis_size, np.int64)
    for me in range(axis_size):
        for step in range(axis_size):
            rules = _chunk_rules(ring, me, (me - step) % axis_size, q_offset, kv_length, chunk_q, chunk_k)
            work[me] += int(blockwise.visited_blocks(rules, chunk_q, chunk_k, block_sizes))
    return work
