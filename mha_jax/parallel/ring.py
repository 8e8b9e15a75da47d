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

Sinks join once, after the last step, as one more piece with output 0 (`lse_sink =
sink`): the saved `lse` and `out` are then the totals the backward steps need, and
`d sink = -Σ_q exp(sink - lse_q)·rowsum(dO_q·O_q)` over this device's queries, summed
over the devices that share the sink (`blockwise.sum_like`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from mha_jax import _checks, score_mod
from mha_jax.kernels import blockwise
from mha_jax.masks import Structure, check_structure
from mha_jax.options import Options
from mha_jax.parallel.layout import Layout, bound_axis_size, check_layout_for


class Ring(NamedTuple):
    """Everything static about one ring call (hashable: it keys the custom VJP)."""

    axis_name: str
    axis_size: int
    layout: str  # "contiguous" | "striped"
    options: Options  # scale, softcap: what the kernel reads of them
    block_sizes: tuple[int, int] | None


def ring_attention(
    q: Array,  # [Cq, H, Dh] this device's queries
    k: Array,  # [Ck, Hkv, Dh] this device's keys
    v: Array,  # [Ck, Hkv, Dh]
    *,
    axis_name: str,
    structure: Structure | None = None,
    options: Options | None = None,
    layout: Layout | None = None,
    block_sizes: tuple[int, int] | None = None,
    sinks: Array | None = None,  # float [H]
) -> Array:  # [Cq, H, Dh]
    """Attention of this device's queries to the keys of every device on `axis_name`:
    one example, called per device inside `jax.shard_map` (vmap it for a batch).

    structure: the mask rules in *global* positions, as in `mha_jax.attention`, except
    segment ids, which are this device's own rows: `(q_segment_ids [Cq], kv_segment_ids
    [Ck])` in layout order (the key ids travel round the ring with their keys). Window,
    chunk and prefix need the contiguous layout (a striped chunk pair is not a band).
    options: scale and softcap as in `mha_jax.Options`. layout: where the rows lie (None:
    contiguous; `Layout("striped", N)` balances causal work). Global lengths `N·Cq`, `N·Ck`.
    sinks: one logit per query head, the same on every device of the ring.
    """
    ring, structure = _settle(q, k, v, axis_name, structure, options, layout, block_sizes)
    if sinks is not None:
        sinks = _checks.check_sinks("sinks", sinks, q.shape[1])
        sinks = sinks.astype(jnp.promote_types(sinks.dtype, jnp.float32))
    return _ring(q, k, v, sinks, structure, ring)


def _settle(q, k, v, axis_name, structure, options, layout, block_sizes):
    """Check one call (trace time) and make its static `Ring` and its rules, positions int32."""
    axis_size = bound_axis_size(axis_name)
    layout = check_layout_for(layout, axis_name, axis_size)
    structure, options = check_rules(q, k, v, structure, options, block_sizes, axis_size * k.shape[0])
    if layout.kind == "striped":
        refuse_bands(structure, name="structure.")
        if options.alibi:  # its offsets give striped rows their order, not their distances
            raise _checks.fail("options.alibi", "be False for a striped ring (use a contiguous one)", True)
        if options.score_mod is not None:
            raise _checks.fail("options.score_mod", "be None for a striped ring (use a contiguous one)",
                               options.score_mod)  # fmt: skip
    if options.score_mod is not None:
        score_mod.refuse_learning_on_a_mesh(options.score_mod, score_mod.varying_axes(q, k, v))
    ring = Ring(
        axis_name, axis_size, layout.kind, options, None if block_sizes is None else tuple(block_sizes)
    )
    as_int32 = lambda value: None if value is None else jnp.asarray(value, jnp.int32)
    structure = structure.replace(
        q_offset=as_int32(structure.q_offset), kv_length=as_int32(structure.kv_length),
        prefix=as_int32(structure.prefix),
    )  # fmt: skip
    return ring, structure


# Rules on positions that a striped chunk pair cannot keep: their visible keys are a band of
# positions, which striped rows scatter over every chunk (and a mask function reads positions,
# which the striped offsets do not give). A new rule of that kind joins here.
BAND_RULES = ("window", "chunk", "prefix", "mask_mod")


def refuse_bands(structure: Structure, *, name: str = "") -> None:
    """The error for a band rule on a striped ring (`name`: how the caller's user wrote it)."""
    for rule in BAND_RULES:
        if getattr(structure, rule) is not None:
            why = "be None for a striped ring (a striped chunk pair is not a band)"
            raise _checks.fail(f"{name}{rule}", why, repr(getattr(structure, rule)))


def check_rules(q, k, v, structure, options, block_sizes, global_k: int):
    """What every per-device function checks: the local chunks' shapes, the rules (their
    segment ids a pair of this device's `[Cq]`, `[Ck]`), the settings. Returns the rules with
    the segment ids as a pair, and the options."""
    _checks.check_rank("q", q, 3, "[Cq, H, Dh]")
    _checks.check_rank("k", k, 3, "[Ck, Hkv, Dh]")
    _checks.check_shape("v", v, k.shape, "[Ck, Hkv, Dh] (the shape of k)")
    _checks.check_shape("k", k, (None, None, q.shape[2]), "[Ck, Hkv, Dh] (Dh of q)")
    _checks.check_divides("q.shape[1] (H)", q.shape[1], "k.shape[1] (Hkv)", k.shape[1])
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise _checks.fail("q and k", "hold at least one row per device", f"shapes {q.shape}, {k.shape}")
    structure = Structure() if structure is None else structure
    # The segment ids against the local chunks; the prefix, a position, against the global keys.
    check_structure(structure.replace(prefix=None), q.shape[0], k.shape[0], name="structure.")
    if structure.prefix is not None:
        check_structure(structure.replace(segment_ids=None), q.shape[0], global_k, name="structure.")
    if structure.segment_ids is not None:
        structure = structure.replace(segment_ids=tuple(structure.segments))
    options = Options() if options is None else options
    if not isinstance(options, Options):
        raise TypeError(f"options must be an mha_jax.Options or None; got {type(options).__name__}")
    if block_sizes is not None:
        _checks.check_block_sizes(block_sizes)
    return structure, options


def _chunk_rules(
    ring: Ring, me, src, structure: Structure, kv_ids, length_q: int, length_k: int
) -> Structure:
    """The global rules seen from device `me`'s queries and device `src`'s key chunk, in
    local row numbers (`Cq = length_q`, `Ck = length_k` rows per device).

    contiguous: query row a is at position me·Cq + a + q_offset, key row b at src·Ck + b:
    the rules move by offsets (q_offset, k_offset), every rule kept (causal, window,
    chunk, prefix are on positions). striped: query row a is at a·N + me, key row b at
    b·N + src, so causality `key <= query + q_offset` is `b <= a + floor((me - src +
    q_offset) / N)`: a causal triangle shifted by 0 or -1 rows, the same work on every
    device. Padding `key < kv_length` becomes `b < kv_length - src·Ck`, or
    `b < ceil((kv_length - src) / N)`. Segment ids compare rows, not positions: the
    queries' own and the travelling chunk's (`kv_ids`).
    """
    n, kv_length = ring.axis_size, structure.kv_length
    if ring.layout == "striped":
        rules = structure.replace(q_offset=jnp.floor_divide(me - src + structure.q_offset, n))
        valid = (
            None if kv_length is None else -jnp.floor_divide(src - kv_length, n)
        )  # ceil((kv_length - src) / N)
    else:
        rules = structure.replace(q_offset=me * length_q + structure.q_offset, k_offset=src * length_k)
        valid = None if kv_length is None else kv_length - src * length_k
    rules = rules.replace(kv_length=None if valid is None else jnp.clip(valid, 0, length_k))
    if structure.segment_ids is not None:
        rules = rules.replace(segment_ids=(structure.segment_ids[0], kv_ids))
    return rules


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


def _kv_ids(structure: Structure):
    """This device's key chunk's segment ids (None without segment ids): they travel round
    the ring with their keys."""
    return None if structure.segment_ids is None else structure.segment_ids[1]


def _forward(q, k, v, sinks, structure: Structure, ring: Ring):
    me = jax.lax.axis_index(ring.axis_name)
    length_q, length_k = q.shape[0], k.shape[0]

    def visit(step, k_chunk, v_chunk, kv_ids, out, lse):  # attend to the chunk of device me - step
        src = (me - step) % ring.axis_size
        rules = _chunk_rules(ring, me, src, structure, kv_ids, length_q, length_k)
        out_step, lse_step = blockwise.attention_with_lse(
            q, k_chunk, v_chunk, structure=rules, options=ring.options, block_sizes=ring.block_sizes
        )
        return _merge(out, lse, out_step.astype(out.dtype), lse_step)

    def hop(step, carry):
        k_chunk, v_chunk, kv_ids, out, lse = carry
        k_next, v_next, ids_next = _pass_on((k_chunk, v_chunk, kv_ids), ring)  # in flight meanwhile
        out, lse = visit(step, k_chunk, v_chunk, kv_ids, out, lse)
        return k_next, v_next, ids_next, out, lse

    # float32 (float64 for float64) running result, as the kernel's. *_like q: the carries
    # vary over the same mesh axes as the inputs (shard_map checks).
    out = jnp.zeros_like(q, jnp.promote_types(q.dtype, jnp.float32))  # [Cq, H, Dh]
    lse = jnp.full_like(out[..., 0], -jnp.inf)  # [Cq, H]
    kv_ids = _kv_ids(structure)
    carry = jax.lax.fori_loop(0, ring.axis_size - 1, hop, (k, v, kv_ids, out, lse))
    k_chunk, v_chunk, kv_ids, out, lse = carry
    out, lse = visit(ring.axis_size - 1, k_chunk, v_chunk, kv_ids, out, lse)  # the last: no hop after it
    if sinks is not None:  # the sink: one more piece, output 0, lse = the sink's logit
        out, lse = _merge(out, lse, jnp.zeros_like(out), jnp.broadcast_to(sinks.astype(lse.dtype), lse.shape))
    return out.astype(q.dtype), lse


def _backward(ring: Ring, residuals, d_out):
    q, k, v, sinks, out, lse, structure = residuals
    me = jax.lax.axis_index(ring.axis_name)
    length_q, length_k = q.shape[0], k.shape[0]

    def visit(step, k_chunk, v_chunk, kv_ids):  # this chunk's share of dq, and its dk, dv from our queries
        src = (me - step) % ring.axis_size
        rules = _chunk_rules(ring, me, src, structure, kv_ids, length_q, length_k)
        return blockwise.attention_backward_with_lse(
            q, k_chunk, v_chunk, out, lse, d_out, structure=rules, options=ring.options,
            block_sizes=ring.block_sizes,
        )  # fmt: skip

    def hop(step, carry):
        k_chunk, v_chunk, kv_ids, dk, dv, dq = carry
        k_next, v_next, ids_next = _pass_on((k_chunk, v_chunk, kv_ids), ring)  # in flight meanwhile
        dq_step, dk_step, dv_step = visit(step, k_chunk, v_chunk, kv_ids)
        dk, dv = _pass_on((dk + dk_step, dv + dv_step), ring)  # a chunk's gradients travel with it
        return k_next, v_next, ids_next, dk, dv, dq + dq_step

    acc = jnp.promote_types(q.dtype, jnp.float32)  # gradients add up in float32 over the steps
    dq, dk = jnp.zeros_like(q, acc), jnp.zeros_like(k, acc)
    kv_ids = _kv_ids(structure)
    carry = jax.lax.fori_loop(0, ring.axis_size - 1, hop, (k, v, kv_ids, dk, dk, dq))
    k_chunk, v_chunk, kv_ids, dk, dv, dq = carry
    dq_step, dk_step, dv_step = visit(ring.axis_size - 1, k_chunk, v_chunk, kv_ids)
    dk, dv = _pass_on((dk + dk_step, dv + dv_step), ring)  # the last hop: every chunk's gradients home
    d_sinks = None
    if sinks is not None:  # rows that saw no key have lse = the sink: their share is theirs
        delta = jnp.einsum("qhd,qhd->qh", d_out.astype(acc), out.astype(acc))  # [Cq, H]
        d_sinks = -jnp.sum(jnp.exp(sinks.astype(acc) - lse) * delta, axis=0).astype(sinks.dtype)  # [H]
        d_sinks = blockwise.sum_like(d_sinks, sinks)  # every device's queries' share
    return (dq + dq_step).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_sinks, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, sinks, structure, ring):
    return _forward(q, k, v, sinks, structure, ring)[0]


def _ring_fwd(q, k, v, sinks, structure, ring):
    out, lse = _forward(q, k, v, sinks, structure, ring)
    return out, (q, k, v, sinks, out, lse, structure)


_ring.defvjp(_ring_fwd, _backward)


def ring_work(
    *,
    axis_size: int,
    length_q: int,
    length_k: int | None = None,
    structure: Structure | None = None,
    layout: Layout | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> np.ndarray:
    """`[N]`: the (query block, key block) tiles each device's forward computes over the
    whole ring, read from the kernel's own loop bounds (`blockwise.visited_blocks`) for
    the rules each step hands it. Global lengths and rules (no segment ids); the load
    balance of a layout."""
    length_k = length_q if length_k is None else length_k
    layout = check_layout_for(layout, "axis_size", axis_size)
    _checks.check_divides("length_q", length_q, "axis_size", axis_size)
    _checks.check_divides("length_k", length_k, "axis_size", axis_size)
    ring = Ring("", axis_size, layout.kind, Options(), block_sizes)
    chunk_q, chunk_k = length_q // axis_size, length_k // axis_size
    structure = Structure() if structure is None else structure
    work = np.zeros(axis_size, np.int64)
    for me in range(axis_size):
        for step in range(axis_size):
            rules = _chunk_rules(ring, me, (me - step) % axis_size, structure, None, chunk_q, chunk_k)
            work[me] += int(blockwise.visited_blocks(rules, chunk_q, chunk_k, block_sizes))
    return work
