"""The settings that shape one attention call's computation, as one value.

`Options` is frozen and hashable: it is what keys the compile cache of
`batched_attention`, and what travels from the public call to the kernel.
Validating it is constructing it, so every setting is checked once, where it
is written, with a message that names it:

    options = Options(scale=0.125, implementation="blockwise")
    out = mha_jax.batched_attention(params, x, num_heads=12, options=options)

Adding a setting (a soft-cap, a RoPE configuration) means: a field and its
check here, the one place that uses it, and its test.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from mha_jax import _checks
from mha_jax.rope import RoPE

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "xla", "cudnn", "pallas", "scan")
PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Options:
    """scale:          multiplies q·kᵀ; None means 1/sqrt(Dh). Any finite real (0 and
                       negative included).
    dropout_rate:   dropout on the attention weights, in [0, 1); applied only in a
                    call with deterministic=False (the call passes a dropout rng).
    dtype:          compute dtype (None: the queries' dtype); scores and softmax
                    stay float32 (float64 for float64).
    implementation: "auto", "reference", "blockwise", "xla", "cudnn" or "pallas"
                    (see `mha_jax.kernels`).
    softcap:        logit soft-capping `cap · tanh(scores / cap)` of the scaled scores,
                    before the bias and the mask (Gemma 2); None: off.
    rope:           rotary position embeddings (`mha_jax.decoding.RoPE`) applied to q and
                    k after the head split (and QK-norm): query i sits at position
                    i + q_offset, key j at j; a KV cache stores its keys rotated. None: off.
    qk_norm_eps:    the epsilon of the QK-norm (used when the params hold q_norm, k_norm).
    alibi:          ALiBi (BLOOM, MPT): head h's scores get `slope_h · (t - p)` (key position
                    t, query position p) after the soft-cap, before the bias and the mask,
                    with BLOOM's slopes (`mha_jax.alibi`). True: the slopes of the call's
                    heads; an int n: of an n-head layer, when the call holds some of its
                    heads (the layers on a mesh set it). False: off.
    score_mod:      a user score function `fn(score, head, q_idx, kv_idx) -> score`, written
                    for one entry (FlexAttention's `score_mod`; `mha_jax.score_mod`), after
                    ALiBi, before the bias and the mask; it may close over arrays, whose
                    gradients flow. None: off.
    platform:       the target the kernels are chosen and lowered for: "cpu", "gpu" or
                    "tpu"; None: the device of the current mesh (`jax.set_mesh`), else
                    `jax.default_backend()` (`mha_jax.kernels.request.resolve_platform`).
                    Set it to lower for an accelerator from a CPU
                    (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`).
    compute_capability: the GPU's (major, minor), e.g. (9, 0) for Hopper; None: the
                    device's when a GPU is attached, else (8, 0) (Ampere). Only with
                    platform "gpu" (or a GPU backend).
    """

    scale: float | None = None
    dropout_rate: float = 0.0
    dtype: Any = None
    implementation: str = "auto"
    softcap: float | None = None
    rope: RoPE | None = None
    qk_norm_eps: float = 1e-6
    alibi: bool | int = False
    score_mod: Callable | None = None
    platform: str | None = None
    compute_capability: tuple[int, int] | None = None

    def __post_init__(self):
        scale, rate = self.scale, self.dropout_rate
        is_real = lambda v: (
            isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)
        )
        if scale is not None and not (is_real(scale) and math.isfinite(scale)):
            raise TypeError(f"scale must be a finite real number or None; got {scale!r}")
        if not (is_real(rate) and 0.0 <= rate < 1.0):
            raise _checks.fail("dropout_rate", "lie in [0, 1)", rate)
        _checks.check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        cap = self.softcap
        if cap is not None and not (is_real(cap) and math.isfinite(cap) and cap > 0):
            raise _checks.fail("softcap", "be a positive finite number or None", repr(cap))
        if self.rope is not None and not isinstance(self.rope, RoPE):
            raise TypeError(f"rope must be a mha_jax.decoding.RoPE or None; got {self.rope!r}")
        alibi = self.alibi
        if not (isinstance(alibi, bool) or (_checks.is_int(alibi) and alibi > 0)):
            raise _checks.fail("alibi", "be True, False or a positive head count", repr(alibi))
        object.__setattr__(self, "alibi", alibi if isinstance(alibi, bool) else int(alibi))
        if self.score_mod is not None and not callable(self.score_mod):
            raise TypeError(f"score_mod must be a function (score, head, q_idx, kv_idx) -> score or None; "
                            f"got {self.score_mod!r}")  # fmt: skip
        if self.platform is not None:
            _checks.check_choice("platform", self.platform, PLATFORMS)
        capability = self.compute_capability
        if capability is not None:
            if not (isinstance(capability, tuple | list) and len(capability) == 2
                    and all(_checks.is_int(c) and c >= 0 for c in capability)):  # fmt: skip
                raise _checks.fail("compute_capability", "be a pair of ints (major, minor) or None",
                                   repr(capability))  # fmt: skip
            if self.platform not in (None, "gpu"):
                raise _checks.fail("compute_capability", f"be None for platform {self.platform!r}",
                                   repr(capability))  # fmt: skip
            object.__setattr__(self, "compute_capability", (int(capability[0]), int(capability[1])))
        eps = self.qk_norm_eps
        if not (is_real(eps) and math.isfinite(eps) and eps > 0):
            raise _checks.fail("qk_norm_eps", "be a positive finite number", repr(eps))
        object.__setattr__(self, "qk_norm_eps", float(eps))
        # Canonical, hashable forms: equal settings give equal (cache-hitting) values.
        object.__setattr__(self, "scale", None if scale is None else float(scale))
        object.__setattr__(self, "dropout_rate", float(rate))
        object.__setattr__(self, "softcap", None if cap is None else float(cap))
        object.__setattr__(self, "dtype", _floating_dtype(self.dtype))


def _floating_dtype(dtype) -> jnp.dtype | None:
    if dtype is None:
        return None
    try:
        canonical = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype or None; got {dtype!r}") from None
    if not jnp.issubdtype(canonical, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype or None; got {canonical}")
    return canonical
