"""Multi-head attention for one sequence, and its batched, jitted lift.

`attention` is the chapter as code: project, split heads, scores, softmax,
weights·V, merge, output projection. `batched_attention` is
`jax.jit(jax.vmap(attention))` with the parameters shared across the batch
and every batched argument checked *before* the vmap, so a mismatch gets our
message rather than vmap's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from mha_jax import _checks, implementations, masks
from mha_jax.masks import Structure, normalize_window
from mha_jax.params import MHAParams
from mha_jax.stages import (
    apply_weights,
    attention_scores,
    attention_weights,
    dropout_weights,
    merge_project,
    project_heads,
)


def attention(
    params: MHAParams,
    x_q: ArrayLike,
    x_kv: ArrayLike | None = None,
    *,
    num_heads: int,
    mask: ArrayLike | None = None,
    is_causal: bool = False,
    q_offset: int | ArrayLike = 0,
    kv_length: int | ArrayLike | None = None,
    window: int | tuple[int, int] | None = None,
    bias: ArrayLike | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: ArrayLike | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    dtype=None,
    implementation: str = "auto",
):
    """Multi-head attention over one sequence: `[Lq, D], [Lk, D_kv] -> [Lq, D_out]`.

    x_q:       [Lq, D] queries; x_kv: [Lk, D_kv] keys and values (default x_q).
    num_heads: H; the kv head count Hkv follows from `params.w_k`.
    mask:      bool [Lq, Lk] or [H, Lq, Lk], True = may attend.
    is_causal, q_offset, kv_length, window: mask structure (see `masks.Structure`).
    bias:      float [Lq, Lk] or [H, Lq, Lk] added to the scaled scores.
    scale:     multiplies q·kᵀ; default 1/sqrt(Dh).
    dropout_rate, rng, deterministic: dropout on the weights when not deterministic.
    return_weights: also return the weights [H, Lq, Lk] (same numbers either way).
    dtype:     compute dtype (default: x_q's); scores and softmax stay float32.
    implementation: "auto", "reference", "blockwise", "xla", "cudnn" or "pallas".

    A query row with no visible key returns zeros, with zero gradients.
    """
    x_q = _checks.as_array("x_q", x_q)
    x_kv = x_q if x_kv is None else _checks.as_array("x_kv", x_kv)
    mask = None if mask is None else _checks.as_array("mask", mask)
    bias = None if bias is None else _checks.as_array("bias", bias)
    sizes = check_arguments(
        params, x_q, x_kv, num_heads=num_heads, mask=mask, bias=bias, kv_length=kv_length,
        q_offset=q_offset, dropout_rate=dropout_rate, rng=rng, deterministic=deterministic,
    )  # fmt: skip
    check_settings(is_causal=is_causal, scale=scale, dtype=dtype, deterministic=deterministic,
                   return_weights=return_weights)  # fmt: skip
    structure = Structure(is_causal, q_offset, kv_length, normalize_window(window))
    dropout = 0.0 if deterministic else dropout_rate
    implementation = implementations.resolve(
        implementation, x_q, sizes, structure, mask=mask, bias=bias,
        dropout_rate=dropout, return_weights=return_weights, dtype=dtype,
    )  # fmt: skip
    dtype = jnp.result_type(x_q) if dtype is None else jnp.dtype(dtype)
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    x_q, x_kv = zero_hidden_rows(x_q.astype(dtype), x_kv.astype(dtype), mask, bias, structure)

    # project_heads(x, w, b, H) = split_heads(project(x, w, b), H), in one einsum
    q = project_heads(x_q, params.w_q, params.b_q, num_heads)  # [Lq, H, Dh]
    k = project_heads(x_kv, params.w_k, params.b_k, sizes["num_kv_heads"])  # [Lk, Hkv, Dh]
    v = project_heads(x_kv, params.w_v, params.b_v, sizes["num_kv_heads"])  # [Lk, Hkv, Dh]
    if implementation == "reference":
        heads, weights = reference_core(
            q, k, v, mask=mask, bias=bias, structure=structure, scale=scale,
            dropout_rate=dropout, rng=rng,
        )  # fmt: skip
    else:
        heads, weights = implementations.run(
            implementation, q, k, v, mask=mask, bias=bias, structure=structure, scale=scale
        ), None  # fmt: skip
    out = merge_project(heads, params.w_o, params.b_o)  # = project(merge_heads(heads), ...) [Lq, D_out]
    return (out, weights) if return_weights else out


def reference_core(q, k, v, *, mask, bias, structure, scale, dropout_rate, rng):
    """The spec: `softmax(q kᵀ / sqrt(Dh) + bias, where=mask) · v`, `[H, Lq, Lk]` in memory."""
    length_q, length_k = q.shape[0], k.shape[0]
    if length_q == 0 or length_k == 0:  # no query, or nothing to attend to: zeros
        return jnp.zeros_like(q), jnp.zeros((q.shape[1], length_q, length_k), v.dtype)
    if not structure.is_trivial:
        rules = structure.allows(jnp.arange(length_q), jnp.arange(length_k))  # [Lq, Lk]
        mask = rules if mask is None else mask & rules
    scores = attention_scores(q, k, scale)  # [H, Lq, Lk] float32
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    weights = attention_weights(scores, mask).astype(v.dtype)  # [H, Lq, Lk]
    kept = weights if dropout_rate == 0.0 else dropout_weights(weights, dropout_rate, rng)
    heads = apply_weights(kept, v)  # [Lq, H, Dh]
    return heads, weights


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


def check_arguments(
    params, x_q, x_kv, *, num_heads, mask, bias, kv_length, q_offset, dropout_rate, rng,
    deterministic, batch: tuple[int, ...] = (),
) -> dict[str, int]:  # fmt: skip
    """Validate one example (or, with `batch=(B,)`, a batch) before any maths runs."""
    lead = "[B, " if batch else "["
    if not isinstance(params, MHAParams):
        raise TypeError(f"params must be an mha_jax.MHAParams (e.g. MHAParams(**weights) for a "
                        f"dict); got {type(params).__name__}")  # fmt: skip
    _checks.check_positive("num_heads", num_heads)
    _checks.check_rank("x_q", x_q, len(batch) + 2, f"{lead}Lq, D]")
    _checks.check_rank("x_kv", x_kv, len(batch) + 2, f"{lead}Lk, D_kv]")
    _checks.check_floating("x_q", x_q)
    _checks.check_floating("x_kv", x_kv)
    length_q, d_model = x_q.shape[-2:]
    length_k, d_kv = x_kv.shape[-2:]

    q_features = params.w_q.shape[1]
    _checks.check_shape("params.w_q", params.w_q, (d_model, None), "[D, H*Dh]")
    _checks.check_divides("params.w_q.shape[1] (H*Dh)", q_features, "num_heads", num_heads)
    head_dim = q_features // num_heads
    _checks.check_shape("params.w_k", params.w_k, (d_kv, None), "[D_kv, Hkv*Dh]")
    kv_features = params.w_k.shape[1]
    _checks.check_divides("params.w_k.shape[1] (Hkv*Dh)", kv_features, "Dh", head_dim)
    num_kv_heads = kv_features // head_dim
    _checks.check_divides("num_heads", num_heads, "num_kv_heads", num_kv_heads)
    _checks.check_shape("params.w_v", params.w_v, (d_kv, kv_features), "[D_kv, Hkv*Dh]")
    _checks.check_shape("params.w_o", params.w_o, (q_features, None), "[H*Dh, D_out]")
    for name, width in (("b_q", q_features), ("b_k", kv_features), ("b_v", kv_features),
                        ("b_o", params.w_o.shape[1])):  # fmt: skip
        if getattr(params, name) is not None:
            _checks.check_shape(f"params.{name}", getattr(params, name), (width,), "[features]")

    per_example = [("[Lq, Lk]", (length_q, length_k)),
                   ("[H, Lq, Lk]", (num_heads, length_q, length_k))]  # fmt: skip
    if batch:  # a leading 1 is shared across the batch
        per_example = [(f"[{lead}, {legend[1:]}", (size, *shape))
                       for legend, shape in per_example
                       for lead, size in (("B", batch[0]), ("1", 1))]  # fmt: skip
    if mask is not None:
        _checks.check_bool("mask", mask)
        _checks.check_one_of_shapes("mask", mask, per_example)
    if bias is not None:
        _checks.check_floating("bias", bias)
        _checks.check_one_of_shapes("bias", bias, per_example)
    if kv_length is not None:
        _checks.check_integer("kv_length", kv_length)
        _checks.check_shape("kv_length", kv_length, batch, "[B]" if batch else "[] (a scalar)")
    _checks.check_integer("q_offset", q_offset)
    if jnp.ndim(q_offset) not in ((0, len(batch)) if batch else (0,)):
        raise _checks.fail("q_offset", "be a scalar" + (" or have shape [B]" if batch else ""),
                           f"shape {jnp.shape(q_offset)}")  # fmt: skip
    if batch and jnp.ndim(q_offset) == 1:
        _checks.check_shape("q_offset", q_offset, batch, "[B]")
    if not 0.0 <= dropout_rate < 1.0:
        raise _checks.fail("dropout_rate", "lie in [0, 1)", dropout_rate)
    if dropout_rate > 0.0 and not deterministic and rng is None:
        raise ValueError("rng must be given when dropout_rate > 0 and deterministic=False; got None")
    return dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                length_q=length_q, length_k=length_k)  # fmt: skip


def check_settings(*, is_causal, scale, dtype, deterministic, return_weights) -> None:
    """The static settings: real bools, a finite real scale, a floating dtype."""
    for name, flag in (("is_causal", is_causal), ("deterministic", deterministic),
                       ("return_weights", return_weights)):  # fmt: skip
        _checks.check_bool_flag(name, flag)
    if scale is not None and not (isinstance(scale, int | float | np.integer | np.floating)
                                  and not isinstance(scale, bool) and np.isfinite(scale)):  # fmt: skip
        raise TypeError(f"scale must be a finite real number or None; got {scale!r}")
    if dtype is not None:
        try:
            dtype = jnp.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be a floating dtype or None; got {dtype!r}") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype or None; got {dtype}")


_STATIC = ("num_heads", "is_causal", "static_q_offset", "window", "scale", "dropout_rate",
           "deterministic", "return_weights", "dtype", "implementation")  # fmt: skip


def batched_attention(params: MHAParams, x_q: ArrayLike, x_kv: ArrayLike | None = None, *,
                      q_offset: int | ArrayLike = 0, **options):  # fmt: skip
    """`attention` over a batch: `[B, Lq, D], [B, Lk, D_kv] -> [B, Lq, D_out]`, jitted.

    Takes the keyword arguments of `attention`. Per-example arguments gain a
    leading batch axis: `mask` and `bias` are `[B, Lq, Lk]` or `[B, H, Lq, Lk]`
    (a leading 1 shares one across the batch), `kv_length` is `[B]`, `q_offset`
    a Python int (static) or an int array, scalar or `[B]` (traced). One dropout
    `rng` is split into one key per example. Returned weights are `[B, H, Lq, Lk]`.
    """
    if isinstance(q_offset, int):  # static: fixed loop bounds, and kernels that need 0 can run
        return _batched_attention(params, x_q, x_kv, static_q_offset=q_offset, **options)
    return _batched_attention(params, x_q, x_kv, q_offset=q_offset, **options)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _batched_attention(
    params: MHAParams,
    x_q: Array,
    x_kv: Array | None = None,
    *,
    num_heads: int,
    mask: Array | None = None,
    is_causal: bool = False,
    q_offset: Array | None = None,
    static_q_offset: int = 0,
    kv_length: Array | None = None,
    window: int | tuple[int, int] | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    rng: Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    dtype=None,
    implementation: str = "auto",
):
    x_kv = x_q if x_kv is None else x_kv
    batch_size = x_q.shape[0] if jnp.ndim(x_q) else 0
    check_arguments(
        params, x_q, x_kv, num_heads=num_heads, mask=mask, bias=bias, kv_length=kv_length,
        q_offset=static_q_offset if q_offset is None else q_offset, dropout_rate=dropout_rate,
        rng=rng, deterministic=deterministic, batch=(batch_size,),
    )  # fmt: skip
    if x_kv.shape[0] != batch_size:
        raise _checks.fail("x_kv", f"have the batch size of x_q (B={batch_size})",
                           f"shape {x_kv.shape}")  # fmt: skip
    rngs = None if rng is None else jax.random.split(rng, batch_size)
    # A leading axis of 1 (when B != 1) is shared by every example, not vmapped.
    shared = lambda x: x is not None and x.shape[0] == 1 and batch_size != 1
    q_offset_axis = None if q_offset is None or jnp.ndim(q_offset) == 0 else 0

    def one(x_q, x_kv, mask_, bias_, kv_length, q_offset_, rng):
        return attention(
            params, x_q, x_kv, num_heads=num_heads, is_causal=is_causal,
            mask=mask[0] if shared(mask) else mask_, bias=bias[0] if shared(bias) else bias_,
            q_offset=static_q_offset if q_offset is None else q_offset_,
            kv_length=kv_length, window=window, scale=scale, dropout_rate=dropout_rate,
            rng=rng, deterministic=deterministic, return_weights=return_weights, dtype=dtype,
            implementation=implementation,
        )  # fmt: skip

    axis = lambda x: None if x is None or shared(x) else 0
    in_axes = (0, 0, axis(mask), axis(bias), axis(kv_length), q_offset_axis, axis(rngs))
    return jax.vmap(one, in_axes=in_axes)(x_q, x_kv, mask, bias, kv_length, q_offset, rngs)
