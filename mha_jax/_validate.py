"""The one validation pass at the public boundary: a whole call, checked before any maths.

`settle` turns the friendly keywords into the two values that travel
(`Structure`, `Options`); `check_call` checks the arrays against the
parameters and each other. Both run at trace time (shapes are static), once
per compilation; the vmapped body that follows is unchecked.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from mha_jax import _checks
from mha_jax.masks import Structure, check_structure, normalize_window
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
OPTIONS_KEYWORDS = dict(scale=None, dropout_rate=0.0, dtype=None, implementation="auto", rope=None)


def settle(
    structure: Structure | None, options: Options | None, *, deterministic, **keywords
) -> tuple[Structure, Options]:
    """(structure, options) from the values and the friendly keywords: the rules from one or
    the other, never both; the settings merged (`merge_options`)."""
    structure = settle_structure(structure, **{k: keywords[k] for k in STRUCTURE_KEYWORDS})
    options = merge_options(options, {k: keywords.get(k, OPTIONS_KEYWORDS[k]) for k in OPTIONS_KEYWORDS})
    return structure, effective(options, deterministic)


def merge_options(options: Options | None, keywords: dict) -> Options:
    """`options` with the settings given as keywords filled in. A keyword may set what
    `options` leaves at its default (`dropout_rate=0.1, options=Options(rope=...)`); setting
    one that `options` sets too, to another value, is an error naming both (nothing is
    silently ignored)."""
    if options is None:
        options = Options()
    if not isinstance(options, Options):
        raise TypeError(f"options must be an mha_jax.Options; got {type(options).__name__}")
    given = {k: value for k, value in keywords.items() if _given(value, OPTIONS_KEYWORDS[k])}
    clash = [k for k, value in given.items() if _given(getattr(options, k), OPTIONS_KEYWORDS[k])
             and getattr(options, k) != Options(**{k: value}).__getattribute__(k)]  # fmt: skip
    if clash:
        both = ", ".join(f"{k}={given[k]!r} and options.{k}={getattr(options, k)!r}" for k in clash)
        raise ValueError(f"{', '.join(clash)} must be given once, as a keyword or in options=; got {both}")
    return dataclasses.replace(options, **given) if given else options


def settle_structure(structure: Structure | None, **keywords) -> Structure:
    """The mask rules from `structure=` or from the keywords, the window normalised."""
    refuse_both(structure, "structure", STRUCTURE_KEYWORDS, keywords)
    if structure is None:
        structure = Structure(*(keywords[k] for k in STRUCTURE_KEYWORDS))
    if not isinstance(structure, Structure):
        raise TypeError(f"structure must be an mha_jax.Structure; got {type(structure).__name__}")
    _checks.check_bool_flag("is_causal", structure.is_causal)
    # Arrays given as lists or NumPy become arrays; Python ints stay static.
    as_array = lambda name, value: (
        value if value is None or _checks.is_int(value) else _checks.as_array(name, value)
    )
    segment_ids = structure.segment_ids
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise _checks.fail("segment_ids", "be one int array, or a pair (q_segment_ids, kv_segment_ids)",
                               f"a sequence of {len(segment_ids)}")  # fmt: skip
        segment_ids = tuple(_checks.as_array("segment_ids", a) for a in segment_ids)
    elif segment_ids is not None:
        segment_ids = _checks.as_array("segment_ids", segment_ids)
    chunk = structure.chunk
    if chunk is not None and not (_checks.is_int(chunk) and chunk > 0):
        raise _checks.fail("chunk", "be a positive int (static) or None", repr(chunk))
    # kv_length and prefix are traced even when given as ints (no compilation per value);
    # a Python int q_offset stays static (kernels that align top-left only can then run).
    traced = lambda name, value: None if value is None else _checks.as_array(name, value)
    return structure.replace(
        q_offset=as_array("q_offset", structure.q_offset),
        kv_length=traced("kv_length", structure.kv_length),
        window=normalize_window(structure.window),
        segment_ids=segment_ids,
        chunk=None if chunk is None else int(chunk),
        prefix=traced("prefix", structure.prefix),
    )


def as_positions(positions):
    """RoPE positions as arrays: one (self-attention), or a `(q, k)` pair."""
    if positions is None:
        return None
    if isinstance(positions, tuple | list):
        if len(positions) != 2:
            raise _checks.fail("positions", "be one int array, or a pair (q_positions, k_positions)",
                               f"a sequence of {len(positions)}")  # fmt: skip
        return tuple(_checks.as_array("positions", a) for a in positions)
    return _checks.as_array("positions", positions)


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
    positions=None,
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
    if params.sinks is not None:
        _checks.check_sinks("params.sinks", params.sinks, num_heads)
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
    check_structure(structure, length_q, length_k, batch)
    check_rope_positions(positions, options, batch, length_q, length_k)
    if options.dropout_rate > 0.0 and rng is None:
        raise ValueError("rng must be given when dropout_rate > 0 and deterministic=False; got None")
    return Sizes(num_heads, num_kv_heads, head_dim, length_q, length_k)


def check_rope_positions(
    positions, options: Options, batch: int | None, length_q: int, length_k: int
) -> None:
    """`positions`: int `[Lq]` (self-attention) or a pair (`[Lq]`, `[Lk]`); `[B or 1, ...]`
    for a batch. They move RoPE only: given without `options.rope`, they would be ignored."""
    if positions is None:
        return
    if options.rope is None:
        raise _checks.fail("positions", "come with options.rope (they move RoPE only; without it "
                           "nothing reads them)", "rope=None")  # fmt: skip
    pair = positions if isinstance(positions, tuple) else (positions, positions)
    if not isinstance(positions, tuple) and length_q != length_k:
        raise _checks.fail("positions", "be a pair (q_positions, k_positions) when Lq != Lk",
                           f"one array, Lq={length_q}, Lk={length_k}")  # fmt: skip
    for array, length, side in ((pair[0], length_q, "Lq"), (pair[1], length_k, "Lk")):
        _checks.check_integer("positions", array)
        if batch is None:
            _checks.check_shape("positions", array, (length,), f"[{side}]")
        else:
            _checks.check_one_of_shapes("positions", array, [(f"[B, {side}]", (batch, length)),
                                                             (f"[1, {side}]", (1, length))])  # fmt: skip
