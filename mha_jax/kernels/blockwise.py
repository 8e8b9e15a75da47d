"""Blockwise attention: the reference maths in O(L) memory (FlashAttention-2 style).

Forward: for each block of queries, walk the key/value blocks it can see and
keep a running row max `m`, normaliser `row_sum` and output `acc` (online softmax),
so no `[H, Lq, Lk]` array exists. Blocks that the mask structure rules out
(the future under `is_causal`, padding beyond `kv_length`, keys outside a
local window) are never visited: causal attention does about half the work.

Backward (`jax.custom_vjp`): recompute each block's probabilities from the
saved log-sum-exp `lse = m + log(row_sum)` instead of storing them, again O(L).

Sinks (gpt-oss: a logit per head that joins every row's softmax and carries no
value) merge into each row once its keys are done, as one more piece with output 0:
`lse = logaddexp(lse_keys, sink)`, `out = out_keys·exp(lse_keys - lse)`. The
backward then runs on that total `lse` (the keys' probabilities are the total
softmax's), and `d sink = -Σ_q exp(sink - lse_q)·delta_q`, `delta = rowsum(dO·O)`: the
softmax Jacobian's term for a column whose value is 0.

ALiBi (`options.alibi`) adds `slope_h · (t - p)` to each tile's scores after the soft-cap,
at the rules' positions; its derivative is 1, so the backward only recomputes it.

Numerics follow the reference: float32 scores and softmax, masked entries
exactly zero, a query row with no visible key outputs zeros with zero
gradients. Layout inside: heads grouped as `[Hkv, G]`, blocks leading, e.g.
q blocks `[nq, Hkv, G, Bq, Dh]`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax import _checks, alibi, score_mod
from mha_jax.kernels.request import Request, fused_limits
from mha_jax.masks import Structure, check_structure, mask_mod_grid
from mha_jax.options import Options
from mha_jax.stages import fold_scale, soft_cap


class Config(NamedTuple):
    """Everything static about one call (hashable: it keys the compile cache)."""

    block_q: int
    block_k: int
    length_q: int
    length_k: int
    scale: float
    softcap: float | None = None
    alibi: bool | int = False
    score_mod: Callable | None = None  # fn(s, head, q, k, *consts): closure-converted by _flash's caller
    score_mod_axes: frozenset | None = None  # the mesh axes its arguments vary over (converted)


def default_block_sizes(length_q: int, length_k: int) -> tuple[int, int]:
    """Blocks tuned on a 2-core x86 CPU (scripts/bench.py): big enough for
    efficient matmuls, small enough that a block of scores stays in cache.
    Keys up to 512 form one block: the backward then carries nothing between
    key blocks (faster at L=512 than two blocks of 256: README, "Benchmarks")."""
    block_q = length_q if length_q < 8 else min(512, _round_up(length_q, 8))  # decoding: no padding
    block_k = _round_up(length_k, 8) if length_k <= 512 else 256
    return block_q, block_k


def cannot(request: Request) -> list[str]:
    return fused_limits(request)


def run(q, k, v, *, mask, bias, structure, options, rng, sinks=None):
    heads = blockwise_attention(
        q, k, v, mask=mask, bias=bias, structure=structure, options=options, sinks=sinks
    )
    return heads, None


def blockwise_attention(
    q: Array,  # [Lq, H, Dh]
    k: Array,  # [Lk, Hkv, Dh]
    v: Array,  # [Lk, Hkv, Dh]
    *,
    mask: Array | None = None,  # bool [Lq, Lk] or [H, Lq, Lk]
    bias: Array | None = None,  # float [Lq, Lk] or [H, Lq, Lk]
    structure: Structure | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_sizes: tuple[int, int] | None = None,
    options: Options | None = None,
    sinks: Array | None = None,  # float [H]
) -> Array:  # [Lq, H, Dh]
    """Same result as the reference kernel, without materialising the scores. The settings
    are `scale` and `softcap`, or `options` (its scale, softcap and the score options to
    come); `block_sizes` (block_q, block_k) overrides `default_block_sizes`. sinks: one
    logit per query head joining every row's softmax (module docstring)."""
    q, k, v = (_checks.as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    _checks.check_heads(q, k, v)
    mask, bias = (
        None if x is None else _checks.as_array(name, x) for name, x in (("mask", mask), ("bias", bias))
    )
    _checks.check_mask_and_bias(mask, bias, q.shape[1], q.shape[0], k.shape[0])
    if sinks is not None:
        sinks = _checks.check_sinks("sinks", sinks, q.shape[1])
    structure = Structure() if structure is None else structure
    check_structure(structure, q.shape[0], k.shape[0], name="structure.")
    if options is None:
        options = Options(scale=scale, softcap=softcap)  # checks them
    elif scale is not None or softcap is not None:
        raise _checks.fail("options", "be given without scale and softcap (it holds them)", options)
    length_q, length_k = q.shape[0], k.shape[0]
    if length_q == 0 or length_k == 0:  # no query, or nothing to attend to: zeros
        return jnp.zeros_like(q)
    given = structure
    config, structure = _setup(q, k, structure, options, block_sizes)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0] if mask.ndim == 3 else 1, length_q, length_k))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0] if bias.ndim == 3 else 1, length_q, length_k))
    sinks = None if sinks is None else sinks.astype(jnp.promote_types(sinks.dtype, jnp.float32))
    consts = ()
    if config.score_mod is not None:  # what it closes over and is differentiated: explicit
        axes = score_mod.varying_axes(q, k, v, structure)
        converted, consts, axes = score_mod.closure(config.score_mod, _accumulator(q.dtype), axes)
        if consts and axes:
            score_mod.refuse_learning_on_a_mesh(config.score_mod, axes)
        config, consts = config._replace(score_mod=converted, score_mod_axes=axes), tuple(consts)
    # The mask function's tiles, from the positions as given (known at trace time if they are).
    table = mask_mod_blocks(given, q.shape[1], config, q)
    return _flash(q, k, v, mask, bias, structure, sinks, consts, table, config)


def _setup(q, k, structure: Structure, options: Options, block_sizes):
    """(Config, structure) of a call: what `blockwise_attention` and the pieces share. The
    structure's positions become int32 arrays and its kv_length is always set."""
    length_q, _, head_dim = q.shape
    length_k = k.shape[0]
    if block_sizes is not None:
        _checks.check_block_sizes(block_sizes)
    block_q, block_k = block_sizes or default_block_sizes(length_q, length_k)
    config = Config(
        block_q=block_q,
        block_k=block_k,
        length_q=length_q,
        length_k=length_k,
        scale=head_dim**-0.5 if options.scale is None else options.scale,
        softcap=options.softcap,
        alibi=options.alibi,
        score_mod=options.score_mod,
    )
    # Positions are int32 whatever jax_enable_x64 says: block indices mix with them.
    positions = {
        name: jnp.asarray(getattr(structure, name), jnp.int32)
        for name in ("q_offset", "k_offset", "head_offset")
    }
    if structure.prefix is not None:
        positions["prefix"] = jnp.asarray(structure.prefix, jnp.int32)
    # kv_length beyond Lk means "no padding", as in the reference: clamp, so the
    # zero keys that pad the last block are never taken for real ones.
    kv_length = jnp.clip(
        jnp.asarray(length_k if structure.kv_length is None else structure.kv_length), 0, length_k
    ).astype(jnp.int32)
    return config, structure.replace(kv_length=kv_length, **positions)


# ---------------------------------------------------------------------------
# Blocking helpers


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _q_blocks(q: Array, num_kv_heads: int, config: Config) -> Array:
    """`[Lq, H, Dh] -> [nq, Hkv, G, Bq, Dh]` (zero-padded)."""
    length, num_heads, head_dim = q.shape
    padded = _pad_axis(q, 0, _round_up(length, config.block_q))
    blocks = padded.reshape(-1, config.block_q, num_kv_heads, num_heads // num_kv_heads, head_dim)
    return blocks.transpose(0, 2, 3, 1, 4)


def _q_unblock(blocks: Array, length: int) -> Array:
    """`[nq, Hkv, G, Bq, Dh] -> [Lq, H, Dh]` (padding dropped)."""
    nq, hkv, g, bq, dh = blocks.shape
    return blocks.transpose(0, 3, 1, 2, 4).reshape(nq * bq, hkv * g, dh)[:length]


def _kv_blocks(x: Array, config: Config) -> Array:
    """`[Lk, Hkv, Dh] -> [nk, Hkv, Bk, Dh]` (zero-padded)."""
    length, num_kv_heads, head_dim = x.shape
    padded = _pad_axis(x, 0, _round_up(length, config.block_k))
    return padded.reshape(-1, config.block_k, num_kv_heads, head_dim).transpose(0, 2, 1, 3)


def _kv_unblock(blocks: Array, length: int) -> Array:
    nk, hkv, bk, dh = blocks.shape
    return blocks.transpose(0, 2, 1, 3).reshape(nk * bk, hkv, dh)[:length]


def _row_blocks(x: Array, config: Config) -> Array:
    """`[Hm, Lq, Lk]` mask or bias -> padded `[Hm, Lq', Lk']` (padding hidden / zero)."""
    x = _pad_axis(x, 1, _round_up(config.length_q, config.block_q))
    return _pad_axis(x, 2, _round_up(config.length_k, config.block_k))


def _slice_block(x: Array | None, i, j, config: Config):
    if x is None:
        return None
    start = (jnp.int32(0), i * config.block_q, j * config.block_k)  # int32: see blockwise_attention
    return jax.lax.dynamic_slice(x, start, (x.shape[0], config.block_q, config.block_k))


def _ceil_div(a, b):
    return -((-a) // b)


def _touching(lo, hi, block: int):
    """Blocks `[first, end)` that hold any of the items `[lo, hi)`."""
    return lo // block, jnp.where(hi > lo, _ceil_div(hi, block), lo // block)


def _inside(lo, hi, block: int, within):
    """Blocks that hold only items of `[lo, hi)`, as a sub-range of `within`."""
    first, end = within
    inner_lo = jnp.clip(_ceil_div(lo, block), first, end)
    return inner_lo, jnp.clip(hi // block, inner_lo, end)


def _kv_blocks_of(i, structure: Structure, has_mask: bool, config: Config):
    """For query block `i`: the key blocks it may see at all, `[lo, hi)`, and among them
    those that every one of its rows sees whole, `[flo, fhi)` (they need no mask)."""
    first, last = i * config.block_q, i * config.block_q + config.block_q - 1
    lo, hi = _touching(*structure.keys_seen(first, last, config.length_k), config.block_k)
    if has_mask:
        return lo, lo, lo, hi
    flo, fhi = _inside(*structure.keys_seen_by_all(first, last, config.length_k), config.block_k, (lo, hi))
    return lo, flo, fhi, hi


def _q_blocks_of(j, structure: Structure, has_mask: bool, config: Config):
    """For key block `j`: the query blocks that may see it, `[lo, hi)`, and among them
    those whose every row sees all of it, `[flo, fhi)`."""
    first, last = j * config.block_k, j * config.block_k + config.block_k - 1
    lo, hi = _touching(*structure.rows_seeing(first, last, config.length_q), config.block_q)
    if has_mask:
        return lo, lo, lo, hi
    flo, fhi = _inside(*structure.rows_seeing_all(first, last, config.length_q), config.block_q, (lo, hi))
    return lo, flo, fhi, hi


def _three_segments(step, lo, flo, fhi, hi, carry):
    """Masked blocks `[lo, flo)`, unmasked `[flo, fhi)`, masked `[fhi, hi)`."""
    carry = jax.lax.fori_loop(lo, flo, functools.partial(step, masked=True), carry)
    carry = jax.lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
    return jax.lax.fori_loop(fhi, hi, functools.partial(step, masked=True), carry)


def _block_mask(i, j, mask, structure: Structure, config: Config, k_start=None, num_heads=None):
    """Visibility inside block (i, j): `[H or 1, Bq, Bk]` bool (keys from `k_start`, default j·Bk)."""
    q_pos = i * config.block_q + jnp.arange(config.block_q, dtype=jnp.int32)
    k_start = j * config.block_k if k_start is None else k_start
    k_pos = k_start + jnp.arange(config.block_k, dtype=jnp.int32)
    heads = structure.head_offset + jnp.arange(num_heads or 1, dtype=jnp.int32)
    allowed = structure.allows_per_head(q_pos, k_pos, heads)  # [H or 1, Bq, Bk]
    block = _slice_block(mask, i, j, config)
    return allowed if block is None else allowed & block


# The block table of a mask function: per (query block, key block) tile, whether it allows
# no entry, some, or every one (FlexAttention's BlockMask, Splash's MaskInfo). The loops skip
# empty tiles, and treat full ones as the other rules say.
EMPTY, PARTIAL, FULL = 0, 1, 2


def mask_mod_blocks(structure: Structure, num_heads: int, config: Config, like=None) -> Array | None:
    """`[nq, nk]` int32 states of the tiles under `structure.mask_mod` (None without one), one
    block row at a time (`[H, Bq, Lk]` at once, not `[H, Lq, Lk]`). Computed at trace time
    when the mask and the positions are known then (a NumPy constant), else on device.

    None inside `jax.shard_map` too (`like`, or the positions, vary over mesh axes): a table
    varying by device does not pass shard_map's checks in the loops yet, so there every tile
    the other rules allow runs masked, the mask function deciding each entry."""
    if structure.mask_mod is None:
        return None
    if score_mod.varying_axes(like, structure.q_offset, structure.k_offset, structure.head_offset):
        return None
    nq, nk = _ceil_div(config.length_q, config.block_q), _ceil_div(config.length_k, config.block_k)
    # Positions known now (no traced leaf): evaluate now. (A mask closing over traced data
    # still gives a traced table; on a mesh the positions are traced: on device.)
    offsets = (structure.q_offset, structure.k_offset, structure.head_offset)
    known = not any(isinstance(offset, jax.core.Tracer) for offset in offsets)
    with jax.ensure_compile_time_eval() if known else contextlib.nullcontext():
        heads = structure.head_offset + jnp.arange(num_heads, dtype=jnp.int32)
        k_pos = jnp.arange(nk * config.block_k, dtype=jnp.int32) + structure.k_offset

        def row(i):  # [nk]
            q_pos = i * config.block_q + jnp.arange(config.block_q, dtype=jnp.int32) + structure.q_offset
            grid = mask_mod_grid(structure.mask_mod, heads, q_pos, k_pos)  # [H, Bq, nk·Bk]
            tiles = grid.reshape(num_heads, config.block_q, nk, config.block_k).transpose(2, 0, 1, 3)
            tiles = tiles.reshape(nk, -1)
            return jnp.where(tiles.all(axis=1), FULL, jnp.where(tiles.any(axis=1), PARTIAL, EMPTY))

        return jax.lax.map(row, jnp.arange(nq, dtype=jnp.int32)).astype(jnp.int32)


def _gated(step, states):
    """`step(j, carry, masked)` run as tile j's state says (`states` [n], None: always)."""
    if states is None:
        return step

    def gated(j, carry, masked):
        branches = [
            lambda j, c: c,  # EMPTY: skipped
            lambda j, c: step(j, c, masked=True),  # PARTIAL: the mask function decides entries
            lambda j, c: step(j, c, masked=masked),  # FULL: the other rules decide
        ]
        return jax.lax.switch(states[j], branches, j, carry)  # (j an operand: see shard_map's checks)

    return gated


def _zero_unseen(visible, k_blk, v_blk):
    """Keys of a block that no row of it may see hold anything (a cache's unfilled slots):
    zero them, or `0 · NaN` reaches the output and the gradients. `visible` [H or 1, Bq, Bk]."""
    seen = visible.any(axis=(0, 1))[None, :, None]  # [1, Bk, 1]
    return jnp.where(seen, k_blk, 0), jnp.where(seen, v_blk, 0)


def _accumulator(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32, float64 for float64: scores, softmax and sums."""
    return jnp.promote_types(dtype, jnp.float32)


def _scores(q_blk, k_blk, post_scale: float | None, softcap: float | None):
    """`[Hkv, G, Bq, Dh] x [Hkv, Bk, Dh] -> [H, Bq, Bk]` float32 (or float64) scores,
    scaled and soft-capped (the bias is added by the caller)."""
    hkv, g, bq, dh = q_blk.shape
    acc = _accumulator(q_blk.dtype)
    s = jnp.einsum("hgqd,hkd->hgqk", q_blk, k_blk, preferred_element_type=acc)
    s = s.reshape(hkv * g, bq, k_blk.shape[1])
    return soft_cap(s if post_scale is None else s * post_scale, softcap)


def _positions(i, k_start, structure: Structure, config: Config):
    """The rules' positions of block i's rows `[Bq]` and of the keys from `k_start` `[Bk]`."""
    q_pos = i * config.block_q + jnp.arange(config.block_q, dtype=jnp.int32) + structure.q_offset
    k_pos = k_start + jnp.arange(config.block_k, dtype=jnp.int32) + structure.k_offset
    return q_pos, k_pos


def _alibi(s, slopes, i, k_start, structure: Structure, config: Config):
    """`s [H, Bq, Bk]` plus ALiBi's `slope_h · (t - p)` (slopes None: no ALiBi)."""
    return s if slopes is None else alibi.add(s, slopes, *_positions(i, k_start, structure, config))


def _modified(s, consts, i, k_start, structure: Structure, config: Config):
    """`s [H, Bq, Bk]` through the user's score function, if any (`mha_jax.score_mod`)."""
    if config.score_mod is None:
        return s
    heads = structure.head_offset + jnp.arange(s.shape[0], dtype=jnp.int32)  # the layer's numbers
    positions = _positions(i, k_start, structure, config)
    return score_mod.apply(config.score_mod, s, heads, *positions, consts, config.score_mod_axes)


def _slopes(num_heads: int, structure: Structure, config: Config):
    """`[H]` ALiBi slopes of this call's heads, or None."""
    return alibi.head_slopes(config.alibi, num_heads, structure.head_offset) if config.alibi else None


def _plus(s, bias_blk):
    return s if bias_blk is None else s + bias_blk.astype(s.dtype)


def _grouped(x: Array, num_kv_heads: int) -> Array:
    """`[H, Bq, ...] -> [Hkv, G, Bq, ...]`."""
    return x.reshape(num_kv_heads, x.shape[0] // num_kv_heads, *x.shape[1:])


# ---------------------------------------------------------------------------
# Forward


def _reads_in_place(config: Config, mask, bias) -> bool:
    """One block of queries (a decoding step, a short prompt) and no dense mask or bias:
    each key block is read once, so it is sliced where it lies instead of re-laid out
    with the rest. A step then reads only the blocks it visits (the filled part of a
    KV cache), not all `Lk` keys."""
    return config.length_q <= config.block_q and mask is None and bias is None


def _key_blocks(k, v, config: Config, in_place: bool):
    """`kv(j) -> (k_blk [Hkv, Bk, Dh], v_blk, start)`: key block `j` and its first position.

    In place, the last block may start earlier than `j·Bk` (slices stay inside
    `[0, Lk)`): the caller hides its positions below `j·Bk`, seen by block j-1."""
    if not in_place:
        k_blocks, v_blocks = _kv_blocks(k, config), _kv_blocks(v, config)  # [nk, Hkv, Bk, Dh]
        return lambda j: (k_blocks[j], v_blocks[j], j * config.block_k)
    if k.shape[0] < config.block_k:  # shorter than one block: pad (small)
        k, v = (_pad_axis(x, 0, config.block_k) for x in (k, v))

    def kv(j):
        start = jnp.minimum(j * config.block_k, k.shape[0] - config.block_k)
        blk = lambda x: jax.lax.dynamic_slice_in_dim(x, start, config.block_k).transpose(1, 0, 2)
        return blk(k), blk(v), start

    return kv


def _forward(q, k, v, mask, bias, structure: Structure, sinks, consts, table, config: Config):
    num_kv_heads = k.shape[1]
    q, post_scale = fold_scale(q, config.scale)
    q_blocks = _q_blocks(q, num_kv_heads, config)  # [nq, Hkv, G, Bq, Dh]
    in_place = _reads_in_place(config, mask, bias)
    kv = _key_blocks(k, v, config, in_place)
    mask = None if mask is None else _row_blocks(mask, config)
    bias = None if bias is None else _row_blocks(bias, config)
    hkv, g, bq, dh = q_blocks.shape[1:]
    num_heads = q.shape[1]
    slopes = _slopes(num_heads, structure, config)
    table = mask_mod_blocks(structure, num_heads, config, q) if table is None else table
    unmodded = structure if table is None else structure.replace(mask_mod=None)  # ranges: see _gated

    def one_q_block(i):
        q_blk = q_blocks[i]

        def step(j, carry, masked):
            m, row_sum, acc = carry  # [H, Bq], [H, Bq], [Hkv, G, Bq, Dh]
            k_blk, v_blk, start = kv(j)
            if masked:
                visible = _block_mask(i, j, mask, structure, config, start, num_heads)  # [H or 1, Bq, Bk]
                if in_place:  # a last block moved back: its first keys belong to block j-1
                    visible &= start + jnp.arange(config.block_k, dtype=jnp.int32) >= j * config.block_k
                k_blk, v_blk = _zero_unseen(visible, k_blk, v_blk)
            s = _alibi(_scores(q_blk, k_blk, post_scale, config.softcap), slopes, i, start, structure, config)
            s = _plus(_modified(s, consts, i, start, structure, config), _slice_block(bias, i, j, config))
            if masked:  # hidden entries become -inf: exp gives exactly 0
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # Until a row meets a finite score (every visible score so far masked
            # or -inf bias) its max is -inf: shift by 0 so that exp never sees
            # -inf - (-inf). Such a row keeps row_sum 0 and comes out as zeros.
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])  # [H, Bq, Bk]
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum(
                "hgqk,hkd->hgqd", _grouped(p.astype(v.dtype), hkv), v_blk, preferred_element_type=acc.dtype
            )
            acc = acc * _grouped(alpha, hkv)[..., None] + pv
            return m_new, row_sum * alpha + p.sum(axis=-1), acc

        # The other rules' ranges; the mask function's own tiles gate each step.
        lo, flo, fhi, hi = _kv_blocks_of(i, unmodded, mask is not None, config)
        step = _gated(step, None if table is None else table[i])
        # Carries are built *_like an input so that they vary over the same mesh
        # axes inside `shard_map` (a fresh jnp.zeros would not, and the loop fails).
        acc = jnp.zeros_like(q_blk, _accumulator(q_blk.dtype))  # [Hkv, G, Bq, Dh]
        row_sum = acc[..., 0].reshape(hkv * g, bq)
        init = (row_sum - jnp.inf, row_sum, acc)
        m, row_sum, acc = _three_segments(step, lo, flo, fhi, hi, init)
        seen = row_sum > 0
        out = acc / _grouped(jnp.where(seen, row_sum, 1.0), hkv)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)  # [H, Bq]
        if sinks is not None:  # the sink as one more piece, output 0 (module docstring)
            total = jnp.logaddexp(lse, sinks.astype(lse.dtype)[:, None])  # finite: the sink is
            out = out * _grouped(jnp.exp(lse - total), hkv)[..., None]
            return out.astype(v.dtype), total
        # Rows that saw no key: lse=+inf makes every recomputed probability 0.
        return out.astype(v.dtype), jnp.where(seen, lse, jnp.inf)

    out_blocks, lse_blocks = jax.lax.map(one_q_block, jnp.arange(q_blocks.shape[0], dtype=jnp.int32))
    return _q_unblock(out_blocks, config.length_q), lse_blocks  # [Lq, H, Dh], [nq, H, Bq]


# ---------------------------------------------------------------------------
# Backward


def _backward(config: Config, residuals, d_out):
    q, k, v, mask, bias, structure, sinks, consts, table, out, lse_blocks = residuals
    num_kv_heads = k.shape[1]
    q_scaled, post_scale = fold_scale(q, config.scale)
    q_blocks = _q_blocks(q_scaled, num_kv_heads, config)  # [nq, Hkv, G, Bq, Dh]
    do_blocks = _q_blocks(d_out, num_kv_heads, config)
    k_blocks, v_blocks = _kv_blocks(k, config), _kv_blocks(v, config)  # [nk, Hkv, Bk, Dh]
    mask_b = None if mask is None else _row_blocks(mask, config)
    bias_b = None if bias is None else _row_blocks(bias, config)
    hkv = num_kv_heads
    acc = _accumulator(q.dtype)
    num_heads = q.shape[1]
    slopes = _slopes(num_heads, structure, config)
    table = mask_mod_blocks(structure, num_heads, config, q) if table is None else table
    unmodded = structure if table is None else structure.replace(mask_mod=None)  # ranges: see _gated
    # delta_i = rowsum(dO_i * O_i): the softmax Jacobian's correction term.
    delta_blocks = jnp.einsum(
        "nhgqd,nhgqd->nhgq",
        do_blocks.astype(acc),
        _q_blocks(out, num_kv_heads, config).astype(acc),
    ).reshape(lse_blocks.shape)  # [nq, H, Bq]

    def one_kv_block(carry, j):
        dq_all, dbias_all, d_consts = carry  # [nq, Hkv, G, Bq, Dh] f32, [Hb, Lq', Lk'] f32 or None, ...
        k_blk, v_blk = k_blocks[j], v_blocks[j]

        def tile(i, small, masked, k_blk=k_blk, v_blk=v_blk):
            """Tile (i, j): `(dk, dv, d_consts)` updated, and this tile's `dq` and `d bias`."""
            dk, dv, d_consts = small
            q_blk, do_blk = q_blocks[i], do_blocks[i]
            if masked:
                visible = _block_mask(
                    i, j, mask_b, structure, config, num_heads=num_heads
                )  # [H or 1, Bq, Bk]
                k_blk, v_blk = _zero_unseen(visible, k_blk, v_blk)
            capped = _scores(q_blk, k_blk, post_scale, config.softcap)
            s = _alibi(capped, slopes, i, j * config.block_k, structure, config)  # its derivative: 1
            if config.score_mod is not None:  # its VJP, this tile's: to the scores and the closure
                modify = lambda s, c: _modified(s, c, i, j * config.block_k, structure, config)
                s, pull = jax.vjp(modify, s, consts)
            p = jnp.exp(_plus(s, _slice_block(bias_b, i, j, config)) - lse_blocks[i][..., None])
            if masked:
                p = jnp.where(visible, p, 0.0)
            p_g = _grouped(p, hkv)
            dv = dv + jnp.einsum("hgqk,hgqd->hkd", p_g.astype(v.dtype), do_blk, preferred_element_type=acc)
            dp = jnp.einsum("hgqd,hkd->hgqk", do_blk, v_blk, preferred_element_type=acc)
            ds = p_g * (dp - _grouped(delta_blocks[i], hkv)[..., None])  # [Hkv, G, Bq, Bk]
            # Through the soft-cap: d(cap·tanh(s/cap))/ds = 1 - tanh² = 1 - (capped/cap)².
            d_raw = ds
            if config.score_mod is not None:
                d_s, d_c = pull(ds.reshape(s.shape).astype(s.dtype))
                d_raw = _grouped(d_s, hkv)
                d_consts = jax.tree.map(lambda total, d: total + d.astype(total.dtype), d_consts, d_c)
            if config.softcap is not None:
                d_raw = d_raw * (1 - jnp.square(_grouped(capped, hkv) / config.softcap))
            # q_blk carries the scale when it was folded in; else scale dk below.
            dk = dk + jnp.einsum("hgqk,hgqd->hkd", d_raw.astype(q.dtype), q_blk, preferred_element_type=acc)
            dq_blk = jnp.einsum("hgqk,hkd->hgqd", d_raw.astype(k.dtype), k_blk, preferred_element_type=acc)
            ds_h = None
            if bias_b is not None:
                ds_h = ds.reshape(-1, config.block_q, config.block_k)
                ds_h = ds_h if bias_b.shape[0] > 1 else ds_h.sum(0, keepdims=True)
            return (dk, dv, d_consts), dq_blk, ds_h

        states = None if table is None else table[:, j]

        def step(i, inner, masked):
            dk, dv, dq_all, dbias_all, d_consts = inner
            small = (dk, dv, d_consts)
            if states is None:
                small, dq_blk, ds_h = tile(i, small, masked)
            else:  # the mask function's tile state; the big accumulators stay out of the switch

                def empty(i, small):
                    shape = (bias_b.shape[0], config.block_q, config.block_k) if bias_b is not None else None
                    zero_bias = None if shape is None else jnp.zeros(shape, acc)
                    return small, jnp.zeros_like(q_blocks[0], acc), zero_bias

                branches = [
                    empty,
                    lambda i, small: tile(i, small, True),
                    lambda i, small: tile(i, small, masked),
                ]
                small, dq_blk, ds_h = jax.lax.switch(states[i], branches, i, small)
            dk, dv, d_consts = small
            dq_all = dq_all.at[i].add(dq_blk)
            if dbias_all is not None:
                start = (jnp.int32(0), i * config.block_q, j * config.block_k)
                old = jax.lax.dynamic_slice(dbias_all, start, ds_h.shape)
                dbias_all = jax.lax.dynamic_update_slice(dbias_all, old + ds_h, start)
            return dk, dv, dq_all, dbias_all, d_consts

        lo, flo, fhi, hi = _q_blocks_of(j, unmodded, mask_b is not None, config)
        zeros = jnp.zeros_like(k_blk, acc)  # *_like: see the forward's carries
        inner = (zeros, zeros, dq_all, dbias_all, d_consts)
        dk, dv, dq_all, dbias_all, d_consts = _three_segments(step, lo, flo, fhi, hi, inner)
        return (dq_all, dbias_all, d_consts), (dk if post_scale is None else dk * post_scale, dv)

    dq0 = jnp.zeros_like(q_blocks, acc)
    dbias0 = None if bias_b is None else jnp.zeros_like(bias_b, acc)
    d_consts0 = tuple(jnp.zeros_like(c, jnp.promote_types(c.dtype, jnp.float32)) for c in consts)
    (dq_blocks, dbias, d_consts), (dk_blocks, dv_blocks) = jax.lax.scan(
        one_kv_block, (dq0, dbias0, d_consts0), jnp.arange(k_blocks.shape[0], dtype=jnp.int32)
    )
    # A closure's values are shared by every example and device: their cotangents add up.
    d_consts = tuple(sum_like(d.astype(c.dtype), c) for d, c in zip(d_consts, consts, strict=True))
    dq = _q_unblock(dq_blocks * config.scale, config.length_q).astype(q.dtype)
    dk = _kv_unblock(dk_blocks, config.length_k).astype(k.dtype)
    dv = _kv_unblock(dv_blocks, config.length_k).astype(v.dtype)
    if dbias is not None:
        dbias = dbias[:, : config.length_q, : config.length_k].astype(bias.dtype)
    d_sinks = None
    if sinks is not None:  # padded query rows have d_out 0, so delta 0: they add nothing
        p_sink = jnp.exp(sinks.astype(acc)[None, :, None] - lse_blocks)  # [nq, H, Bq]
        d_sinks = -jnp.sum(p_sink * delta_blocks, axis=(0, 2)).astype(sinks.dtype)  # [H]
        d_sinks = sum_like(d_sinks, sinks)
    return dq, dk, dv, None, dbias, None, d_sinks, d_consts, None


def sum_like(cotangent: Array, primal: Array) -> Array:
    """`cotangent` summed over the mesh axes it varies along and `primal` does not: inside
    `jax.shard_map`, a parameter replicated over an axis (sinks over the sequence) gets every
    device's share, as the transpose of its implicit broadcast would give it."""
    manual = lambda x: jax.typeof(x).manual_axis_type.varying
    extra = tuple(sorted(manual(cotangent) - manual(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


# ---------------------------------------------------------------------------
# The differentiable op


def _one_example_at_a_time(fn, config: Config):
    """Under `jax.vmap`, loop over the batch instead of widening every tile by B:
    `[B, H, Bq, Bk]` tiles fall out of cache and run slower per example
    (README, "Where the time goes"). Not for one block of queries (decoding),
    whose tiles are small and whose loop would copy each example's keys out of
    the batch. Only with a single device: a loop over the batch cannot be
    partitioned, so with several devices a batch sharded by `jit` would be
    gathered onto each."""
    if jax.device_count() > 1 or config.length_q <= config.block_q:
        return fn
    return jax.custom_batching.sequential_vmap(fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _flash(q, k, v, mask, bias, structure, sinks, consts, table, config):
    forward = _one_example_at_a_time(functools.partial(_forward, config=config), config)
    return forward(q, k, v, mask, bias, structure, sinks, consts, table)[0]


def _flash_fwd(q, k, v, mask, bias, structure, sinks, consts, table, config):
    forward = _one_example_at_a_time(functools.partial(_forward, config=config), config)
    out, lse = forward(q, k, v, mask, bias, structure, sinks, consts, table)
    return out, (q, k, v, mask, bias, structure, sinks, consts, table, out, lse)


def _flash_bwd(config, residuals, d_out):
    return _one_example_at_a_time(functools.partial(_backward, config), config)(residuals, d_out)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------
# One piece of a larger attention (mha_jax.parallel.ring)
#
# When the keys are split across devices, each device attends to one chunk at a
# time and the partial results merge through their log-sum-exp; the backward of
# each chunk needs the *total* out and lse. These three functions expose the
# forward and backward above for one chunk, without a VJP of their own.


def attention_with_lse(
    q: Array,  # [Lq, H, Dh]
    k: Array,  # [Lk, Hkv, Dh]
    v: Array,  # [Lk, Hkv, Dh]
    *,
    structure: Structure,
    options: Options | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[Array, Array]:  # [Lq, H, Dh], [Lq, H] float32
    """The forward over these keys only: `(out, lse)` with `lse = log Σ exp(score)` over
    the visible keys, `-inf` (and `out` zero) for a row that sees none of them.

    Two pieces merge as `lse = logaddexp(lse_a, lse_b)`,
    `out = out_a·exp(lse_a - lse) + out_b·exp(lse_b - lse)`. No VJP: a caller that
    differentiates defines one with `attention_backward_with_lse`."""
    config, structure = _setup(q, k, structure, options or Options(), block_sizes)
    out, lse_blocks = _forward(q, k, v, None, None, structure, None, (), None, config)
    nq, num_heads, block_q = lse_blocks.shape
    lse = lse_blocks.transpose(0, 2, 1).reshape(nq * block_q, num_heads)[: config.length_q]  # [Lq, H]
    # The kernel marks a row that saw nothing with +inf (its recomputed probabilities
    # are then 0); as a log-sum-exp over no key, it is -inf.
    return out, jnp.where(lse == jnp.inf, -jnp.inf, lse)


def attention_backward_with_lse(
    q: Array,  # [Lq, H, Dh]
    k: Array,  # [Lk, Hkv, Dh]
    v: Array,  # [Lk, Hkv, Dh]
    out: Array,  # [Lq, H, Dh] the total output, over every key
    lse: Array,  # [Lq, H] the total log-sum-exp, over every key
    d_out: Array,  # [Lq, H, Dh]
    *,
    structure: Structure,
    options: Options | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[Array, Array, Array]:  # dq [Lq, H, Dh], dk, dv [Lk, Hkv, Dh]
    """This piece's share of the gradients of an attention whose total `out` and
    `lse` span more keys than `k` holds: the probabilities recomputed from the total
    `lse` are the total softmax's, and `delta = rowsum(d_out·out)` is the total's too,
    so the pieces' `dq` add up to the whole `dq`, and each `dk`, `dv` is exact."""
    config, structure = _setup(q, k, structure, options or Options(), block_sizes)
    nq = _round_up(config.length_q, config.block_q) // config.block_q
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # back to the kernel's mark for "saw nothing"
    lse_blocks = _pad_axis(lse, 0, nq * config.block_q, jnp.inf)
    lse_blocks = lse_blocks.reshape(nq, config.block_q, -1).transpose(0, 2, 1)  # [nq, H, Bq]
    residuals = (q, k, v, None, None, structure, None, (), None, out, lse_blocks)
    dq, dk, dv, *_ = _backward(config, residuals, d_out)
    return dq, dk, dv


def visited_blocks(
    structure: Structure,
    length_q: int,
    length_k: int,
    block_sizes: tuple[int, int] | None = None,
) -> Array:
    """How many (query block, key block) tiles the forward computes for this structure
    (int32 scalar): the kernel's work, read from the same loop bounds it runs."""
    block_q, block_k = block_sizes or default_block_sizes(length_q, length_k)
    config = Config(block_q, block_k, length_q, length_k, 1.0)
    kv_length = length_k if structure.kv_length is None else structure.kv_length
    rules = structure.replace(
        q_offset=jnp.asarray(structure.q_offset, jnp.int32),
        kv_length=jnp.clip(jnp.asarray(kv_length, jnp.int32), 0, length_k),
    )
    rows = jnp.arange(_round_up(length_q, block_q) // block_q, dtype=jnp.int32)
    lo, _, _, hi = _kv_blocks_of(rows, rules, False, config)
    return jnp.sum(hi - lo)
