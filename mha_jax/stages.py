"""One function per stage of the chapter, each for a single sequence.

    x [L, D] --project--> [L, H*Dh] --split_heads--> [L, H, Dh]
    q, k --attention_scores--> scores [H, Lq, Lk]     (float32, scaled)
    scores, mask --attention_weights--> weights [H, Lq, Lk]   (float32 softmax)
    weights, v --apply_weights--> heads [Lq, H, Dh] --merge_heads--> [Lq, H*Dh]

Grouped-query attention needs no copies of k and v: query head `h` reads
kv head `h // G` (G = H // Hkv), the grouping of jax.nn, Flax NNX and torch,
written as a reshape of the query heads into `[Hkv, G]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float

from mha_jax import _checks


def project(
    x: Float[Array, "L D_in"], w: Float[Array, "D_in D_out"], b: Float[Array, " D_out"] | None
) -> Float[Array, "L D_out"]:
    """`x @ w + b`: the chapter's multiplication by Wq, Wk, Wv (and Wo)."""
    _check_projection(x, w, b, "[L, D_in]")
    y = x @ w
    return y if b is None else y + b


def split_heads(x: Float[Array, "L HDh"], num_heads: int) -> Float[Array, "L H Dh"]:
    """`[L, H*Dh] -> [L, H, Dh]`: head `h` owns features `h*Dh:(h+1)*Dh`."""
    _checks.check_rank("x", x, 2, "[L, H*Dh]")
    _checks.check_positive("num_heads", num_heads)
    length, features = x.shape
    if features % num_heads:
        raise _checks.fail("num_heads", f"divide the {features} projected features", num_heads)
    return x.reshape(length, num_heads, features // num_heads)


def merge_heads(heads: Float[Array, "L H Dh"]) -> Float[Array, "L HDh"]:
    """`[L, H, Dh] -> [L, H*Dh]`, the inverse of `split_heads`."""
    _checks.check_rank("heads", heads, 3, "[L, H, Dh]")
    length, num_heads, head_dim = heads.shape
    return heads.reshape(length, num_heads * head_dim)


def project_heads(
    x: Float[Array, "N D_in"],
    w: Float[Array, "D_in HDh"],
    b: Float[Array, " HDh"] | None,
    num_heads: int,
) -> Float[Array, "N H Dh"]:
    """`split_heads(project(x, w, b), num_heads)` for `N` rows (one sequence's L, or
    a batch's B·L): the same maths in one of two forms, chosen by shape.

    With at least as many rows as features, one einsum over `w` viewed as
    `[D_in, H, Dh]` (Flax's kernel layout); with fewer, the plain matmul
    `x @ w` and a reshape. They are equal up to float rounding; what differs
    is the backward on XLA:CPU, which copies one operand into a transposed
    layout for the weight gradient: the einsum form copies the activations,
    the matmul form the weights' gradient side. Copying the smaller one wins:
    a small layer's train step (D=64, B·L=2048 rows) is ~15% faster with the
    einsum, the chapter's (D=768, B·L=64 rows) ~40% faster with the matmul
    (docs/bench_time.md; `scripts/bench.py`)."""
    _check_projection(x, w, b, "[N, D_in]")
    _checks.check_positive("num_heads", num_heads)
    features = w.shape[1]
    if features % num_heads:
        raise _checks.fail("num_heads", f"divide the {features} projected features", num_heads)
    return project_heads_unchecked(x, w, b, num_heads)


def project_heads_unchecked(x: Array, w: Array, b: Array | None, num_heads: int) -> Array:
    """`project_heads` without its checks, for the data path (the public call checked once)."""
    features = w.shape[1]
    if x.shape[0] < features:
        y = x @ w if b is None else x @ w + b
        return y.reshape(x.shape[0], num_heads, features // num_heads)
    y = jnp.einsum("ld,dhe->lhe", x, w.reshape(w.shape[0], num_heads, features // num_heads))
    return y if b is None else y + b.reshape(num_heads, -1)


def merge_project(
    heads: Float[Array, "N H Dh"], w: Float[Array, "HDh D_out"], b: Float[Array, " D_out"] | None
) -> Float[Array, "N D_out"]:
    """`project(merge_heads(heads), w, b)` for `N` rows, in the form that suits the
    shape (why: see `project_heads`)."""
    _checks.check_rank("heads", heads, 3, "[N, H, Dh]")
    length, num_heads, head_dim = heads.shape
    _check_projection(heads.reshape(length, num_heads * head_dim), w, b, "[N, H*Dh]", name="heads")
    return merge_project_unchecked(heads, w, b)


def merge_project_unchecked(heads: Array, w: Array, b: Array | None) -> Array:
    """`merge_project` without its checks, for the data path (the public call checked once)."""
    length, num_heads, head_dim = heads.shape
    if length < w.shape[1]:
        y = heads.reshape(length, num_heads * head_dim) @ w
    else:
        y = jnp.einsum("lhe,hef->lf", heads, w.reshape(num_heads, head_dim, w.shape[1]))
    return y if b is None else y + b


def attention_scores(
    q: Float[Array, "Lq H Dh"], k: Float[Array, "Lk Hkv Dh"], scale: float | None = None
) -> Float[Array, "H Lq Lk"]:
    """`q kᵀ * scale` per head, accumulated and returned in float32 (or wider).

    `scale` defaults to `1/sqrt(Dh)`. Accumulating in float32
    (`preferred_element_type`) matters more than a float32 softmax: logits
    accumulated in bf16 carry bf16's rounding (2^-8) in every product summed.
    """
    _checks.check_heads(q, k)
    if scale is not None:
        _checks.check_finite_real("scale", scale)
    length_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q, post_scale = fold_scale(q, head_dim**-0.5 if scale is None else scale)
    grouped = q.reshape(length_q, num_kv_heads, num_heads // num_kv_heads, head_dim)
    accumulate = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64
    scores = jnp.einsum("qhgd,khd->hgqk", grouped, k, preferred_element_type=accumulate)
    scores = scores.reshape(num_heads, length_q, k.shape[0])
    return scores if post_scale is None else scores * post_scale


def soft_cap(scores: Float[Array, "H Lq Lk"], cap: float | None) -> Float[Array, "H Lq Lk"]:
    """`cap · tanh(scores / cap)`: logits squashed smoothly into (-cap, cap) (Gemma 2);
    `None` leaves them as they are. In the scores' dtype (float32 or wider)."""
    return scores if cap is None else cap * jnp.tanh(scores / cap)


def fold_scale(q, scale: float):
    """`(q * scale, None)` where scaling the `[Lq, H, Dh]` queries can neither
    round nor overflow anything the float32 scores would not (float32 and wider;
    in bf16/f16 a power of two no larger than 1), else `(q, scale)` for the
    float32 scores: one pass over `Lq·Dh` numbers instead of `Lq·Lk`.

    A power of two above 1 could overflow f16 (65504) and 0 or a negative
    scale has no exact low-precision fold: those go to the float32 scores.
    """
    if jnp.finfo(q.dtype).bits >= 32 or (0 < scale <= 1 and math.log2(scale).is_integer()):
        return (q * jnp.asarray(scale, q.dtype)).astype(q.dtype), None
    return q, scale


def attention_weights(
    scores: Float[Array, "H Lq Lk"], mask: Bool[Array, "*#heads Lq Lk"] | None = None
) -> Float[Array, "H Lq Lk"]:
    """Softmax over keys in float32 (or wider); masked weights are exactly 0.

    A row with no visible key (every entry masked, or every visible score
    `-inf` from an additive bias) gets all-zero weights, hence a zero output
    and zero gradients: not NaN (`-inf` fill) and not the mean of V (finite fill).
    Masking uses `where`, so no large negative constant can overflow.
    """
    _checks.check_rank("scores", scores, 3, "[H, Lq, Lk]")
    _checks.check_floating("scores", scores)
    _checks.check_mask_and_bias(mask, None, *scores.shape)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    return _masked_softmax(scores, mask)


@jax.custom_jvp
def _masked_softmax(scores, mask):
    if mask is None:  # nothing to hide: no `where` over [H, Lq, Lk]
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        # A row whose scores are all -inf (an additive -inf bias) has nothing
        # to attend to: shift it by 0, so exp gives 0 rather than exp(nan).
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        unnormalised = jnp.exp(scores - row_max)
        total = unnormalised.sum(axis=-1, keepdims=True)
        return unnormalised / jnp.where(total > 0, total, 1.0)
    row_max = jnp.max(scores, axis=-1, keepdims=True, where=mask, initial=-jnp.inf)
    # Any per-row shift leaves the softmax unchanged; a fully masked row has
    # max -inf, so shift it by 0 instead.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    # Masked entries never reach `exp`: no overflow, no inf * 0.
    unnormalised = jnp.where(mask, jnp.exp(jnp.where(mask, scores - row_max, 0.0)), 0.0)
    total = unnormalised.sum(axis=-1, keepdims=True)
    return unnormalised / jnp.where(total > 0, total, 1.0)


@_masked_softmax.defjvp
def _masked_softmax_jvp(primals, tangents):
    # The softmax Jacobian, written once: dW = W * (dS - <W, dS>). Masked entries
    # have W = 0, so they pass no gradient; reverse mode transposes this rule,
    # which costs two passes over [H, Lq, Lk] instead of autodiff's many.
    scores, mask = primals
    d_scores, _ = tangents
    weights = _masked_softmax(scores, mask)
    d_scores = d_scores if mask is None else jnp.where(mask, d_scores, 0.0)
    return weights, weights * (d_scores - (weights * d_scores).sum(axis=-1, keepdims=True))


def dropout_weights(weights: Float[Array, "H Lq Lk"], rate: float, rng: Array) -> Float[Array, "H Lq Lk"]:
    """Inverted dropout on the attention weights, independent per head."""
    _checks.check_finite_real("rate", rate)
    if not 0.0 <= rate < 1.0:
        raise _checks.fail("rate", "lie in [0, 1)", rate)
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0).astype(weights.dtype)


def apply_weights(weights: Float[Array, "H Lq Lk"], v: Float[Array, "Lk Hkv Dh"]) -> Float[Array, "Lq H Dh"]:
    """`weights · v` per head: each query's weighted sum of the values."""
    _checks.check_rank("weights", weights, 3, "[H, Lq, Lk]")
    _checks.check_rank("v", v, 3, "[Lk, Hkv, Dh]")
    _checks.check_shape("v", v, (weights.shape[2], None, None), "[Lk, Hkv, Dh] (Lk of weights)")
    _checks.check_kv_heads("v", v, weights.shape[0])
    num_heads, length_q, length_k = weights.shape
    num_kv_heads = v.shape[1]
    grouped = weights.astype(v.dtype).reshape(num_kv_heads, num_heads // num_kv_heads, length_q, length_k)
    accumulate = jnp.promote_types(v.dtype, jnp.float32)
    heads = jnp.einsum("hgqk,khd->qhgd", grouped, v, preferred_element_type=accumulate)
    return heads.reshape(length_q, num_heads, v.shape[2]).astype(v.dtype)


def _check_projection(x, w, b, legend: str, name: str = "x") -> None:
    """`x [N, D_in] @ w [D_in, D_out] + b [D_out]`."""
    _checks.check_rank(name, x, 2, legend)
    _checks.check_rank("w", w, 2, "[D_in, D_out]")
    if x.shape[1] != w.shape[0]:
        raise _checks.fail(f"{name} and w", "agree on D_in (x [N, D_in], w [D_in, D_out])",
                           f"shapes {tuple(x.shape)} and {tuple(w.shape)}")  # fmt: skip
    if b is not None:
        _checks.check_shape("b", b, (w.shape[1],), "[D_out] (D_out of w)")
