"""The logic both Flax wrappers share, so `nnx` and `linen` differ only in how
they store parameters and random keys."""

from __future__ import annotations

import jax.numpy as jnp

from mha_jax import _checks
from mha_jax._validate import effective
from mha_jax.core import batched
from mha_jax.masks import Structure
from mha_jax.options import Options


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
):
    """The call both wrappers make: `[B, Lq, D]` or unbatched `[Lq, D]` -> (out, weights or None).

    `module` supplies num_heads, deterministic and sow_weights; `draw_rng()` is
    called only when dropout is on, so the module's random stream advances only then.
    """
    deterministic = resolve_deterministic(deterministic, module.deterministic, options.dropout_rate)
    want_weights = return_weights or module.sow_weights
    x_kv = x_q if x_kv is None else x_kv
    if jnp.ndim(x_q) not in (2, 3):
        raise _checks.fail("x_q", "have rank 3 [B, Lq, D] or rank 2 [Lq, D]", f"shape {jnp.shape(x_q)}")
    unbatched = jnp.ndim(x_q) == 2
    if unbatched:  # one example: lend it a batch axis of 1
        add = lambda a: None if a is None else jnp.asarray(a)[None]
        x_q, x_kv, mask, bias = map(add, (x_q, x_kv, mask, bias))
        structure = structure._replace(kv_length=add(structure.kv_length))
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
    )
    if unbatched:
        out, weights = out[0], None if weights is None else weights[0]
    return out, weights
