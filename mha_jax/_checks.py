"""Input validation: every user-facing message has the same form.

    "<argument> must <expectation>; got <what was received>"

Shapes are static under `jax.jit`, so every check here runs once, at trace
time, and costs nothing afterwards. Checks raise `ValueError` for shapes and
sizes and `TypeError` for dtypes, never `assert` (which `python -O` strips).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def check_floating(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {dtype}")


def check_bool(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if dtype != jnp.bool_:
        raise TypeError(
            f"{name} must have dtype bool (True = may attend); got {dtype}. "
            "Convert with `mask.astype(bool)` if 1 means 'attend'."
        )


def check_integer(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype; got {dtype}")


def check_divides(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if divisor <= 0 or value % divisor:
        raise fail(name, f"be divisible by {divisor_name}={divisor}", value)


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or value <= 0:
        raise fail(name, "be a positive integer", repr(value))


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise fail(name, f"be one of {list(choices)}", repr(value))
