"""Multi-head attention for one sequence, and its batched, jitted lift.

`attention` is the chapter as code: project, split heads, attend, merge,
output projection; `kernels.attend` is the one call to whichever kernel
computes `softmax(q kᵀ · scale) · v`. `batched_attention` is its jitted lift
over a batch, with the parameters shared. Both run one data path, `_forward`:
the per-example steps (hiding padded inputs, the attention itself) lifted
with `jax.vmap`, the row-wise projections on all B·L rows at once.

Both take friendly keywords, or the two values they stand for: the mask
rules as a `Structure`, the settings as `Options`. Either way the call is
validated once, at the boundary (`_validate`), and one value of each travels
to the unchecked data path.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from mha_jax import _checks, _validate, frame, kernels, masks
from mha_jax.kernels.request import pin_platform
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.params import MHAParams
from mha_jax.rope import RoPE


@overload
def attention(
    params: MHAParams,
    x_q: ArrayLike,
    x_kv: ArrayLike | None = None,
    *,
    num_heads: int,
    mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    is_causal: bool = False,
    q_offset: int | ArrayLike = 0,
    kv_length: int | ArrayLike | None = None,
    window: int | tuple[int, int] | None = None,
    positions: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
    rope: RoPE | None = None,
    return_weights: Literal[False] = False,
    structure: Structure | None = None,
    options: Options | None = None,
) -> Array: ...
@overload
def attention(
    params: MHAParams,
    x_q: ArrayLike,
    x_kv: ArrayLike | None = None,
    *,
    num_heads: int,
    mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    is_causal: bool = False,
    q_offset: int | ArrayLike = 0,
    kv_length: int | ArrayLike | None = None,
    window: int | tuple[int, int] | None = None,
    positions: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
    rope: RoPE | None = None,
    return_weights: Literal[True],
    structure: Structure | None = None,
    options: Options | None = None,
) -> tuple[Array, Array]: ...
def attention(
    params,
    x_q,
    x_kv=None,
    *,
    num_heads,
    mask=None,
    bias=None,
    is_causal=False,
    q_offset=0,
    kv_length=None,
    window=None,
    positions=None,
    scale=None,
    dropout_rate=0.0,
    rng=None,
    deterministic=True,
    dtype=None,
    implementation="auto",
    rope=None,
    return_weights=False,
    structure=None,
    options=None,
):
    """Multi-head attention over one sequence: `[Lq, D], [Lk, D_kv] -> [Lq, D_out]`.

    x_q:       [Lq, D] queries; x_kv: [Lk, D_kv] keys and values (default x_q).
    num_heads: H; the kv head count Hkv follows from `params.w_k`.
    mask:      bool [Lq, Lk] or [H, Lq, Lk], True = may attend.
    bias:      float [Lq, Lk] or [H, Lq, Lk] added to the scaled scores (-inf hides a key).
    is_causal, q_offset, kv_length, window: the mask rules, or `structure=Structure(...)`
               (which also holds segment_ids, chunk and prefix).
    positions: int [Lq] RoPE positions (self-attention), or a pair ([Lq], [Lk]); default
               `q_offset + i` and `j`. Packed documents restart them. Needs `options.rope`.
    scale, dropout_rate, dtype, implementation, rope: the settings, or `options=Options(...)`
               (keywords fill in what the options leave at their defaults).
    rng, deterministic: dropout on the weights runs when not deterministic, with `rng`.
    return_weights: also return the weights [H, Lq, Lk] (same numbers either way).

    A query row with no visible key returns zero heads, with zero gradients.
    """
    structure, options = _validate.settle(
        structure,
        options,
        deterministic=deterministic,
        is_causal=is_causal,
        q_offset=q_offset,
        kv_length=kv_length,
        window=window,
        scale=scale,
        dropout_rate=dropout_rate,
        dtype=dtype,
        implementation=implementation,
        rope=rope,
    )
    params = _validate.as_params(params)
    x_q = _checks.as_array("x_q", x_q)
    x_kv = x_q if x_kv is None else _checks.as_array("x_kv", x_kv)
    mask = None if mask is None else _checks.as_array("mask", mask)
    bias = None if bias is None else _checks.as_array("bias", bias)
    positions = _validate.as_positions(positions)
    _validate.check_call(
        params,
        x_q,
        x_kv,
        num_heads=num_heads,
        mask=mask,
        bias=bias,
        structure=structure,
        options=options,
        rng=rng,
        return_weights=return_weights,
        positions=positions,
    )
    # A batch of one: the example's arrays gain a leading axis; the rules are shared.
    one = lambda a: None if a is None else a[None]
    examples = Examples(one(mask), one(bias), structure, rng)
    axes = Examples(_axis(mask), _axis(bias), SHARED, None)
    out, weights = _forward(
        params,
        x_q[None],
        x_kv[None],
        examples,
        axes,
        positions=None if positions is None else tuple(a[None] for a in _position_pair(positions)),
        options=options,
        num_heads=num_heads,
        return_weights=return_weights,
    )
    out, weights = out[0], None if weights is None else weights[0]
    return (out, weights) if return_weights else out


class Examples(NamedTuple):
    """What each example of a batch brings besides its inputs (vmapped, or shared). As axes:
    the structure's entry says whether its arrays are a batch's (BATCHED) or shared."""

    mask: Array | None
    bias: Array | None
    structure: Structure | str
    rng: Array | None


BATCHED, SHARED = "batched", "shared"  # a structure's axes: see structure_axis


def _axis(x, shared: bool = False) -> int | None:
    """vmap's in_axis for a per-example argument: 0, or None when absent, shared or a scalar."""
    return None if x is None or shared or jnp.ndim(x) == 0 else 0


def _position_pair(positions):
    """`(q [.., Lq], k [.., Lk])` from one array (self-attention) or a pair."""
    return tuple(positions) if isinstance(positions, tuple | list) else (positions, positions)


def _forward(
    params,
    x_q,
    x_kv,
    examples: Examples,
    axes: Examples,
    *,
    positions: tuple[Array, Array] | None,
    options: Options,
    num_heads: int,
    return_weights: bool,
) -> tuple[Array, Array | None]:
    """The data path over a batch, unchecked:
    `[B, Lq, D], [B, Lk, D_kv] -> (out [B, Lq, D_out], weights [B, H, Lq, Lk] or None)`.

    The layer frame (`frame.layer`) with the batched call's two per-example steps, lifted
    with `jax.vmap` over `examples` (each batched on axis 0 or shared, as `axes` says):
    hiding the inputs no query may see, and the kernel call. RoPE positions default to
    `q_offset + i` for queries and `k_offset + j` for keys.
    """

    # The rules go to vmap as their leaves (their ints and static rules stay in the treedef).
    leaves, treedef = jax.tree.flatten(examples.structure)
    leaf_axes = (
        [structure_axis(leaf) for leaf in leaves] if axes.structure is BATCHED else [None] * len(leaves)
    )

    def per_example(f, *arrays):  # f(*arrays, mask, bias, structure, rng) over the batch
        def one(*args):
            *arrays, mask, bias, leaves, rng = args
            return f(*arrays, mask, bias, jax.tree.unflatten(treedef, leaves), rng)

        in_axes = (0,) * len(arrays) + (axes.mask, axes.bias, leaf_axes, axes.rng)
        return jax.vmap(one, in_axes=in_axes)(*arrays, examples.mask, examples.bias, leaves, examples.rng)

    def hide(x_q, x_kv):  # one example at a time: zero what no query may see
        return per_example(lambda x_q, x_kv, mask, bias, structure, rng: zero_hidden_rows(
            x_q, x_kv, mask, bias, structure), x_q, x_kv)  # fmt: skip

    def attend(q, k, v, sinks):
        def one(q, k, v, mask, bias, structure, rng):
            return kernels.attend(q, k, v, mask=mask, bias=bias, sinks=sinks, structure=structure,
                                  options=options, rng=rng, return_weights=return_weights)  # fmt: skip

        return per_example(one, q, k, v)  # heads [B, Lq, H, Dh], weights [B, H, Lq, Lk] or None

    if options.rope is not None and positions is None:
        batch, structure = x_q.shape[0], examples.structure
        positions = (frame.default_positions(structure.q_offset, batch, x_q.shape[1]),
                     frame.default_positions(structure.k_offset, batch, x_kv.shape[1]))  # fmt: skip
    elif positions is not None:
        positions = tuple(jnp.broadcast_to(p, (x_q.shape[0], p.shape[1])) for p in positions)
    return frame.layer(params, x_q, x_kv, num_heads=num_heads, options=options, hide=hide, attend=attend,
                       positions=positions)  # fmt: skip


def zero_hidden_rows(x_q, x_kv, mask, bias, structure: Structure):
    """Zero the inputs that no query may see, and the queries that see nothing.

    Masking the scores cannot stop `0 * NaN` in `weights · v` or in the
    gradients when padding holds garbage (pytorch#101967); zeroing the rows
    first changes no visible number and keeps NaN in padding out of valid rows.
    "Hidden" is every way a key can be hidden: the mask, the structure (causal,
    window, kv_length) and a `-inf` bias. Without a mask or bias this is O(L).
    """
    length_q, length_k = x_q.shape[0], x_kv.shape[0]
    if mask is None and bias is None:
        if structure.is_trivial:
            return x_q, x_kv
        query_sees = structure.query_sees_any(length_q, length_k)
        key_seen = structure.key_seen_by_any(length_q, length_k)
    else:  # a dense mask or bias is [Lq, Lk] already: so is this
        per_head = masks.combine(mask, None if bias is None else bias > -jnp.inf)
        visible = per_head if per_head.ndim == 2 else per_head.any(axis=0)  # [Lq, Lk]
        if not structure.is_trivial:
            visible &= structure.allows(jnp.arange(length_q), jnp.arange(length_k))
        query_sees, key_seen = visible.any(axis=1), visible.any(axis=0)
    return jnp.where(query_sees[:, None], x_q, 0), jnp.where(key_seen[:, None], x_kv, 0)


@overload
def batched_attention(
    params: MHAParams,
    x_q: ArrayLike,
    x_kv: ArrayLike | None = None,
    *,
    num_heads: int,
    mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    is_causal: bool = False,
    q_offset: int | ArrayLike = 0,
    kv_length: ArrayLike | None = None,
    window: int | tuple[int, int] | None = None,
    positions: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
    rope: RoPE | None = None,
    return_weights: Literal[False] = False,
    structure: Structure | None = None,
    options: Options | None = None,
) -> Array: ...
@overload
def batched_attention(
    params: MHAParams,
    x_q: ArrayLike,
    x_kv: ArrayLike | None = None,
    *,
    num_heads: int,
    mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    is_causal: bool = False,
    q_offset: int | ArrayLike = 0,
    kv_length: ArrayLike | None = None,
    window: int | tuple[int, int] | None = None,
    positions: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
    rope: RoPE | None = None,
    return_weights: Literal[True],
    structure: Structure | None = None,
    options: Options | None = None,
) -> tuple[Array, Array]: ...
def batched_attention(
    params,
    x_q,
    x_kv=None,
    *,
    num_heads,
    mask=None,
    bias=None,
    is_causal=False,
    q_offset=0,
    kv_length=None,
    window=None,
    positions=None,
    scale=None,
    dropout_rate=0.0,
    rng=None,
    deterministic=True,
    dtype=None,
    implementation="auto",
    rope=None,
    return_weights=False,
    structure=None,
    options=None,
):
    """`attention` over a batch: `[B, Lq, D], [B, Lk, D_kv] -> [B, Lq, D_out]`, jitted.

    Per-example arguments gain a leading batch axis: `mask` and `bias` are
    `[B, Lq, Lk]` or `[B, H, Lq, Lk]` (a leading 1 shares one across the
    batch), `kv_length` is `[B]`, `q_offset` a Python int (static: fixed loop
    bounds, and kernels that need 0 can run) or an int array, scalar or `[B]`
    (traced); a structure's segment ids are `[B, L]` (or a pair), its prefix an int or
    `[B]`; `positions` is `[B, Lq]` (or `[1, Lq]`, shared; or a pair). One dropout
    `rng` is split into one key per example. Returned weights are `[B, H, Lq, Lk]`.
    Equal settings reuse one compilation.
    """
    structure, options = _validate.settle(
        structure,
        options,
        deterministic=deterministic,
        is_causal=is_causal,
        q_offset=q_offset,
        kv_length=kv_length,
        window=window,
        scale=scale,
        dropout_rate=dropout_rate,
        dtype=dtype,
        implementation=implementation,
        rope=rope,
    )
    out, weights = batched(
        params,
        x_q,
        x_kv,
        num_heads=num_heads,
        mask=mask,
        bias=bias,
        structure=structure,
        options=options,
        rng=rng,
        return_weights=return_weights,
        positions=positions,
    )
    return (out, weights) if return_weights else out


def batched(
    params,
    x_q,
    x_kv,
    *,
    num_heads,
    mask,
    bias,
    structure: Structure,
    options: Options,
    rng,
    return_weights: bool,
    positions=None,
) -> tuple[Array, Array | None]:
    """`batched_attention` on settled values (the Flax modules call this):
    `(out [B, Lq, D_out], weights [B, H, Lq, Lk] or None)`."""
    arrays = [
        None if a is None else _checks.as_array(name, a)
        for name, a in (("x_q", x_q), ("x_kv", x_kv), ("mask", mask), ("bias", bias))
    ]
    # The one value check that needs concrete values: inside the jit they are traced.
    masks.check_prefix(structure, jnp.shape(arrays[0] if arrays[1] is None else arrays[1])[-2])
    options = pin_platform(options)  # the target keys the compilation below
    return _batched(
        _validate.as_params(params),
        *arrays,
        structure,
        rng if options.dropout_rate > 0.0 else None,
        _validate.as_positions(positions),
        num_heads=num_heads,
        options=options,
        return_weights=return_weights,
    )


@functools.partial(jax.jit, static_argnames=("num_heads", "options", "return_weights"))
def _batched(
    params,
    x_q,
    x_kv,
    mask,
    bias,
    structure: Structure,
    rng,
    positions,
    *,
    num_heads: int,
    options: Options,
    return_weights: bool,
):
    """The jitted batch: validated at trace time, then the data path `_forward`. The
    structure travels whole: its static rules key the compilation, its arrays are traced."""
    x_kv = x_q if x_kv is None else x_kv
    batch = x_q.shape[0] if jnp.ndim(x_q) else 0
    _validate.check_call(
        params,
        x_q,
        x_kv,
        num_heads=num_heads,
        mask=mask,
        bias=bias,
        structure=structure,
        options=options,
        rng=rng,
        return_weights=return_weights,
        positions=positions,
        batch=batch,
    )
    rngs = None if rng is None else jax.random.split(rng, batch)
    # A leading axis of 1 (when B != 1) is shared by every example, not vmapped.
    shared = [x is not None and x.shape[0] == 1 and batch != 1 for x in (mask, bias)]
    mask, bias = (x[0] if share else x for x, share in zip((mask, bias), shared, strict=True))
    examples = Examples(mask, bias, structure, rngs)
    axes = Examples(_axis(mask, shared[0]), _axis(bias, shared[1]), BATCHED, _axis(rngs))
    return _forward(
        params,
        x_q,
        x_kv,
        examples,
        axes,
        positions=None if positions is None else _position_pair(positions),
        options=options,
        num_heads=num_heads,
        return_weights=return_weights,
    )


def structure_axis(leaf) -> int | None:
    """vmap's in_axis for one array of a batch's rules: 0 with a leading B (kv_length,
    q_offset and prefix `[B]`, segment ids `[B, L]`), None for a shared scalar."""
    return None if jnp.ndim(leaf) == 0 else 0
