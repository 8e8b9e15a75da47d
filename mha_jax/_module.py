"""The logic both Flax wrappers share, so `nnx` and `linen` differ only in how
they store parameters and random keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mha_jax import _checks
from mha_jax._validate import effective
from mha_jax.core import batched
from mha_jax.decoding.step import cached_attention
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.params import MHAParams


def resolve_deterministic(call_value: bool | None, module_value: bool | None, rate: float) -> bool:
    """Flax's rule: the call's flag wins over the module's; with dropout one must be set."""
    if rate == 0.0:
        return True
    for value in (call_value, module_value):
        if value is not None:
            return bool(value)
    raise ValueError(
        "deterministic must be given to the constructor or the call when dropout_rate > 0; got None for both"
    )


def forward(
    module,
    params,
    x_q,
    x_kv,
    *,
    options: Options,
    mask,
    bias,
    structure: Structure,
    deterministic: bool | None,
    draw_rng,
    return_weights: bool,
    positions=None,
):
    """The call both wrappers make: `[B, Lq, D]` or unbatched `[Lq, D]` -> (out, weights or None).

    `module` supplies num_heads, deterministic and sow_weights; `draw_rng()` is
    called only when dropout is on, so the module's random stream advances only then.
    A Flax mask is taken as Flax means it (`flax_mask`).
    """
    deterministic = resolve_deterministic(deterministic, module.deterministic, options.dropout_rate)
    want_weights = return_weights or module.sow_weights
    x_kv = x_q if x_kv is None else x_kv
    if jnp.ndim(x_q) not in (2, 3):
        raise _checks.fail("x_q", "have rank 3 [B, Lq, D] or rank 2 [Lq, D]", f"shape {jnp.shape(x_q)}")
    unbatched = jnp.ndim(x_q) == 2
    mask = flax_mask(mask, jnp.ndim(x_q) + 1)
    if unbatched:  # one example: lend it a batch axis of 1
        add = lambda a: None if a is None else jnp.asarray(a)[None]
        x_q, x_kv, mask, bias = map(add, (x_q, x_kv, mask, bias))
        structure = jax.tree.map(add, structure)  # its arrays too: kv_length [1], segment ids [1, L]
        positions = jax.tree.map(add, positions)
    out, weights = batched(
        params,
        x_q,
        x_kv,
        num_heads=module.num_heads,
        mask=mask,
        bias=bias,
        structure=structure,
        options=effective(options, deterministic),
        rng=None if deterministic else draw_rng(),
        return_weights=want_weights,
        positions=positions,
    )
    if unbatched:
        out, weights = out[0], None if weights is None else weights[0]
    return out, weights


def flax_mask(mask, rank: int):
    """A mask as Flax's attention takes it: any dtype (nonzero = may attend, as Flax's
    `jnp.where(mask, ...)` reads it), with a head axis of 1 or H (`nnx.make_causal_mask`
    gives `[B, 1, Lq, Lk]`); `rank` is 4 for batched inputs, 3 for one example. Other shapes
    pass through to the core's own checks."""
    if mask is None:
        return None
    mask = _checks.as_array("mask", mask)
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    if mask.ndim == rank and mask.shape[-3] == 1:
        mask = mask.squeeze(-3)  # one head axis for every head: the core's [B, Lq, Lk]
    return mask


def check_loaded(current: MHAParams, loaded: MHAParams) -> None:
    """Loading weights into a module: the same arrays, in the same shapes."""
    if not isinstance(loaded, MHAParams):
        raise TypeError(f"params must be an mha_jax.MHAParams; got {type(loaded).__name__}")
    for name, have, new in zip(MHAParams._fields, current, loaded, strict=True):
        if (have is None) != (new is None):
            expected = "be None (the module has no such parameter)" if have is None else "be given"
            raise _checks.fail(f"params.{name}", expected, "an array" if have is None else "None")
        if have is not None:
            _checks.check_shape(f"params.{name}", new, have.shape, "the module's shape")


def check_decoding(x_kv, mask, bias, is_causal, q_offset, kv_length, structure, return_weights) -> None:
    """Decoding is causal self-attention over the cache: its mask comes from the cache
    (`is_causal=True` says what it does anyway, and is accepted)."""
    if is_causal is False:
        raise _checks.fail("is_causal", "be True or left out when decoding (decoding is causal)", "False")
    given = [name for name, value, default in (
        ("x_kv", x_kv, None), ("mask", mask, None), ("bias", bias, None),
        ("q_offset", q_offset, 0), ("kv_length", kv_length, None), ("structure", structure, None),
        ("return_weights", return_weights, False),
    ) if value is not default and not (isinstance(value, int) and value == default)]  # fmt: skip
    if given:
        raise ValueError(
            f"decode=True and cache= take no {', '.join(given)} (the cache's lengths make the causal "
            f"mask; a window goes in window=); got {', '.join(given)}"
        )


def decode(module, params, x, cache, *, options: Options, lengths, positions, window):
    """The decoding call both wrappers make: `[B, T, D]` against `cache` -> (out, cache)."""
    if jnp.ndim(x) != 3:
        raise _checks.fail("x_q", "have rank 3 [B, T, D] when decoding", f"shape {jnp.shape(x)}")
    return cached_attention(
        params, x, cache, num_heads=module.num_heads, lengths=lengths, positions=positions, window=window,
        options=effective(options, True),
    )  # fmt: skip
