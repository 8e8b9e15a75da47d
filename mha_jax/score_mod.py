"""User score functions (`Options(score_mod=fn)`), FlexAttention's `score_mod` for JAX.

    fn(score, head, q_idx, kv_idx) -> score      each argument a scalar (float32, int32 x3)

`fn` is written for one entry of the scores, as in torch: the kernels lift it with
`jax.vmap` over the heads, the query rows and the keys of a tile, so any scalar JAX code
works, indexing included (`score + table[head, q_idx - kv_idx]`). `head` is the layer's
head index (a mesh device's heads are a slice: `Structure.head_offset`), `q_idx` and
`kv_idx` the rules' positions (`i + q_offset`, `j + k_offset`: global on a ring or in a
cache). It applies after the soft-cap and ALiBi, before the bias and the mask.

It may close over arrays (a learnable bias table, per-document data). The reference and
scan kernels are plain JAX: autodiff sees through them. (Inside `jax.shard_map` the mesh
paths refuse a closure that is being differentiated: `refuse_learning_on_a_mesh`.) The
blockwise kernel has its own VJP, so `closure` hoists the closed-over values that take
part in differentiation (`jax.closure_convert`) into explicit arguments, and its backward
takes the VJP of `fn` tile by tile and adds up their cotangents: a learnable table trains
at O(L) memory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array


def apply(
    fn: Callable, scores: Array, heads: Array, q_pos: Array, k_pos: Array, consts=(), axes=None
) -> Array:
    """`scores [H, Lq, Lk]` -> `fn` of each entry, with `heads [H]`, `q_pos [Lq]`, `k_pos [Lk]`
    (int32) and, for a closure-converted `fn`, its hoisted values `consts` and the mesh axes
    it was traced with its arguments varying over (`closure`)."""
    # Inside `jax.shard_map` the arguments must vary over the same mesh axes, and a converted
    # fn's over the axes it was traced with: it is a jaxpr, its constants marked for them.
    # (The consts go in as they were traced: the jaxpr marks them itself.)
    args = same_varying(scores, heads.astype(jnp.int32), q_pos.astype(jnp.int32), k_pos.astype(jnp.int32),
                         axes=axes)  # fmt: skip
    one = lambda s, h, q, k: fn(s, h, q, k, *consts)
    over_keys = jax.vmap(one, in_axes=(0, None, None, 0))
    over_rows = jax.vmap(over_keys, in_axes=(0, None, 0, None))
    over_heads = jax.vmap(over_rows, in_axes=(0, 0, None, None))
    return over_heads(*args).astype(scores.dtype)


def closure(fn: Callable, dtype, axes: frozenset = frozenset()) -> tuple[Callable, list[Array], frozenset]:
    """`(fn(score, head, q, k, *consts), consts, axes)`: the closed-over values of `fn` that
    take part in differentiation, as explicit arguments (none: `consts` is empty), and the
    mesh axes to call it with (`axes` and those the consts vary over)."""
    while True:
        score, index = same_varying(jnp.zeros((), dtype), jnp.zeros((), jnp.int32), axes=axes)
        converted, consts = jax.closure_convert(fn, score, index, index, index)
        if varying_axes(consts) <= axes:
            return converted, consts, axes
        axes = axes | varying_axes(consts)


def varying_axes(*trees) -> frozenset:
    """The mesh axes any array of the trees varies over, inside `jax.shard_map` (else none)."""
    return frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in jax.tree.leaves(trees)))


def same_varying(*arrays, axes=None):
    """The arrays, each marked as varying over `axes` (None: every axis any of them varies over)."""
    axes = varying_axes(arrays) if axes is None else axes
    manual = lambda a: jax.typeof(a).manual_axis_type.varying
    mark = lambda a: (
        jax.lax.pcast(a, tuple(sorted(axes - manual(a))), to="varying") if axes - manual(a) else a
    )
    return tuple(map(mark, arrays))


def refuse_learning_on_a_mesh(fn: Callable, axes: frozenset) -> None:
    """Inside `jax.shard_map`, the error for a closure whose values are being differentiated.

    Its gradient is each device's tiles' sum, summed over the devices: a closure traced as
    one jaxpr marks its values as varying inside itself, so each tile's VJP would end in a
    collective, and the devices' tile loops differ in length. Not built yet."""
    if axes and closure(fn, jnp.float32, axes)[1]:
        raise ValueError(
            "options.score_mod must close over no array that is being differentiated inside "
            "jax.shard_map (the mesh paths: ring, all-to-all, all-gather); it closes over "
            f"{len(closure(fn, jnp.float32, axes)[1])}. Learn such a table on one device, or "
            "close over a constant"
        )
