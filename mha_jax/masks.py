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

import dataclasses
from typing import Any

import jax
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


# The rules' fields that may hold arrays (traced under jit and vmap); a Python int there is
# static, part of the compilation's key (a kernel that needs q_offset = 0 can see it).
ARRAY_FIELDS = ("q_offset", "k_offset", "kv_length", "segment_ids", "prefix", "head_offset")


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class Structure:
    """A mask given by rules rather than by an array: a public value to build and pass.

    Query row i sits at position `p = i + q_offset`, key j at `t = j + k_offset`; key j is
    visible to row i when every rule given allows it:

    is_causal:   t <= p (or, with `prefix`, t < prefix).
    q_offset:    position of query 0 (an int, or an int array: traced).
    k_offset:    position of key 0 (0 unless the keys are a chunk of a longer sequence).
    head_offset: the layer's index of the call's head 0 (0 unless a call holds a share of
                 the heads: a mesh device); what a rule or score option of heads reads.
    kv_length:   j < kv_length: keys from kv_length on are padding (None: no padding;
                 clamped to [0, Lk]).
    window:      (left, right): p - left <= t <= p + right.
    segment_ids: q_seg[i] == kv_seg[j]: packed documents, given as `(q_seg [Lq], kv_seg
                 [Lk])`, int (one array [L] for self-attention means the same for both).
    chunk:       p // chunk == t // chunk: attention within blocks of `chunk` positions
                 (Llama 4's chunked attention).
    prefix:      with is_causal, keys at t < prefix are visible to every row
                 (bidirectional prefix, causal after it: prefix-LM).
    mask_mod:    `fn(head, q_idx, kv_idx) -> bool`, FlexAttention's `mask_mod`, written for
                 one entry (vmapped over a tile): the layer's head number and the positions
                 p and t. It may close over arrays (per-document data). Static: part of
                 the compilation's key. The kernels that take it (reference, blockwise)
                 build a block table from it (`mask_mod_blocks`) and skip empty tiles.

    A pytree: the static rules (is_causal, window, chunk, and int positions) are its
    metadata, the arrays its leaves, so it crosses `jit`, `vmap` and `custom_vjp` as one
    argument; batched calls give its arrays a leading B.

    Everything the library knows about a structure derives from it here: the dense mask
    (`allows`), and per row or key, the range of keys a run of query rows may see and the
    range of rows that may see a run of keys (`keys_seen`, `rows_seeing`, and their "every
    one of them" forms). The blockwise kernel skips and un-masks whole blocks with these;
    the core zeroes hidden rows with `query_sees_any` and `key_seen_by_any`. Ranges are
    half-open `[lo, hi)` of row or key indices (empty: `hi == lo`); the bounds may be
    arrays (one range per element). They are exact for every rule but segment ids, whose
    ranges are exact when both arrays are non-decreasing (packed documents in order; the
    library checks at run time) and otherwise the widest (no skip, no un-masking: the
    dense mask still decides), so any layout gives the right numbers.
    """

    # Annotated Any: a Structure holds what it is given (lists, NumPy, a wrong type) until
    # the call that takes it checks it and names the field (`check_structure`).
    is_causal: Any = False  # bool
    q_offset: Any = 0  # int | Array
    kv_length: Any = None  # int | Array | None
    window: Any = None  # Window | None
    segment_ids: Any = None  # Array | tuple[Array, Array] | None
    chunk: Any = None  # int | None
    prefix: Any = None  # int | Array | None
    k_offset: Any = 0  # int | Array
    head_offset: Any = 0  # int | Array
    mask_mod: Any = None  # Callable | None

    # -- a pytree: arrays are leaves, the rest is static

    def __post_init__(self):
        # Which positional fields are static is decided here, once, from what was given (None
        # or a Python int): JAX maps a pytree's leaves to anything (None, axes, sentinels), and
        # the tree must keep its shape when it does.
        static = tuple(
            n for n in ARRAY_FIELDS if getattr(self, n) is None or _checks.is_int(getattr(self, n))
        )
        object.__setattr__(self, "_static", static)

    def tree_flatten_with_keys(self):
        leaves = [
            (jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in ARRAY_FIELDS if n not in self._static
        ]
        static = tuple((n, getattr(self, n)) for n in self._static)
        return leaves, (static, self.is_causal, self.window, self.chunk, self.mask_mod)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        static, is_causal, window, chunk, mask_mod = aux
        fields = dict(static, is_causal=is_causal, window=window, chunk=chunk, mask_mod=mask_mod)
        fields.update(zip([n for n in ARRAY_FIELDS if n not in fields], leaves, strict=True))
        # Not through __init__: the leaves may be of any kind (vmap's in_axes, sentinels).
        structure = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(structure, name, value)
        object.__setattr__(structure, "_static", tuple(name for name, _ in static))
        return structure

    def replace(self, **changes) -> Structure:
        return dataclasses.replace(self, **changes)

    @property
    def is_trivial(self) -> bool:
        """No rule at all: every key visible to every row."""
        return (not self.is_causal and self.kv_length is None and self.window is None
                and self.segment_ids is None and self.chunk is None and self.mask_mod is None)  # fmt: skip

    # -- the dense form

    def allows(self, q_pos: Int[Array, " Lq"], k_pos: Int[Array, " Lk"]) -> Bool[Array, "Lq Lk"]:
        """Evaluate the rules on the given rows and keys (a block, or all of them): row and
        key indices (positions are `q_pos + q_offset`, `k_pos + k_offset`)."""
        p = (q_pos + self.q_offset)[:, None]
        t = (k_pos + self.k_offset)[None, :]
        allowed = jnp.ones((q_pos.shape[0], k_pos.shape[0]), dtype=bool)
        if self.is_causal:
            allowed &= (t <= p) if self.prefix is None else (t <= p) | (t < self.prefix)
        if self.kv_length is not None:
            allowed &= k_pos[None, :] < self.kv_length
        if self.window is not None:
            left, right = self.window
            allowed &= (t >= p - left) & (t <= p + right)
        if self.chunk is not None:
            allowed &= jnp.floor_divide(p, self.chunk) == jnp.floor_divide(t, self.chunk)
        if self.segment_ids is not None:
            q_seg, kv_seg = self.segments
            allowed &= _at(q_seg, q_pos)[:, None] == _at(kv_seg, k_pos)[None, :]
        return allowed

    def allows_per_head(self, q_pos: Array, k_pos: Array, heads: Array) -> Bool[Array, "H Lq Lk"]:
        """`allows` and `mask_mod` for the given rows, keys and layer head numbers `[H]`."""
        allowed = self.allows(q_pos, k_pos)[None]
        if self.mask_mod is None:
            return allowed
        return allowed & mask_mod_grid(self.mask_mod, heads, q_pos + self.q_offset, k_pos + self.k_offset)

    @property
    def segments(self) -> tuple[Array, Array] | None:
        """`(q_seg, kv_seg)`, or None."""
        ids = self.segment_ids
        return ids if ids is None or isinstance(ids, tuple | list) else (ids, ids)

    # -- ranges

    def keys_seen(self, first, last, length_k: int):
        """Keys `[lo, hi)` that *some* query row in `[first, last]` may see."""
        return self._keys(first, last, length_k, every=False)

    def keys_seen_by_all(self, first, last, length_k: int):
        """Keys `[lo, hi)` that *every* query row in `[first, last]` may see."""
        return self._keys(first, last, length_k, every=True)

    def rows_seeing(self, first, last, length_q: int):
        """Query rows `[lo, hi)` that may see *some* key in `[first, last]`."""
        return self._rows(first, last, length_q, every=False)

    def rows_seeing_all(self, first, last, length_q: int):
        """Query rows `[lo, hi)` that may see *every* key in `[first, last]`."""
        return self._rows(first, last, length_q, every=True)

    def _keys(self, first, last, length_k: int, *, every: bool):
        """In positions: "some" takes the widest row of the run for each bound (the first row
        for the lower, the last for the upper), "every" the narrowest."""
        p_lo, p_hi = (last, first) if every else (first, last)  # rows deciding lo, and hi
        p_lo, p_hi = p_lo + self.q_offset, p_hi + self.q_offset
        t0 = self.k_offset
        lo, hi = jnp.zeros_like(p_lo), jnp.full_like(p_hi, length_k)
        if self.kv_length is not None:
            hi = jnp.minimum(hi, self.kv_length)
        if self.is_causal:
            seen = p_hi + 1 if self.prefix is None else jnp.maximum(p_hi + 1, self.prefix)
            hi = jnp.minimum(hi, seen - t0)
        if self.window is not None:
            left, right = self.window
            lo, hi = jnp.maximum(lo, p_lo - left - t0), jnp.minimum(hi, p_hi + right + 1 - t0)
        if self.chunk is not None:
            c_first = jnp.floor_divide(first + self.q_offset, self.chunk)
            c_last = jnp.floor_divide(last + self.q_offset, self.chunk)
            lo = jnp.maximum(lo, c_last * self.chunk - t0 if every else c_first * self.chunk - t0)
            hi = jnp.minimum(hi, (c_first + 1) * self.chunk - t0 if every else (c_last + 1) * self.chunk - t0)
            if every:  # rows in two chunks share no key
                hi = jnp.where(c_first == c_last, hi, lo)
        if self.segment_ids is not None:
            q_seg, kv_seg = self.segments
            lo, hi = _segment_range(q_seg, kv_seg, first, last, lo, hi, every)
        if every and self.mask_mod is not None:  # it may hide any entry (its block table knows)
            hi = lo
        return lo, jnp.maximum(hi, lo)

    def _rows(self, first, last, length_q: int, *, every: bool):
        """Rows, for keys `[first, last]`: positions `first + k_offset` ... ."""
        t_lo, t_hi = (last, first) if every else (first, last)  # keys deciding lo, and hi
        t_lo, t_hi = t_lo + self.k_offset, t_hi + self.k_offset
        q0 = self.q_offset
        lo = jnp.zeros_like(first)
        hi = jnp.full_like(last, length_q)
        if self.kv_length is not None:  # keys from kv_length on are hidden from every row
            hidden = (last >= self.kv_length) if every else (first >= self.kv_length)
            hi = jnp.where(hidden, lo, hi)
        if self.is_causal:  # some (every) key at t <= p: p >= the first (last) key
            need = t_lo - q0
            if self.prefix is not None:  # keys before the prefix are visible to every row
                need = jnp.where(t_lo < self.prefix, 0, need)
            lo = jnp.maximum(lo, need)
        if self.window is not None:  # p - left <= t and p + right >= t
            left, right = self.window
            lo = jnp.maximum(lo, t_lo - right - q0)
            hi = jnp.minimum(hi, t_hi + left - q0 + 1)
        if self.chunk is not None:
            c_first = jnp.floor_divide(first + self.k_offset, self.chunk)
            c_last = jnp.floor_divide(last + self.k_offset, self.chunk)
            lo = jnp.maximum(lo, (c_last if every else c_first) * self.chunk - q0)
            hi = jnp.minimum(hi, ((c_first if every else c_last) + 1) * self.chunk - q0)
            if every:
                hi = jnp.where(c_first == c_last, hi, lo)
        if self.segment_ids is not None:
            q_seg, kv_seg = self.segments
            lo, hi = _segment_range(kv_seg, q_seg, first, last, lo, hi, every)
        if every and self.mask_mod is not None:
            hi = lo
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


def mask_mod_grid(fn, heads: Array, q_pos: Array, k_pos: Array) -> Bool[Array, "H Lq Lk"]:
    """`fn(head, q, k)` for every head `[H]`, query position `[Lq]` and key position `[Lk]`."""
    over_keys = jax.vmap(lambda h, q, k: jnp.asarray(fn(h, q, k), bool), in_axes=(None, None, 0))
    over_rows = jax.vmap(over_keys, in_axes=(None, 0, None))
    grid = jax.vmap(over_rows, in_axes=(0, None, None))
    return grid(heads.astype(jnp.int32), q_pos.astype(jnp.int32), k_pos.astype(jnp.int32))


def _at(ids: Array, index) -> Array:
    """`ids[index]`, the index clipped into the array (a block's padding rows read the last id)."""
    return ids[jnp.clip(index, 0, ids.shape[0] - 1)]


def _non_decreasing(ids: Array) -> Array:
    return jnp.all(ids[1:] >= ids[:-1])


def _segment_range(own, other, first, last, lo, hi, every: bool):
    """`[lo, hi)` narrowed to the indices of `other` whose segment id is among those of
    `own[first..last]` ("some"), or equal to all of them ("every"). Exact when both arrays
    are non-decreasing: a run of ids is then `[own[first], own[last]]` and its indices in
    `other` one interval, found by binary search. Otherwise "some" keeps `[lo, hi)` and
    "every" is empty: no skip, no un-masking, and the dense mask decides."""
    if own.shape[0] == 0 or other.shape[0] == 0:
        return lo, lo if every else hi
    first_id, last_id = _at(own, first), _at(own, last)
    start = jnp.searchsorted(other, first_id, side="left").astype(lo.dtype)
    stop = jnp.searchsorted(other, last_id, side="right").astype(hi.dtype)
    ordered = _non_decreasing(own) & _non_decreasing(other)
    if every:  # rows of one segment see all its keys; rows of two share none
        ordered &= first_id == last_id
        return jnp.maximum(lo, start), jnp.where(ordered, jnp.minimum(hi, stop), lo)
    return jnp.where(ordered, jnp.maximum(lo, start), lo), jnp.where(ordered, jnp.minimum(hi, stop), hi)


def check_structure(structure, length_q: int, length_k: int, batch: int | None = None, *, name="") -> None:
    """The rules of one example (`batch=None`) or of a batch of B: q_offset, kv_length and
    prefix int scalars (or `[B]`; a scalar is shared), segment ids int `[Lq]` and `[Lk]`
    (`[B, ...]`), a prefix within `[0, Lk]` (eagerly), chunk a positive int. Messages name
    each field `name + field` (`name="structure."` for a Structure passed as such)."""
    if not isinstance(structure, Structure):
        raise TypeError(f"structure must be an mha_jax.Structure; got {type(structure).__name__}")
    if structure.chunk is not None and not (_checks.is_int(structure.chunk) and structure.chunk > 0):
        raise _checks.fail(f"{name}chunk", "be a positive int (static) or None", repr(structure.chunk))
    if structure.mask_mod is not None and not callable(structure.mask_mod):
        raise TypeError(f"{name}mask_mod must be a function (head, q_idx, kv_idx) -> bool or None; "
                        f"got {structure.mask_mod!r}")  # fmt: skip
    batched = batch is not None
    lead, legend = ((batch,), "[B, ") if batched else ((), "[")
    for field in ("q_offset", "kv_length", "prefix"):
        value = getattr(structure, field)
        if value is None:
            continue
        _checks.check_integer(name + field, value)
        if jnp.ndim(value) not in ((0, 1) if batched else (0,)):
            raise _checks.fail(name + field, "be a scalar" + (" or have shape [B]" if batched else ""),
                               f"shape {jnp.shape(value)}")  # fmt: skip
        if batched and jnp.ndim(value) == 1:
            _checks.check_shape(name + field, value, (batch,), "[B]")
    if structure.prefix is not None:
        if structure.is_causal is not True:  # without it the prefix relaxes nothing: ignored
            causal = "come with is_causal=True (a causal mask with a bidirectional prefix)"
            raise _checks.fail(f"{name}prefix", causal, f"is_causal={structure.is_causal!r}")
        check_prefix(structure, length_k, name=name)
    segments = structure.segments
    if segments is not None:
        single = not isinstance(structure.segment_ids, tuple)
        if single and length_q != length_k:
            pair = f"be a pair ({legend}Lq], {legend}Lk]) when Lq != Lk (one array serves self-attention)"
            raise _checks.fail(f"{name}segment_ids", pair, f"one array, Lq={length_q}, Lk={length_k}")
        for ids, length, side in ((segments[0], length_q, "Lq"), (segments[1], length_k, "Lk")):
            _checks.check_integer(f"{name}segment_ids", ids)
            _checks.check_shape(f"{name}segment_ids", ids, (*lead, length), f"{legend}{side}]")


def check_prefix(structure: Structure, length_k: int, *, name: str = "") -> None:
    """Eagerly, the prefix within `[0, Lk]` (traced, one past Lk just means every key)."""
    if structure.prefix is not None:
        _checks.check_range(f"{name}prefix", structure.prefix, 0, length_k, f"lie in [0, Lk={length_k}]")


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
