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
from typing import Literal, overload

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from mha_jax import _checks, _validate, kernels, masks
from mha_jax.frame import normalize_qk, rotate
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.params import MHAParams
from mha_jax.stages import merge_project, project_heads


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
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
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
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
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
    scale=None,
    dropout_rate=0.0,
    rng=None,
    deterministic=True,
    dtype=None,
    implementation="auto",
    return_weights=False,
    structure=None,
    options=None,
):
    """Multi-head attention over one sequence: `[Lq, D], [Lk, D_kv] -> [Lq, D_out]`.

    x_q:       [Lq, D] queries; x_kv: [Lk, D_kv] keys and values (default x_q).
    num_heads: H; the kv head count Hkv follows from `params.w_k`.
    mask:      bool [Lq, Lk] or [H, Lq, Lk], True = may attend.
    bias:      float [Lq, Lk] or [H, Lq, Lk] added to the scaled scores (-inf hides a key).
    is_causal, q_offset, kv_length, window: the mask rules, or `structure=Structure(...)`.
    scale, dropout_rate, dtype, implementation: the settings, or `options=Options(...)`.
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
    )
    params = _validate.as_params(params)
    x_q = _checks.as_array("x_q", x_q)
    x_kv = x_q if x_kv is None else _checks.as_array("x_kv", x_kv)
    mask = None if mask is None else _checks.as_array("mask", mask)
    bias = None if bias is None else _checks.as_array("bias", bias)
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
    )
    # A batch of one: the example's arrays gain a leading axis, its scalars are shared.
    one = lambda a: None if a is None else a[None]
    examples = (one(mask), one(bias), structure.q_offset, structure.kv_length, rng)
    axes = (_axis(mask), _axis(bias), None, None, None)
    out, weights = _forward(
        params,
        x_q[None],
        x_kv[None],
        examples,
        axes,
        rules=structure._replace(q_offset=0, kv_length=None),
        options=options,
        num_heads=num_heads,
        return_weights=return_weights,
    )
    out, weights = out[0], None if weights is None else weights[0]
    return (out, weights) if return_weights else out


def _axis(x, shared: bool = False) -> int | None:
    """vmap's in_axis for a per-example argument: 0, or None when absent, shared or a scalar."""
    return None if x is None or shared or jnp.ndim(x) == 0 else 0


def _forward(
    params,
    x_q,
    x_kv,
    examples,
    axes,
    *,
    rules: Structure,
    options: Options,
    num_heads: int,
    return_weights: bool,
) -> tuple[Array, Array | None]:
    """The data path over a batch, unchecked:
    `[B, Lq, D], [B, Lk, D_kv] -> (out [B, Lq, D_out], weights [B, H, Lq, Lk] or None)`.

    `examples` is (mask, bias, q_offset, kv_length, rng), each batched on axis 0
    or shared, as `axes` says; `rules` is the static part of the structure (a
    static q_offset stands when `examples` has none). Hiding inputs and the
    attention itself are per-example functions, lifted with `jax.vmap`; the
    projections are row-wise, so they take the batch as `B·L` rows.
    """

    def per_example(f, *arrays):  # f(*arrays, mask, bias, structure, rng) over the batch
        def one(*args):
            *arrays, mask, bias, q_offset, kv_length, rng = args
            structure = rules._replace(
                q_offset=rules.q_offset if q_offset is None else q_offset, kv_length=kv_length
            )
            return f(*arrays, mask, bias, structure, rng)

        return jax.vmap(one, in_axes=(0,) * len(arrays) + tuple(axes))(*arrays, *examples)

    dtype = x_q.dtype if options.dtype is None else options.dtype
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)

    def hide(x_q, x_kv, mask, bias, structure, rng):  # one example: zero what no query may see
        return zero_hidden_rows(x_q, x_kv, mask, bias, structure)

    x_q, x_kv = per_example(hide, x_q.astype(dtype), x_kv.astype(dtype))
    (batch, length_q, _), length_k = x_q.shape, x_kv.shape[1]
    num_kv_heads = params.w_k.shape[1] * num_heads // params.w_q.shape[1]

    # project_heads(x, w, b, H) = split_heads(project(x, w, b), H) on the B·L rows
    rows = lambda x: x.reshape(x.shape[0] * x.shape[1], x.shape[2])  # [B, L, D] -> [B·L, D]
    q = project_heads(rows(x_q), params.w_q, params.b_q, num_heads)  # [B·Lq, H, Dh]
    k = project_heads(rows(x_kv), params.w_k, params.b_k, num_kv_heads)  # [B·Lk, Hkv, Dh]
    v = project_heads(rows(x_kv), params.w_v, params.b_v, num_kv_heads)  # [B·Lk, Hkv, Dh]
    q, k = normalize_qk(params, q, k, options)
    unrows = lambda x, length: x.reshape(batch, length, *x.shape[1:])

    def attend(q, k, v, mask, bias, structure, rng):  # one example: RoPE, then the kernel call
        q = rotate(q, structure.q_offset, options.rope)  # query i at position i + q_offset
        k = rotate(k, 0, options.rope)  # key j at position j
        return kernels.attend(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            structure=structure,
            options=options,
            rng=rng,
            return_weights=return_weights,
        )

    heads, weights = per_example(attend, unrows(q, length_q), unrows(k, length_k), unrows(v, length_k))
    # merge_project(heads, w, b) = project(merge_heads(heads), w, b) on the B·Lq rows
    out = merge_project(heads.reshape(batch * length_q, *heads.shape[2:]), params.w_o, params.b_o)
    return unrows(out, length_q), weights  # [B, Lq, D_out]


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
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
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
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
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
    scale=None,
    dropout_rate=0.0,
    rng=None,
    deterministic=True,
    dtype=None,
    implementation="auto",
    return_weights=False,
    structure=None,
    options=None,
):
    """`attention` over a batch: `[B, Lq, D], [B, Lk, D_kv] -> [B, Lq, D_out]`, jitted.

    Per-example arguments gain a leading batch axis: `mask` and `bias` are
    `[B, Lq, Lk]` or `[B, H, Lq, Lk]` (a leading 1 shares one across the
    batch), `kv_length` is `[B]`, `q_offset` a Python int (static: fixed loop
    bounds, and kernels that need 0 can run) or an int array, scalar or `[B]`
    (traced). One dropout `rng` is split into one key per example. Returned
    weights are `[B, H, Lq, Lk]`. Equal settings reuse one compilation.
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
) -> tuple[Array, Array | None]:
    """`batched_attention` on settled values (the Flax modules call this):
    `(out [B, Lq, D_out], weights [B, H, Lq, Lk] or None)`."""
    arrays = [
        None if a is None else _checks.as_array(name, a)
        for name, a in (("x_q", x_q), ("x_kv", x_kv), ("mask", mask), ("bias", bias))
    ]
    static = isinstance(structure.q_offset, int)
    rules = structure._replace(q_offset=structure.q_offset if static else 0, kv_length=None)
    return _batched(
        _validate.as_params(params),
        *arrays,
        None if static else structure.q_offset,
        structure.kv_length,
        rng if options.dropout_rate > 0.0 else None,
        num_heads=num_heads,
        rules=rules,
        options=options,
        return_weights=return_weights,
    )


@functools.partial(jax.jit, static_argnames=("num_heads", "rules", "options", "return_weights"))
def _batched(
    params,
    x_q,
    x_kv,
    mask,
    bias,
    q_offset,
    kv_length,
    rng,
    *,
    num_heads: int,
    rules: Structure,
    options: Options,
    return_weights: bool,
):
    """The jitted batch: validated at trace time, then the data path `_forward`.
    `rules` holds the static part of the structure; `q_offset` (when traced) and
    `kv_length` come as arrays."""
    x_kv = x_q if x_kv is None else x_kv
    batch = x_q.shape[0] if jnp.ndim(x_q) else 0
    structure = rules._replace(q_offset=rules.q_offset if q_offset is None else q_offset, kv_length=kv_length)
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
        batch=batch,
    )
    rngs = None if rng is None else jax.random.split(rng, batch)
    # A leading axis of 1 (when B != 1) is shared by every example, not vmapped.
    shared = [x is not None and x.shape[0] == 1 and batch != 1 for x in (mask, bias)]
    mask, bias = (x[0] if share else x for x, share in zip((mask, bias), shared, strict=True))
    examples = (mask, bias, q_offset, kv_length, rngs)
    axes = (_axis(mask, shared[0]), _axis(bias, shared[1]), _axis(q_offset), _axis(kv_length), _axis(rngs))
    return _forward(
        params,
        x_q,
        x_kv,
        examples,
        axes,
        rules=rules,
        options=options,
        num_heads=num_heads,
        return_weights=return_weights,
    )
