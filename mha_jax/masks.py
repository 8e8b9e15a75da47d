"""Boolean attention masks: True = may attend (the polarity of jax.nn and Flax).

Masks that have structure (causal, padding, local window) are described once,
by `Structure`, as a predicate on query and key *positions*. The reference
path evaluates it on all positions; the blockwise path evaluates it on one
block at a time and skips blocks it rules out, so it never holds `[Lq, Lk]`.

Causal masks are aligned top-left, like `jax.nn.dot_product_attention`:
query `i` sits at position `i + q_offset` and sees keys `j <= i + q_offset`.
A decoder that appends `Lq` new queries after `n` cached keys passes
`q_offset=n` (bottom-right alignment is `q_offset = Lk - Lq`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Int

Window = tuple[int, int]


def normalize_window(window: int | tuple[int, int] | None) -> Window | None:
    """`w` means `(w, w)`: keys at most `w` positions before or after the query."""
    if window is None:
        return None
    left, right = (window, window) if isinstance(window, int) else tuple(window)
    if left < 0 or right < 0:
        raise ValueError(f"window must be non-negative (left, right) sizes; got {window!r}")
    return int(left), int(right)


class Structure(NamedTuple):
    """A mask given by rules rather than by an array.

    is_causal: key j visible to query i only if j <= i + q_offset.
    q_offset:  position of query 0 (an int, or a traced int scalar).
    kv_length: keys at j >= kv_length are padding (None: no padding).
    window:    (left, right): key j visible only if
               i + q_offset - left <= j <= i + q_offset + right.
    """

    is_causal: bool = False
    q_offset: int | Array = 0
    kv_length: int | Array | None = None
    window: Window | None = None

    @property
    def is_trivial(self) -> bool:
        return not self.is_causal and self.kv_length is None and self.window is None

    def allows(self, q_pos: Int[Array, " Lq"], k_pos: Int[Array, " Lk"]) -> Bool[Array, "Lq Lk"]:
        """Evaluate the rules on the given positions (a block, or all of them)."""
        q = (q_pos + self.q_offset)[:, None]
        k = k_pos[None, :]
        allowed = jnp.ones((q_pos.shape[0], k_pos.shape[0]), dtype=bool)
        if self.is_causal:
            allowed &= k <= q
        if self.kv_length is not None:
            allowed &= k < self.kv_length
        if self.window is not None:
            left, right = self.window
            allowed &= (k >= q - left) & (k <= q + right)
        return allowed


def causal_mask(length_q: int, length_k: int | None = None, *, q_offset: ArrayLike = 0) -> Array:
    """`[Lq, Lk]` lower-triangular mask, top-left aligned and shifted by `q_offset`."""
    length_k = length_q if length_k is None else length_k
    return Structure(is_causal=True, q_offset=q_offset).allows(
        jnp.arange(length_q), jnp.arange(length_k)
    )


def local_mask(
    length_q: int, length_k: int, window: int | tuple[int, int], *, q_offset: ArrayLike = 0
) -> Array:
    """`[Lq, Lk]` band mask: each query sees keys within `window` positions."""
    return Structure(window=normalize_window(window), q_offset=q_offset).allows(
        jnp.arange(length_q), jnp.arange(length_k)
    )


def padding_mask(
    kv_lengths: ArrayLike,
    length_q: int,
    length_k: int,
    q_lengths: ArrayLike | None = None,
) -> Array:
    """`[..., Lq, Lk]` mask from valid lengths (a scalar, or `[B]` for a batch).

    Keys at `j >= kv_length` are hidden; with `q_lengths`, query rows at
    `i >= q_length` see nothing (they come out as zeros).
    """
    kv_lengths = jnp.asarray(kv_lengths)[..., None, None]
    mask = jnp.arange(length_k) < kv_lengths
    mask = jnp.broadcast_to(mask, (*mask.shape[:-2], length_q, length_k))
    if q_lengths is not None:
        q_lengths = jnp.asarray(q_lengths)[..., None, None]
        mask = mask & (jnp.arange(length_q)[:, None] < q_lengths)
    return mask


def combine(*masks: ArrayLike | None) -> Array | None:
    """Logical AND of the given masks (broadcasting); `None` entries are skipped."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out
