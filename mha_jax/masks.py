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
import numpy as np
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Bool, Int

Window = tuple[int, int]


def normalize_window(window: object) -> Window | None:
    """`w` means `(w, w)`: keys at most `w` positions before or after the query."""
    if window is None:
        return None
    is_int = lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)
    pair = (window, window) if is_int(window) else window
    if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(map(is_int, pair))):
        raise ValueError(f"window must be an int or a (left, right) pair of ints; got {window!r}")
    left, right = int(pair[0]), int(pair[1])
    if left < 0 or right < 0:
        raise ValueError(f"window must be non-negative (left, right) sizes; got {window!r}")
    return left, right


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

    def query_sees_any(self, length_q: int, length_k: int) -> Bool[Array, " Lq"]:
        """`[Lq]`: may query row i see any key? O(Lq), no `[Lq, Lk]` array."""
        q = jnp.arange(length_q) + self.q_offset  # query positions
        lo, hi = jnp.zeros_like(q), jnp.full_like(q, length_k)  # visible keys [lo, hi)
        if self.kv_length is not None:
            hi = jnp.minimum(hi, self.kv_length)
        if self.is_causal:
            hi = jnp.minimum(hi, q + 1)
        if self.window is not None:
            left, right = self.window
            lo, hi = jnp.maximum(lo, q - left), jnp.minimum(hi, q + right + 1)
        return hi > lo

    def key_seen_by_any(self, length_q: int, length_k: int) -> Bool[Array, " Lk"]:
        """`[Lk]`: may some query see key j? O(Lk), no `[Lq, Lk]` array."""
        k = jnp.arange(length_k)
        first = jnp.zeros_like(k) + self.q_offset  # query positions that see k: [first, last]
        last = first + length_q - 1
        if self.is_causal:
            first = jnp.maximum(first, k)
        if self.window is not None:
            left, right = self.window
            first, last = jnp.maximum(first, k - right), jnp.minimum(last, k + left)
        seen = first <= last
        return seen if self.kv_length is None else seen & (k < self.kv_length)


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
