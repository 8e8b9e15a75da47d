"""The parameters of one attention layer: a pytree and its pure initialiser.

Layout (applied as `x @ w + b`; head `h` owns features `h*Dh:(h+1)*Dh`, the
contiguous split of GPT-2, PyTorch and Flax):

    w_q [D, H*Dh]        b_q [H*Dh]
    w_k [D_kv, Hkv*Dh]   b_k [Hkv*Dh]
    w_v [D_kv, Hkv*Dh]   b_v [Hkv*Dh]
    w_o [H*Dh, D_out]    b_o [D_out]
    q_norm [Dh]          k_norm [Dh]          (QK-norm scales; optional)
    sinks [H]                                 (attention sinks: a learned logit per head; optional)

Biases are `None` when `use_bias=False`; the QK-norm scales are `None` unless
`qk_norm=True` (then q and k are RMS-normalised per head before RoPE and the
scores, as in Qwen3, OLMo 2 and Gemma 3; scales start at 1 and are applied as
they are: a Gemma checkpoint's `1 + w` is converted when it is imported). `sinks`
is `None` unless `sinks=True` (gpt-oss: one logit per query head that joins every
row's softmax and carries no value; starts at 0). The
Flax modules create exactly these arrays through `param_shapes` and
`init_param`, so a checkpoint of one loads into the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax import _checks

Initializer = Callable[[Array, tuple[int, ...], jnp.dtype], Array]

default_kernel_init: Initializer = jax.nn.initializers.lecun_normal()
default_bias_init: Initializer = jax.nn.initializers.zeros

PROJECTION_NAMES = ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")
NORM_NAMES = ("q_norm", "k_norm")
PARAM_NAMES = PROJECTION_NAMES + NORM_NAMES + ("sinks",)


class MHAParams(NamedTuple):
    w_q: Array
    b_q: Array | None
    w_k: Array
    b_k: Array | None
    w_v: Array
    b_v: Array | None
    w_o: Array
    b_o: Array | None
    q_norm: Array | None = None
    k_norm: Array | None = None
    sinks: Array | None = None


def resolve_sizes(
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    d_kv: int | None = None,
    d_out: int | None = None,
) -> dict[str, int]:
    """Fill in the defaults and reject impossible sizes, naming the argument."""
    _checks.check_positive("d_model", d_model)
    _checks.check_positive("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _checks.check_positive("num_kv_heads", num_kv_heads)
    _checks.check_divides("num_heads", num_heads, "num_kv_heads", num_kv_heads)
    if head_dim is None:
        _checks.check_divides("d_model", d_model, "num_heads", num_heads)
        head_dim = d_model // num_heads
    _checks.check_positive("head_dim", head_dim)
    d_kv = d_model if d_kv is None else d_kv
    _checks.check_positive("d_kv", d_kv)
    d_out = d_model if d_out is None else d_out
    _checks.check_positive("d_out", d_out)
    return dict(
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        d_kv=d_kv,
        d_out=d_out,
    )


def param_shapes(
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    d_kv: int,
    d_out: int,
    use_bias: bool = True,
    qk_norm: bool = False,
    sinks: bool = False,
) -> dict[str, tuple[int, ...] | None]:
    """Shape of every parameter by name; `None` for an absent bias, QK-norm scale or sinks."""
    q_features, kv_features = num_heads * head_dim, num_kv_heads * head_dim
    shapes = dict(
        w_q=(d_model, q_features),
        b_q=(q_features,),
        w_k=(d_kv, kv_features),
        b_k=(kv_features,),
        w_v=(d_kv, kv_features),
        b_v=(kv_features,),
        w_o=(q_features, d_out),
        b_o=(d_out,),
        q_norm=(head_dim,) if qk_norm else None,
        k_norm=(head_dim,) if qk_norm else None,
        sinks=(num_heads,) if sinks else None,
    )
    if not use_bias:
        shapes = {name: (None if name.startswith("b_") else shape) for name, shape in shapes.items()}
    return shapes


def init_param(
    rng: Array,
    name: str,
    shape: tuple[int, ...],
    dtype=jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
) -> Array:
    if name in NORM_NAMES:  # scales start at 1: the norm alone, no random draw
        return jnp.ones(shape, dtype)
    if name == "sinks":  # logit 0: a sink as likely as a key scoring 0
        return jnp.zeros(shape, dtype)
    init = bias_init if name.startswith("b_") else kernel_init
    return init(rng, shape, dtype)


def init_params(
    rng: Array,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    d_kv: int | None = None,
    d_out: int | None = None,
    use_bias: bool = True,
    qk_norm: bool = False,
    sinks: bool = False,
    dtype=jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
) -> MHAParams:
    """Random projections (LeCun normal, as Flax), zero biases, unit QK-norm scales, zero sinks."""
    sizes = resolve_sizes(
        d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, d_kv=d_kv, d_out=d_out
    )
    _checks.check_bool_flag("sinks", sinks)
    rngs = dict(zip(PROJECTION_NAMES, jax.random.split(rng, len(PROJECTION_NAMES)), strict=True))
    return build_params(
        lambda name, shape: init_param(rngs.get(name), name, shape, dtype, kernel_init, bias_init),
        param_shapes(**sizes, use_bias=use_bias, qk_norm=qk_norm, sinks=sinks),
    )


def build_params(
    make: Callable[[str, tuple[int, ...]], Array], shapes: dict[str, tuple[int, ...] | None]
) -> MHAParams:
    """`MHAParams` whose arrays come from `make(name, shape)`: the one place
    parameters are created, for `init_params` and both Flax modules."""
    return MHAParams(**{name: None if shape is None else make(name, shape) for name, shape in shapes.items()})
