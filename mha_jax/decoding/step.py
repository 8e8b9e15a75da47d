"""One call for prefill and decode: attend new tokens against a KV cache.

    out, cache = cached_attention(params, x [B, T, D], cache, num_heads=H)

For each example: project the T new tokens; QK-norm and RoPE q and k at their
positions (`cache.length + 0..T-1` unless `positions` says otherwise); append
the first `lengths[b]` keys and values to the cache; attend the queries to the
filled slots, causally (query t sees slots up to `length + t`), within a sliding
`window` if given; merge and project. Prefilling a prompt, then decoding one
token at a time, gives the outputs of one causal forward over the sequence.

A padded batch of prompts is ragged: `lengths` [B] says how many of the T rows
of each example are real; only those are appended, and the rows past them get
zero heads (their output is the output bias). For a cache over 512 slots,
"auto" visits only the key blocks some example can see, so a step costs what
the filled length costs, whatever the capacity: on CPU a step of at most 16
tokens runs one block loop for the whole batch (the "scan" kernel,
`kernels/scan.py`, written for the memory traffic of decoding), a longer one (a
prefill) the blockwise kernel; `kernels.choose` decides, as for every call.

Besides the causal rule, a step takes the position rules of `Structure`: a
sliding `window`, Llama 4's `chunk`, a bidirectional `prefix` (prefill the
prefix in one step: a prefix token sees the prefix tokens after it only when
they come in the same step). Packed segment ids are not a decoding rule: the
cache holds one sequence per example.

What a step trusts, and what it does with values it cannot check:

- Eagerly (concrete values) every input is checked: `lengths` in `[0, T]`,
  `cache.length` in `[0, S]`, room for the new tokens; a ValueError names the
  argument. The cache holds keys and values of a floating dtype (a narrower
  one than the computation, such as bfloat16, stores them rounded).
- Under `jax.jit` the values are traced and cannot raise for free: `lengths`
  is clamped to `[0, T]` and `cache.length` to `[0, S]`, the tokens that do not
  fit are dropped and `length` stops at the capacity, so a step only ever
  writes slots `[length, length + count)` of its own example.
  `check_capacity=True` adds a host callback that raises the capacity error at
  run time; JAX reports it as a `jax.errors.JaxRuntimeError` (a RuntimeError)
  whose message holds ours, when the result is awaited (and logs the callback's
  traceback).
- The cache's unfilled slots, and the slots a window hides, may hold anything
  (a reused buffer, a recycled page): no NaN there reaches an output.
- A step of T = 0 tokens returns `[B, 0, D_out]` and the cache unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from mha_jax import _checks, _validate, frame, kernels
from mha_jax.decoding.cache import KVCache, append, check_room, raise_if_full
from mha_jax.masks import Structure, check_structure
from mha_jax.options import Options
from mha_jax.params import MHAParams


def cached_attention(
    params: MHAParams,
    x: ArrayLike,
    cache: KVCache,
    *,
    num_heads: int,
    lengths: ArrayLike | None = None,
    positions: ArrayLike | None = None,
    window: int | tuple[int, int] | None = None,
    chunk: int | None = None,
    prefix: int | ArrayLike | None = None,
    mask_mod: Callable | None = None,
    scale: float | None = None,
    dtype: DTypeLike | None = None,
    implementation: str = "auto",
    options: Options | None = None,
    check_capacity: bool = False,
) -> tuple[Array, KVCache]:
    """Self-attention of `x [B, T, D]` over `cache` and itself: `(out [B, T, D_out], cache)`.

    lengths:   [B] int, new rows per example to keep (default: all T).
    positions: [B, T] int RoPE positions (default: `cache.length[b] + t`).
    window:    sliding window; keys more than `left` slots back are hidden.
    chunk:     a query sees only the keys of its own block of `chunk` positions (Llama 4).
    prefix:    int or [B]: keys before it are visible to every query (prefix-LM).
    mask_mod:  `fn(head, q_idx, kv_idx) -> bool`, a mask function (`Structure.mask_mod`) at the
               cache's slots: query t of example b is slot `cache.length[b] + t`.
    scale, dtype, implementation: the settings, or `options=Options(...)` (its
    rope, softcap and qk_norm_eps apply; dropout does not: decoding is deterministic).
    """
    rules = Structure(is_causal=True, window=window, chunk=chunk, prefix=prefix, mask_mod=mask_mod)
    structure, options = _validate.settle(
        rules, options, deterministic=True, is_causal=False, q_offset=0, kv_length=None, window=None,
        scale=scale, dropout_rate=0.0, dtype=dtype, implementation=implementation,
    )  # fmt: skip
    params = _validate.as_params(params)
    x = _checks.as_array("x", x)
    _checks.check_rank("x", x, 3, "[B, T, D]")
    _checks.check_floating("x", x)
    _checks.check_bool_flag("check_capacity", check_capacity)
    sizes = _validate.check_call(params, x, x, num_heads=num_heads, mask=None, bias=None,
                                 structure=structure.replace(prefix=None), options=options, rng=None,
                                 return_weights=False, batch=x.shape[0])  # fmt: skip
    batch, new = x.shape[:2]
    cache = check_cache(cache, batch, sizes)
    check_structure(structure.replace(window=None), new, cache.capacity, batch)  # a prefix: within the cache
    if lengths is None:
        lengths = jnp.full((batch,), new, jnp.int32)
    lengths = _checks.as_array("lengths", lengths)
    _checks.check_integer("lengths", lengths)
    _checks.check_shape("lengths", lengths, (batch,), "[B]")
    _checks.check_range("lengths", lengths, 0, new, f"lie in [0, T={new}] (new rows to keep)")
    if positions is not None:
        positions = _checks.as_array("positions", positions)
        _checks.check_integer("positions", positions)
        _checks.check_shape("positions", positions, (batch, new), "[B, T]")
    # Traced values cannot be checked: clamped, a step writes inside its own example's range.
    lengths = jnp.clip(lengths, 0, new).astype(jnp.int32)
    cache = cache._replace(length=jnp.clip(cache.length, 0, cache.capacity).astype(jnp.int32))
    check_room(cache, lengths)
    if check_capacity:
        jax.debug.callback(raise_if_full, cache.length + lengths, cache.capacity, ordered=True)
    if new == 0:  # nothing to append or attend
        out_dtype = x.dtype if options.dtype is None else options.dtype
        return jnp.zeros((batch, 0, params.w_o.shape[1]), out_dtype), cache
    return _cached(params, x, cache, lengths, positions, num_heads=num_heads, structure=structure,
                   options=options)  # fmt: skip


def check_cache(cache: KVCache, batch: int, sizes: _validate.Sizes) -> KVCache:
    """The cache, its fields as arrays (NumPy is welcome), checked against the call; eagerly,
    its lengths too."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an mha_jax.decoding.KVCache; got {type(cache).__name__}")
    cache = KVCache(
        *(_checks.as_array(f"cache.{name}", a) for name, a in zip(KVCache._fields, cache, strict=True))
    )
    legend = f"[B, S, Hkv, Dh]=({batch}, *, {sizes.num_kv_heads}, {sizes.head_dim}) (Hkv and Dh of params)"
    for name in ("k", "v"):
        array = getattr(cache, name)
        ok = jnp.ndim(array) == 4 and tuple(jnp.shape(array)[i] for i in (0, 2, 3)) == (
            batch, sizes.num_kv_heads, sizes.head_dim)  # fmt: skip
        if not ok:
            raise _checks.fail(f"cache.{name}", f"have shape {legend}", f"shape {tuple(jnp.shape(array))}")
        # An integer cache would truncate every key written to it: never what was meant.
        _checks.check_floating(f"cache.{name}", array)
    _checks.check_shape("cache.v", cache.v, cache.k.shape, "cache.k's shape")
    _checks.check_integer("cache.length", cache.length)
    _checks.check_shape("cache.length", cache.length, (batch,), "[B]")
    _checks.check_range("cache.length", cache.length, 0, cache.capacity,
                        f"lie in [0, S={cache.capacity}] (filled slots)")  # fmt: skip
    return cache


def _cached(
    params, x, cache: KVCache, lengths, positions, *, num_heads, structure: Structure, options: Options
):
    """The data path, unchecked (`lengths` in [0, T] and `cache.length` in [0, S], int32;
    `structure` the step's position rules): the layer frame with the decode step's attend,
    which appends the new keys and values (rotated: the cache holds rotated keys, so they are
    never rotated again) and attends to the cache."""
    batch, new, _ = x.shape
    kept = jnp.arange(new) < lengths[:, None]  # [B, T]: the real rows of a ragged batch
    if positions is None:
        positions = cache.length[:, None] + jnp.arange(new, dtype=jnp.int32)  # [B, T]
    per_example = lambda a: None if a is None else jnp.broadcast_to(a, (batch,))

    def hide(x, _):  # padding rows hold anything: zero them
        x = jnp.where(kept[..., None], x, 0)
        return x, x

    def attend(q, k, v, sinks):  # q [B, T, H, Dh], k and v [B, T, Hkv, Dh]
        k_cache, v_cache, filled = jax.vmap(append)(cache.k, cache.v, cache.length, k, v, lengths)
        # Query t of example b sits at slot length[b] + t and sees the filled slots by the rules.
        rules = structure.replace(
            q_offset=cache.length, kv_length=filled, prefix=per_example(structure.prefix)
        )
        heads = kernels.attend_batch(q, k_cache, v_cache, sinks=sinks, structure=rules, options=options)
        return jnp.where(kept[..., None, None], heads, 0), KVCache(k_cache, v_cache, filled)

    return frame.layer(params, x, x, num_heads=num_heads, options=options, hide=hide, attend=attend,
                       positions=(positions, positions))  # fmt: skip
