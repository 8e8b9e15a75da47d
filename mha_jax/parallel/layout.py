"""Which positions of a sequence each device of a mesh axis holds.

A sequence sharded over `N` devices is cut into `N` contiguous chunks of `C = L / N`
rows; `Layout` says which global positions those rows are:

    contiguous   device d holds positions d·C, d·C + 1, ..., d·C + C - 1   (the natural order)
    striped      device d holds positions d, d + N, d + 2N, ...            (Brandon et al., 2023)

Under a causal mask the contiguous layout gives device 0 one chunk of work and
device N-1 all N: the ring waits for the slowest. Striped gives every device a
near-equal share at every ring step (each (query chunk, key chunk) pair is a causal
triangle, shifted by at most one row), so `to_layout` the inputs once, attend with
`layout=Layout("striped", N)` and `from_layout` the outputs (or keep the whole model in
the striped order, with positions for RoPE from `positions`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax import _checks

LAYOUTS = ("contiguous", "striped")


class Layout(NamedTuple):
    """kind:       "contiguous" (the natural order) or "striped".
    num_shards: N, the size of the mesh axis the sequence is sharded over: a striped
                order made for one N is not the striped order of another.
    """

    kind: str = "contiguous"
    num_shards: int = 1

    def check(self, name: str = "layout") -> Layout:
        _checks.check_choice(f"{name}.kind", self.kind, LAYOUTS)
        _checks.check_positive(f"{name}.num_shards", self.num_shards)
        return self

    def positions(self, shard, length: int) -> Array:
        """`[C]`: the global positions of the `length` rows held by device `shard`."""
        rows = jnp.arange(length, dtype=jnp.int32)
        if self.kind == "striped":
            return rows * self.num_shards + shard
        return shard * length + rows


def check_layout_for(layout: Layout | None, axis: str, axis_size: int, name: str = "layout") -> Layout:
    """The layout of a sequence sharded over `axis_size` devices (None: contiguous).
    A striped order made for another device count puts rows on the wrong devices:
    refuse it, naming both counts."""
    if layout is None:
        return Layout("contiguous", axis_size)
    if not isinstance(layout, Layout):
        raise TypeError(f"{name} must be an mha_jax.parallel.Layout or None; got {type(layout).__name__}")
    layout.check(name)
    if layout.kind == "striped" and layout.num_shards != axis_size:
        raise _checks.fail(
            name,
            f"be made for the {axis_size} devices of mesh axis {axis!r} the sequence is sharded over "
            f"(Layout({layout.kind!r}, {axis_size}))",
            repr(layout),
        )
    return layout._replace(num_shards=axis_size)


def to_layout(x: Array, layout: Layout, axis: int = 1) -> Array:
    """Reorder the sequence axis of `x` (`[B, L, ...]` by default) from the natural order
    into `layout`'s: sharded contiguously, the result gives device d the rows `layout`
    says it holds. Striped: position p = c·N + d goes to row d·C + c."""
    return _regroup(x, layout, axis, inverse=False)


def from_layout(x: Array, layout: Layout, axis: int = 1) -> Array:
    """The inverse of `to_layout`: back to the natural order."""
    return _regroup(x, layout, axis, inverse=True)


def _regroup(x: Array, layout: Layout, axis: int, inverse: bool) -> Array:
    """Striped: view the sequence axis as `[C, N]` (natural order: position c·N + d) or
    `[N, C]` (layout order: row d·C + c), swap the two, merge back. Contiguous: as is."""
    layout.check()
    if layout.kind == "contiguous":
        return x
    axis, n = axis % x.ndim, layout.num_shards
    length = x.shape[axis]
    if length % n:
        raise _checks.fail(f"x.shape[{axis}] (L)", f"be divisible by layout.num_shards={n}", length)
    split = (n, length // n) if inverse else (length // n, n)
    parts = x.reshape(*x.shape[:axis], *split, *x.shape[axis + 1 :])
    return jnp.swapaxes(parts, axis, axis + 1).reshape(x.shape)


def bound_axis_size(axis_name: str, name: str = "axis_name") -> int:
    """The size of mesh axis `axis_name` of the enclosing `jax.shard_map`, or an error
    naming the argument (outside shard_map, or a name the mesh does not have)."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        raise _checks.fail(
            name,
            "name a mesh axis of the enclosing jax.shard_map (these functions run per device)",
            repr(axis_name),
        ) from None
