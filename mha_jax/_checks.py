"""Input validation: every user-facing message has the same form.

    "<argument> must <expectation>; got <what was received>"

Shapes are static under `jax.jit`, so every check here runs once, at trace
time, and costs nothing afterwards. Checks raise `ValueError` for shapes and
sizes and `TypeError` for dtypes, never `assert` (which `python -O` strips).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def fail(name: str, expectation: str, got: object) -> ValueError:
    return ValueError(f"{name} must {expectation}; got {got}")


def check_rank(name: str, x, rank: int, legend: str) -> None:
    """`legend` names the axes, e.g. "[Lq, D]"."""
    if jnp.ndim(x) != rank:
        raise fail(name, f"have rank {rank} {legend}", f"shape {tuple(jnp.shape(x))}")


def check_shape(name: str, x, expected: Sequence[int | None], legend: str) -> None:
    """`None` in `expected` accepts any size on that axis."""
    shape = tuple(jnp.shape(x))
    ok = len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected, strict=True)
    )
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        want = f"({want},)" if len(expected) == 1 else f"({want})"
        raise fail(name, f"have shape {legend}={want}", f"shape {shape}")


def check_one_of_shapes(name: str, x, options: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """`options` pairs a legend like "[Lq, Lk]" with the concrete shape it means."""
    shape = tuple(jnp.shape(x))
    if shape not in [s for _, s in options]:
        want = " or ".join(f"{legend}={s}" for legend, s in options)
        raise fail(name, f"have shape {want}", f"shape {shape}")


def as_array(name: str, x):
    """`jnp.asarray(x)`, or our message when `x` is not array-like at all (None, a str)."""
    if isinstance(x, jax.Array):  # the common case, and a tracer: nothing to convert
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array; got {type(x).__name__} {x!r:.60}") from None


def dtype_of(x):
    """The dtype of an array or scalar, or the Python type's name for anything else."""
    try:
        return jnp.result_type(x)
    except (TypeError, ValueError):
        return type(x).__name__


def check_floating(name: str, x) -> None:
    dtype = dtype_of(x)
    if isinstance(dtype, str) or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {dtype}")


def check_sinks(name: str, sinks, num_heads: int):
    """Attention sinks as an array, checked: floating, one logit per query head `[H]`."""
    sinks = as_array(name, sinks)
    check_floating(name, sinks)
    check_shape(name, sinks, (num_heads,), "[H] (one logit per query head)")
    return sinks


def check_bool(name: str, x) -> None:
    dtype = dtype_of(x)
    if dtype != jnp.bool_:
        raise TypeError(
            f"{name} must have dtype bool (True = may attend); got {dtype}. "
            "Convert with `mask.astype(bool)` if 1 means 'attend'."
        )


def check_integer(name: str, x) -> None:
    dtype = dtype_of(x)
    if isinstance(dtype, str) or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype; got {dtype}")


def check_range(name: str, x, lo: int, hi: int, expectation: str) -> None:
    """Eagerly, every element of the integer array `x` in `[lo, hi]`. A traced `x` has no
    values to check: the caller clamps it (and says so in its docstring)."""
    if isinstance(x, jax.core.Tracer):
        return
    bad = [value for value in np.asarray(jax.device_get(x)).ravel().tolist() if not lo <= value <= hi]
    if bad:
        raise fail(name, expectation, f"{bad[:8]}" + (" ..." if len(bad) > 8 else ""))


def check_divides(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if divisor <= 0 or value % divisor:
        raise fail(name, f"be divisible by {divisor_name}={divisor}", value)


def is_int(value) -> bool:
    """A Python or NumPy integer, and not a bool (True is not "1 head")."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_positive(name: str, value: int) -> None:
    if not is_int(value) or value <= 0:
        raise fail(name, "be a positive integer", repr(value))


def check_bool_flag(name: str, value) -> None:
    """Static switches must be real bools: a traced or string "flag" would be truthy."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a Python bool; got {value!r}")


def check_block_sizes(block_sizes) -> None:
    ok = isinstance(block_sizes, tuple | list) and len(block_sizes) == 2
    if not (ok and all(is_int(b) and b > 0 for b in block_sizes)):
        raise fail("block_sizes", "be a pair of positive ints (block_q, block_k)", repr(block_sizes))


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise fail(name, f"be one of {list(choices)}", repr(value))


def check_length(name: str, value) -> None:
    """A sequence length: a Python (or NumPy) int, zero allowed."""
    if not is_int(value) or value < 0:
        raise fail(name, "be a non-negative integer", repr(value))


def check_finite_real(name: str, value, *, positive: bool = False) -> None:
    """A static real setting (a scale, a cap): a finite Python or NumPy number, not a bool."""
    real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )
    if not (real and np.isfinite(value) and (value > 0 or not positive)):
        raise fail(name, f"be a {'positive ' if positive else ''}finite real number", repr(value))


def check_heads(q, k, v=None) -> None:
    """One example's heads: `q [Lq, H, Dh]`, `k` (and `v`) `[Lk, Hkv, Dh]`, floating, H a
    multiple of Hkv (query head h reads kv head h // G)."""
    check_rank("q", q, 3, "[Lq, H, Dh]")
    check_rank("k", k, 3, "[Lk, Hkv, Dh]")
    check_floating("q", q)
    check_floating("k", k)
    length_k, num_kv_heads = jnp.shape(k)[:2]
    if jnp.shape(k)[2] != jnp.shape(q)[2]:
        raise fail(
            "q and k",
            "have the same head width Dh",
            f"shapes {tuple(jnp.shape(q))} and {tuple(jnp.shape(k))}",
        )
    check_kv_heads("k", k, jnp.shape(q)[1])
    if v is not None:
        check_floating("v", v)
        check_shape("v", v, (length_k, num_kv_heads, None), "[Lk, Hkv, *] (Lk and Hkv of k)")


def check_kv_heads(name: str, x, num_heads: int) -> None:
    """`x [Lk, Hkv, Dh]`: its Hkv heads divide the H query heads (head h reads h // G)."""
    num_kv_heads = jnp.shape(x)[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise fail(name, f"have Hkv heads dividing H={num_heads}", f"shape {tuple(jnp.shape(x))}")


def check_mask_and_bias(mask, bias, num_heads: int, length_q: int, length_k: int) -> None:
    """One example's `mask` (bool) and `bias` (floating), `[Lq, Lk]` or `[H or 1, Lq, Lk]`."""
    shapes = [("[Lq, Lk]", (length_q, length_k)), ("[H, Lq, Lk]", (num_heads, length_q, length_k)),
              ("[1, Lq, Lk]", (1, length_q, length_k))]  # fmt: skip
    if mask is not None:
        check_bool("mask", mask)
        check_one_of_shapes("mask", mask, shapes)
    if bias is not None:
        check_floating("bias", bias)
        check_one_of_shapes("bias", bias, shapes)
