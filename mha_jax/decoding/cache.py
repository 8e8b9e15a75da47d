"""The KV cache: keys and values of the positions already seen, as one value.

    KVCache(k [B, S, Hkv, Dh], v [B, S, Hkv, Dh], length [B] int32)

`S` is the capacity; example b has filled slots `[0, length[b])` (a batch may be
ragged). Keys are stored rotated (RoPE is applied at their positions before
they are written), so a step never rotates them again. A pytree: it passes
through `jax.jit`, and `jax.jit(step, donate_argnums=...)` updates it in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax import _checks


class KVCache(NamedTuple):
    k: Array  # [B, S, Hkv, Dh]
    v: Array  # [B, S, Hkv, Dh]
    length: Array  # [B] int32, filled slots per example

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


def init_cache(batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
    """An empty cache: zeros, and no slot filled. `dtype` is what the keys and values are
    stored in: floating (a narrower one than the computation's stores them rounded)."""
    for name, value in (("batch", batch), ("capacity", capacity), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):  # fmt: skip
        _checks.check_positive(name, value)
    try:
        floating = jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"dtype must be a floating dtype (the cache stores keys and values); got {dtype!r}")
    shape = (batch, capacity, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def append(k_cache: Array, v_cache: Array, length: Array, k_new: Array, v_new: Array, count: Array):
    """One example: write the first `count` of the new `[T, Hkv, Dh]` keys and values
    at slots `length, length + 1, ...`; returns `(k_cache, v_cache, length + count)`.

    Rows from `count` on (a shorter prompt in a padded batch) and slots beyond
    the capacity are dropped, never written elsewhere (a scatter with
    mode="drop", which XLA runs in place on a donated cache)."""
    capacity, new = k_cache.shape[0], k_new.shape[0]
    rows = jnp.arange(new, dtype=jnp.int32)
    slots = jnp.where(rows < count, length + rows, capacity)  # `capacity`: out of range, dropped
    k_cache = k_cache.at[slots].set(k_new.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[slots].set(v_new.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache, jnp.minimum(length + count, capacity)


def check_room(cache: KVCache, counts) -> None:
    """Eagerly (concrete values): appending `counts` [B] must fit the capacity."""
    filled = cache.length + counts
    if isinstance(filled, jax.core.Tracer):
        return
    over = [b for b, n in enumerate(jax.device_get(filled)) if n > cache.capacity]
    if over:
        raise _checks.fail(
            "cache", f"have room for the new tokens (capacity S={cache.capacity})",
            f"examples {over} would hold {[int(jax.device_get(filled)[b]) for b in over]} positions",
        )  # fmt: skip


def raise_if_full(filled, capacity) -> None:
    """Host callback of the checked mode: the same check on traced lengths."""
    over = [b for b, n in enumerate(filled) if n > capacity]
    if over:
        raise ValueError(
            f"cache must have room for the new tokens (capacity S={capacity}); got examples {over} "
            f"that would hold {[int(filled[b]) for b in over]} positions"
        )
