"""Multi-head attention for one sequence, and its batched, jitted lift.

`attention` is the chapter as code: project, split heads, attend, merge,
output projection; `kernels.attend` is the one call to whichever kernel
computes `softmax(q kᵀ · scale) · v`. `batched_attention` is
`jax.jit(jax.vmap(attention))` with the parameters shared across the batch.

Both take friendly keywords, or the two values they stand for: the mask
rules as a `Structure`, the settings as `Options`. Either way the call is
validated once, at the boundary (`_validate`), and one value of each travels
to the unchecked per-example body, `_attention`.
"""

from __future__ import annotations

import functools
from typing import Literal, overload

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from mha_jax import _checks, _validate, kernels, masks
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.params import MHAParams
from mha_jax.stages import merge_project, project_heads


@overload
def attention(
    params: MHAParams, x_q: ArrayLike, x_kv: ArrayLike | None = None, *, num_heads: int,
    mask: ArrayLike | None = None, bias: ArrayLike | None = None, is_causal: bool = False,
    q_offset: int | ArrayLike = 0, kv_length: int | ArrayLike | None = None,
    window: int | tuple[int, int] | None = None, scale: float | None = None,
    dropout_rate: float = 0.0, rng: ArrayLike | None = None, deterministic: bool = True,
    dtype: DTypeLike | None = None, implementation: str = "auto",
    return_weights: Literal[False] = False, structure: Structure | None = None,
    options: Options | None = None,
) -> Array: ...  # fmt: skip
@overload
def attention(
    params: MHAParams, x_q: ArrayLike, x_kv: ArrayLike | None = None, *, num_heads: int,
    mask: ArrayLike | None = None, bias: ArrayLike | None = None, is_causal: bool = False,
    q_offset: int | ArrayLike = 0, kv_length: int | ArrayLike | None = None,
    window: int | tuple[int, int] | None = None, scale: float | None = None,
    dropout_rate: float = 0.0, rng: ArrayLike | None = None, deterministic: bool = True,
    dtype: DTypeLike | None = None, implementation: str = "auto",
    return_weights: Literal[True], structure: Structure | None = None,
    options: Options | None = None,
) -> tuple[Array, Array]: ...  # fmt: skip
def attention(
    params, x_q, x_kv=None, *, num_heads, mask=None, bias=None, is_causal=False, q_offset=0,
    kv_length=None, window=None, scale=None, dropout_rate=0.0, rng=None, deterministic=True,
    dtype=None, implementation="auto", return_weights=False, structure=None, options=None,
):  # fmt: skip
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
        structure, options, deterministic=deterministic, is_causal=is_causal, q_offset=q_offset,
        kv_length=kv_length, window=window, scale=scale, dropout_rate=dropout_rate, dtype=dtype,
        implementation=implementation,
    )  # fmt: skip
    x_q = _checks.as_array("x_q", x_q)
    x_kv = x_q if x_kv is None else _checks.as_array("x_kv", x_kv)
    mask = None if mask is None else _checks.as_array("mask", mask)
    bias = None if bias is None else _checks.as_array("bias", bias)
    _validate.check_call(params, x_q, x_kv, num_heads=num_heads, mask=mask, bias=bias,
                         structure=structure, options=options, rng=rng,
                         return_weights=return_weights)  # fmt: skip
    out, weights = _attention(params, x_q, x_kv, mask, bias, rng, structure=structure,
                              options=options, num_heads=num_heads,
                              return_weights=return_weights)  # fmt: skip
    return (out, weights) if return_weights else out


def _attention(params, x_q, x_kv, mask, bias, rng, *, structure: Structure, options: Options,
               num_heads: int, return_weights: bool) -> tuple[Array, Array | None]:  # fmt: skip
    """The data path of one example, unchecked: `(out [Lq, D_out], weights [H, Lq, Lk] or None)`."""
    dtype = x_q.dtype if options.dtype is None else options.dtype
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    x_q, x_kv = zero_hidden_rows(x_q.astype(dtype), x_kv.astype(dtype), mask, bias, structure)
    num_kv_heads = params.w_k.shape[1] * num_heads // params.w_q.shape[1]

    # project_heads(x, w, b, H) = split_heads(project(x, w, b), H), in one einsum
    q = project_heads(x_q, params.w_q, params.b_q, num_heads)  # [Lq, H, Dh]
    k = project_heads(x_kv, params.w_k, params.b_k, num_kv_heads)  # [Lk, Hkv, Dh]
    v = project_heads(x_kv, params.w_v, params.b_v, num_kv_heads)  # [Lk, Hkv, Dh]
    heads, weights = kernels.attend(q, k, v, mask=mask, bias=bias, structure=structure,
                                    options=options, rng=rng,
                                    return_weights=return_weights)  # [Lq, H, Dh] # fmt: skip
    out = merge_project(heads, params.w_o, params.b_o)  # = project(merge_heads(heads), ...) [Lq, D_out]
    return out, weights


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
    params: MHAParams, x_q: ArrayLike, x_kv: ArrayLike | None = None, *, num_heads: int,
    mask: ArrayLike | None = None, bias: ArrayLike | None = None, is_causal: bool = False,
    q_offset: int | ArrayLike = 0, kv_length: ArrayLike | None = None,
    window: int | tuple[int, int] | None = None, scale: float | None = None,
    dropout_rate: float = 0.0, rng: ArrayLike | None = None, deterministic: bool = True,
    dtype: DTypeLike | None = None, implementation: str = "auto",
    return_weights: Literal[False] = False, structure: Structure | None = None,
    options: Options | None = None,
) -> Array: ...  # fmt: skip
@overload
def batched_attention(
    params: MHAParams, x_q: ArrayLike, x_kv: ArrayLike | None = None, *, num_heads: int,
    mask: ArrayLike | None = None, bias: ArrayLike | None = None, is_causal: bool = False,
    q_offset: int | ArrayLike = 0, kv_length: ArrayLike | None = None,
    window: int | tuple[int, int] | None = None, scale: float | None = None,
    dropout_rate: float = 0.0, rng: ArrayLike | None = None, deterministic: bool = True,
    dtype: DTypeLike | None = None, implementation: str = "auto",
    return_weights: Literal[True], structure: Structure | None = None,
    options: Options | None = None,
) -> tuple[Array, Array]: ...  # fmt: skip
def batched_attention(
    params, x_q, x_kv=None, *, num_heads, mask=None, bias=None, is_causal=False, q_offset=0,
    kv_length=None, window=None, scale=None, dropout_rate=0.0, rng=None, deterministic=True,
    dtype=None, implementation="auto", return_weights=False, structure=None, options=None,
):  # fmt: skip
    """`attention` over a batch: `[B, Lq, D], [B, Lk, D_kv] -> [B, Lq, D_out]`, jitted.

    Per-example arguments gain a leading batch axis: `mask` and `bias` are
    `[B, Lq, Lk]` or `[B, H, Lq, Lk]` (a leading 1 shares one across the
    batch), `kv_length` is `[B]`, `q_offset` a Python int (static: fixed loop
    bounds, and kernels that need 0 can run) or an int array, scalar or `[B]`
    (traced). One dropout `rng` is split into one key per example. Returned
    weights are `[B, H, Lq, Lk]`. Equal settings reuse one compilation.
    """
    structure, options = _validate.settle(
        structure, options, deterministic=deterministic, is_causal=is_causal, q_offset=q_offset,
        kv_length=kv_length, window=window, scale=scale, dropout_rate=dropout_rate, dtype=dtype,
        implementation=implementation,
    )  # fmt: skip
    out, weights = batched(params, x_q, x_kv, num_heads=num_heads, mask=mask, bias=bias,
                           structure=structure, options=options, rng=rng,
                           return_weights=return_weights)  # fmt: skip
    return (out, weights) if return_weights else out


def batched(params, x_q, x_kv, *, num_heads, mask, bias, structure: Structure, options: Options,
            rng, return_weights: bool) -> tuple[Array, Array | None]:  # fmt: skip
    """`batched_attention` on settled values (the Flax modules call this):
    `(out [B, Lq, D_out], weights [B, H, Lq, Lk] or None)`."""
    arrays = [None if a is None else _checks.as_array(name, a)
              for name, a in (("x_q", x_q), ("x_kv", x_kv), ("mask", mask), ("bias", bias))]  # fmt: skip
    static = isinstance(structure.q_offset, int)
    rules = structure._replace(q_offset=structure.q_offset if static else 0, kv_length=None)
    return _batched(
        params, *arrays, None if static else structure.q_offset, structure.kv_length,
        rng if options.dropout_rate > 0.0 else None, num_heads=num_heads, rules=rules,
        options=options, return_weights=return_weights,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("num_heads", "rules", "options", "return_weights"))
def _batched(params, x_q, x_kv, mask, bias, q_offset, kv_length, rng, *, num_heads: int,
             rules: Structure, options: Options, return_weights: bool):  # fmt: skip
    """The jitted batch: validated at trace time, then `jax.vmap` of `_attention`.
    `rules` holds the static part of the structure; `q_offset` (when traced) and
    `kv_length` come as arrays."""
    x_kv = x_q if x_kv is None else x_kv
    batch = x_q.shape[0] if jnp.ndim(x_q) else 0
    structure = rules._replace(q_offset=rules.q_offset if q_offset is None else q_offset,
                               kv_length=kv_length)  # fmt: skip
    _validate.check_call(params, x_q, x_kv, num_heads=num_heads, mask=mask, bias=bias,
                         structure=structure, options=options, rng=rng,
                         return_weights=return_weights, batch=batch)  # fmt: skip
    rngs = None if rng is None else jax.random.split(rng, batch)
    # A leading axis of 1 (when B != 1) is shared by every example, not vmapped.
    shared = [x is not None and x.shape[0] == 1 and batch != 1 for x in (mask, bias)]
    mask, bias = (x[0] if share else x for x, share in zip((mask, bias), shared, strict=True))
    axis = lambda x, share=False: None if x is None or share or jnp.ndim(x) == 0 else 0
    in_axes = (0, 0, axis(mask, shared[0]), axis(bias, shared[1]), axis(q_offset), axis(kv_length),
               axis(rngs))  # fmt: skip

    def one(x_q, x_kv, mask, bias, q_offset, kv_length, rng):
        positions = structure._replace(q_offset=rules.q_offset if q_offset is None else q_offset,
                                       kv_length=kv_length)  # fmt: skip
        return _attention(params, x_q, x_kv, mask, bias, rng, structure=positions,
                          options=options, num_heads=num_heads, return_weights=return_weights)

    return jax.vmap(one, in_axes=in_axes)(x_q, x_kv, mask, bias, q_offset, kv_length, rngs)
