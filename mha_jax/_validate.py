"""The one validation pass at the public boundary: a whole call, checked before any maths.

`settle` turns the friendly keywords into the two values that travel
(`Structure`, `Options`); `check_call` checks the arrays against the
parameters and each other. Both run at trace time (shapes are static), once
per compilation; the vmapped body that follows is unchecked.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

from mha_jax import _checks
from mha_jax.masks import Structure, normalize_window
from mha_jax.options import Options
from mha_jax.params import MHAParams
from mha_jax.rope import rotary_size


class Sizes(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    length_q: int
    length_k: int


STRUCTURE_KEYWORDS = dict(is_causal=False, q_offset=0, kv_length=None, window=None)
OPTIONS_KEYWORDS = dict(scale=None, dropout_rate=0.0, dtype=None, implementation="auto")


def settle(
    structure: Structure | None, options: Options | None, *, deterministic, **keywords
) -> tuple[Structure, Options]:
    """(structure, options) from either the values or the friendly keywords, never both."""
    structure = settle_structure(structure, **{k: keywords[k] for k in STRUCTURE_KEYWORDS})
    refuse_both(options, "options", OPTIONS_KEYWORDS, keywords)
    if options is None:
        options = Options(*(keywords[k] for k in OPTIONS_KEYWORDS))
    return structure, effective(options, deterministic)


def settle_structure(structure: Structure | None, **keywords) -> Structure:
    """The mask rules from `structure=` or from the keywords, the window normalised."""
    refuse_both(structure, "structure", STRUCTURE_KEYWORDS, keywords)
    if structure is None:
        structure = Structure(*(keywords[k] for k in STRUCTURE_KEYWORDS))
    if not isinstance(structure, Structure):
        raise TypeError(f"structure must be an mha_jax.Structure; got {type(structure).__name__}")
    _checks.check_bool_flag("is_causal", structure.is_causal)
    # Positions given as lists or NumPy become arrays; a Python int q_offset stays static.
    q_offset = structure.q_offset
    if not _checks.is_int(q_offset):
        q_offset = _checks.as_array("q_offset", q_offset)
    kv_length = None if structure.kv_length is None else _checks.as_array("kv_length", structure.kv_length)
    return structure._replace(
        q_offset=q_offset, kv_length=kv_length, window=normalize_window(structure.window)
    )


def effective(options: Options, deterministic) -> Options:
    """The options a call runs with: no dropout in a deterministic call."""
    if not isinstance(options, Options):
        raise TypeError(f"options must be an mha_jax.Options; got {type(options).__name__}")
    _checks.check_bool_flag("deterministic", deterministic)
    if deterministic and options.dropout_rate > 0.0:
        return dataclasses.replace(options, dropout_rate=0.0)
    return options


def refuse_both(value, name: str, defaults: dict, keywords: dict) -> None:
    given = [k for k, default in defaults.items() if _given(keywords[k], default)]
    if value is not None and given:
        raise ValueError(
            f"{name} must be given alone or not at all; got {name}= together with {', '.join(given)}"
        )


def _given(value, default) -> bool:
    """Was a keyword set to something other than its default? (An array counts as set.)"""
    plain = isinstance(value, bool | int | float | str) and type(value) is type(default)
    return value is not default and not (plain and value == default)


def check_params_type(params) -> None:
    if not isinstance(params, MHAParams):
        raise TypeError(
            f"params must be an mha_jax.MHAParams (e.g. MHAParams(**weights) for a "
            f"dict); got {type(params).__name__}"
        )


def as_params(params) -> MHAParams:
    """The parameters with every array given as something `jnp.asarray` takes (NumPy, lists)."""
    check_params_type(params)
    return MHAParams(*(None if p is None else _checks.as_array(f"params.{name}", p)
                       for name, p in zip(MHAParams._fields, params, strict=True)))  # fmt: skip


def check_call(
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
    return_weights,
    batch: int | None = None,
) -> Sizes:
    """Validate one example (`batch=None`) or a batch of `B` examples."""
    lead = "[B, " if batch is not None else "["
    check_params_type(params)
    _checks.check_bool_flag("return_weights", return_weights)
    _checks.check_positive("num_heads", num_heads)
    rank = 2 if batch is None else 3
    _checks.check_rank("x_q", x_q, rank, f"{lead}Lq, D]")
    _checks.check_rank("x_kv", x_kv, rank, f"{lead}Lk, D_kv]")
    _checks.check_floating("x_q", x_q)
    _checks.check_floating("x_kv", x_kv)
    if batch is not None and x_kv.shape[0] != batch:
        raise _checks.fail("x_kv", f"have the batch size of x_q (B={batch})", f"shape {x_kv.shape}")
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
    norms = [name for name in ("q_norm", "k_norm") if getattr(params, name) is not None]
    if len(norms) == 1:
        raise _checks.fail(
            "params.q_norm and params.k_norm", "be given together (QK-norm)", f"only {norms[0]}"
        )
    for name in norms:
        _checks.check_shape(f"params.{name}", getattr(params, name), (head_dim,), "[Dh]")
    if options.rope is not None:
        rotary_size(options.rope, head_dim, name="the head width Dh")
    for name, width in (
        ("b_q", q_features),
        ("b_k", kv_features),
        ("b_v", kv_features),
        ("b_o", params.w_o.shape[1]),
    ):
        if getattr(params, name) is not None:
            _checks.check_shape(f"params.{name}", getattr(params, name), (width,), "[features]")

    per_example = [("[Lq, Lk]", (length_q, length_k)), ("[H, Lq, Lk]", (num_heads, length_q, length_k))]
    if batch is not None:  # a leading 1 is shared across the batch
        per_example = [
            (f"[{lead}, {legend[1:]}", (size, *shape))
            for legend, shape in per_example
            for lead, size in (("B", batch), ("1", 1))
        ]
    if mask is not None:
        _checks.check_bool("mask", mask)
        _checks.check_one_of_shapes("mask", mask, per_example)
    if bias is not None:
        _checks.check_floating("bias", bias)
        _checks.check_one_of_shapes("bias", bias, per_example)
    check_positions(structure, batch)
    if options.dropout_rate > 0.0 and rng is None:
        raise ValueError("rng must be given when dropout_rate > 0 and deterministic=False; got None")
    return Sizes(num_heads, num_kv_heads, head_dim, length_q, length_k)


def check_positions(structure: Structure, batch: int | None) -> None:
    """q_offset: an int scalar (or `[B]`); kv_length: an int scalar, `[B]` for a batch."""
    batched = batch is not None
    if structure.kv_length is not None:
        _checks.check_integer("kv_length", structure.kv_length)
        _checks.check_shape(
            "kv_length",
            structure.kv_length,
            (batch,) if batched else (),
            "[B]" if batched else "[] (a scalar)",
        )
    q_offset = structure.q_offset
    _checks.check_integer("q_offset", q_offset)
    if jnp.ndim(q_offset) not in ((0, 1) if batched else (0,)):
        raise _checks.fail(
            "q_offset",
            "be a scalar" + (" or have shape [B]" if batched else ""),
            f"shape {jnp.shape(q_offset)}",
        )
    if batched and jnp.ndim(q_offset) == 1:
        _checks.check_shape("q_offset", q_offset, (batch,), "[B]")
