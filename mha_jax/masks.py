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

from mha_jax import _checks

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
    """A mask given by rules rather than by an array: a public value to build and pass.

    is_causal: key j visible to query i only if j <= i + q_offset.
    q_offset:  position of query 0 (an int, or a traced int scalar).
    kv_length: keys at j >= kv_length are padding (None: no padding; clamped to [0, Lk]).
    window:    (left, right): key j visible only if
               i + q_offset - left <= j <= i + q_offset + right.

    Everything the library knows about a structure derives from it here: the
    dense mask (`allows`), and, in O(1) per row or key, the range of keys a
    run of query rows may see and the range of rows that may see a run of keys
    (`keys_seen`, `rows_seeing`, and their "every one of them" forms). The
    blockwise kernel skips and un-masks whole blocks with these; the core
    zeroes hidden rows with `query_sees_any` and `key_seen_by_any`.
    Ranges are half-open `[lo, hi)` with `hi == lo` when empty; the bounds may
    be arrays (one range per element), ints or traced scalars.
    """

    is_causal: bool = False
    q_offset: int | Array = 0
    kv_length: int | Array | None = None
    window: Window | None = None

    @property
    def is_trivial(self) -> bool:
        return not self.is_causal and self.kv_length is None and self.window is None

    def allows(self, q_pos: Int[Array, " Lq"], k_pos: Int[Array, " Lk"]) -> Bool[Array, "Lq Lk"]:
        """Evaluate the rules on the given rows and keys (a block, or all of them)."""
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

    def keys_seen(self, first, last, length_k: int):
        """Keys `[lo, hi)` that *some* query row in `[first, last]` may see."""
        pos_first, pos_last = first + self.q_offset, last + self.q_offset
        lo, hi = jnp.zeros_like(pos_first), jnp.full_like(pos_last, length_k)
        if self.kv_length is not None:
            hi = jnp.minimum(hi, self.kv_length)
        if self.is_causal:
            hi = jnp.minimum(hi, pos_last + 1)
        if self.window is not None:
            left, right = self.window
            lo, hi = jnp.maximum(lo, pos_first - left), jnp.minimum(hi, pos_last + right + 1)
        return lo, jnp.maximum(hi, lo)

    def keys_seen_by_all(self, first, last, length_k: int):
        """Keys `[lo, hi)` that *every* query row in `[first, last]` may see."""
        pos_first, pos_last = first + self.q_offset, last + self.q_offset
        lo, hi = jnp.zeros_like(pos_first), jnp.full_like(pos_last, length_k)
        if self.kv_length is not None:
            hi = jnp.minimum(hi, self.kv_length)
        if self.is_causal:
            hi = jnp.minimum(hi, pos_first + 1)
        if self.window is not None:
            left, right = self.window
            lo, hi = jnp.maximum(lo, pos_last - left), jnp.minimum(hi, pos_first + right + 1)
        return lo, jnp.maximum(hi, lo)

    def rows_seeing(self, first, last, length_q: int):
        """Query rows `[lo, hi)` that may see *some* key in `[first, last]`."""
        if self.kv_length is not None:  # keys from kv_length on are hidden from every row
            last = jnp.minimum(last, self.kv_length - 1)
        lo = jnp.zeros_like(first)
        hi = jnp.where(last >= first, jnp.full_like(first, length_q), lo)
        if self.is_causal:  # some position >= first
            lo = jnp.maximum(lo, first - self.q_offset)
        if self.window is not None:  # position - left <= last and position + right >= first
            left, right = self.window
            lo = jnp.maximum(lo, first - right - self.q_offset)
            hi = jnp.minimum(hi, last + left - self.q_offset + 1)
        return lo, jnp.maximum(hi, lo)

    def rows_seeing_all(self, first, last, length_q: int):
        """Query rows `[lo, hi)` that may see *every* key in `[first, last]`."""
        lo = jnp.zeros_like(first)
        hi = jnp.full_like(last, length_q)
        if self.kv_length is not None:
            hi = jnp.where(last < self.kv_length, hi, 0)
        if self.is_causal:  # position >= last
            lo = jnp.maximum(lo, last - self.q_offset)
        if self.window is not None:  # position - left <= first and position + right >= last
            left, right = self.window
            lo = jnp.maximum(lo, last - right - self.q_offset)
            hi = jnp.minimum(hi, first + left - self.q_offset + 1)
        return lo, jnp.maximum(hi, lo)

    def query_sees_any(self, length_q: int, length_k: int) -> Bool[Array, " Lq"]:
        """`[Lq]`: may query row i see any key? O(Lq), no `[Lq, Lk]` array."""
        rows = jnp.arange(length_q)
        lo, hi = self.keys_seen(rows, rows, length_k)
        return hi > lo

    def key_seen_by_any(self, length_q: int, length_k: int) -> Bool[Array, " Lk"]:
        """`[Lk]`: may some query see key j? O(Lk), no `[Lq, Lk]` array."""
        keys = jnp.arange(length_k)
        lo, hi = self.rows_seeing(keys, keys, length_q)
        return hi > lo


def causal_mask(length_q: int, length_k: int | None = None, *, q_offset: ArrayLike = 0) -> Array:
    """`[Lq, Lk]` lower-triangular mask, top-left aligned and shifted by `q_offset`."""
    length_k = length_q if length_k is None else length_k
    _check_lengths(length_q, length_k)
    return Structure(is_causal=True, q_offset=q_offset).allows(jnp.arange(length_q), jnp.arange(length_k))


def local_mask(
    length_q: int, length_k: int, window: int | tuple[int, int], *, q_offset: ArrayLike = 0
) -> Array:
    """`[Lq, Lk]` band mask: each query sees keys within `window` positions."""
    _check_lengths(length_q, length_k)
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
    _check_lengths(length_q, length_k)
    kv_lengths = jnp.asarray(kv_lengths)[..., None, None]
    mask = jnp.arange(length_k) < kv_lengths
    mask = jnp.broadcast_to(mask, (*mask.shape[:-2], length_q, length_k))
    if q_lengths is not None:
        q_lengths = jnp.asarray(q_lengths)[..., None, None]
        mask = mask & (jnp.arange(length_q)[:, None] < q_lengths)
    return mask


def _check_lengths(length_q, length_k) -> None:
    _checks.check_length("length_q", length_q)
    _checks.check_length("length_k", length_k)


def combine(*masks: ArrayLike | None) -> Array | None:
    """Logical AND of the given masks (broadcasting); `None` entries are skipped."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out
