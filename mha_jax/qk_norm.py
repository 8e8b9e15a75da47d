"""RMSNorm with a learned scale, and QK-norm: RMSNorm of each head's Dh features.

    q [L, H, Dh] --qk_norm(scale [Dh])--> [L, H, Dh] --apply_rope--> scores

    rms_norm(x, scale) = x * rsqrt(mean(x², -1) + eps) * scale     (last axis)

computed in float32 (float64 stays float64), scale included, and cast back
to x's dtype once. Models differ in where and how:

    Qwen3, Gemma 3   per head, over Dh, before RoPE: `qk_norm` on [L, H, Dh].
    OLMo 2           over the whole projection, H*Dh, with one scale [H*Dh]:
                     `rms_norm` on [L, H*Dh] before `split_heads`.
    Gemma 3          stores w (initialised to 0) and applies `1 + w`
                     (`Gemma3RMSNorm`): pass `scale_plus_one=True` and the stored w.
                     Or convert once: scale = 1 + w, in float32 (`1 + w` in bf16 rounds).

Precision against HF transformers 4.57.1: `Gemma3RMSNorm` and `Olmo2RMSNorm`
multiply by the weight in float32 and cast once, as here. `Qwen3RMSNorm`
(like `LlamaRMSNorm`) casts the normalised x to the input dtype before
multiplying by the weight, so in bf16 it rounds twice; we round once (equal
in float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from mha_jax import _checks


def rms_norm(x: ArrayLike, scale: ArrayLike, *, eps: float = 1e-6, scale_plus_one: bool = False) -> Array:
    """RMSNorm over the last axis of `x [..., F]` with a learned `scale [F]`.

    eps:            added to the mean square inside the rsqrt (Qwen3, Gemma 3, OLMo 2: 1e-6).
    scale_plus_one: apply `1 + scale` (Gemma's storage convention) instead of `scale`.
    """
    x, scale = jnp.asarray(x), jnp.asarray(scale)
    _checks.check_floating("x", x)
    if x.ndim < 1:
        raise _checks.fail("x", "have at least one axis (the normalised features)", f"shape {x.shape}")
    _checks.check_shape("scale", scale, (x.shape[-1],), "[F] (x.shape[-1])")
    _checks.check_floating("scale", scale)
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise _checks.fail("eps", "be a positive finite number", repr(eps))
    if not isinstance(scale_plus_one, bool | np.bool_):  # a traced or string flag would be truthy
        raise TypeError(f"scale_plus_one must be a Python bool; got {scale_plus_one!r}")
    return rms_norm_unchecked(x, scale, eps=eps, scale_plus_one=scale_plus_one)


def rms_norm_unchecked(x: Array, scale: Array, *, eps: float, scale_plus_one: bool = False) -> Array:
    """`rms_norm` without its checks, for the data path (QK-norm of `[..., H, Dh]` heads: the
    public call checked the scales' shapes and eps once)."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    features = x.astype(compute)
    mean_square = jnp.mean(jnp.square(features), axis=-1, keepdims=True)
    weight = scale.astype(compute) + 1 if scale_plus_one else scale.astype(compute)
    return (features * jax.lax.rsqrt(mean_square + eps) * weight).astype(x.dtype)


def qk_norm(x: ArrayLike, scale: ArrayLike, *, eps: float = 1e-6, scale_plus_one: bool = False) -> Array:
    """`rms_norm` of each head of `x [L, H, Dh]` over its Dh features, one `scale [Dh]`
    shared by all heads (Qwen3's and Gemma 3's q_norm / k_norm); returns `[L, H, Dh]`."""
    x = jnp.asarray(x)
    _checks.check_rank("x", x, 3, "[L, H, Dh]")
    _checks.check_shape("scale", scale, (x.shape[-1],), "[Dh]")
    return rms_norm(x, scale, eps=eps, scale_plus_one=scale_plus_one)
