"""A few new queries against a long cache: one loop over key blocks, shared by the whole batch.

    heads = scan_cache(q [B, T, H, Dh], k_cache, v_cache [B, S, Hkv, Dh], structure, options=options)

The registry's one *batched* kernel (`kernels.attend_batch`): the others attend one
example at a time under `vmap`. Decoding is bound by reading the cache, so this path is
written for the memory traffic:

- The loop runs over the blocks any example can see (from `Structure.keys_seen`, the
  smallest start to the largest end in the batch), with one scalar block index for the
  whole batch. Each step slices `[B, C, Hkv, Dh]` out of the cache in its own layout:
  a plain slice, where a per-example loop under `vmap` became a gather and a re-layout.
- The keys of a block are one GEMM with the cache's `Hkv·Dh` features as the contraction:
  `K [B, C, Hkv·Dh] @ Qᵦ [B, Hkv·Dh, H·T]`, where `Qᵦ` is block-diagonal (query head h
  sits in the rows of its KV head). It multiplies zeros, `Hkv` times the useful FLOPs, but
  reads K once, contiguously, which is what a decode step is short of. The values are the
  same GEMM the other way, `Pᵀ [B, H·T, C] @ V [B, C, Hkv·Dh]`; each query head keeps its
  own KV head's slice at the end.
- The softmax is online over the blocks, in float32, as in the blockwise kernel: a running
  max, sum and accumulator per (head, query); a row that sees no key gives zeros.
- The rules are the batch's `Structure`, every array of it with a leading B; each block
  reads its example's own rules (`allows`), so every position rule (causal, kv_length,
  window, chunk, prefix) works here as in the other kernels; a mask function is called on
  every entry of the blocks read (no block table: a decode step reads few rows).

The numbers agree with the blockwise and reference kernels to float32 rounding
(tests/test_decoding.py); `implementation="auto"` chooses it on CPU for a batch of at
most `SCAN_MAX_NEW` queries against a padded cache of over `BLOCKWISE_MIN_CACHE` slots
(docs/bench_decode.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax import alibi, score_mod, stages
from mha_jax.kernels.request import Request, float32_softmax_limits, fused_limits
from mha_jax.masks import Structure
from mha_jax.options import Options

SCAN_MAX_NEW = 16  # above this many new tokens, the block-diagonal waste outgrows the gain
BLOCK = 2048  # keys per step: big enough to amortise the loop, small enough to stay near the cache


def cannot(request: Request) -> list[str]:
    reasons = fused_limits(request) + float32_softmax_limits(request)
    if not request.batched:
        reasons.append("attend one example at a time (it runs a whole batch: kernels.attend_batch, "
                       "as cached_attention does)")  # fmt: skip
    if request.has_mask or request.has_bias:
        reasons.append("take a dense mask or bias (it reads the rules only)")
    if request.structure.segment_ids is not None:
        reasons.append("take segment ids (use the blockwise kernel)")
    return reasons


def run(q, k, v, *, structure: Structure, options: Options, sinks=None) -> Array:
    return scan_cache(q, k, v, structure, options=options, sinks=sinks)


def scan_cache(
    q: Array, k_cache: Array, v_cache: Array, structure: Structure, *, options: Options, block: int = BLOCK,
    sinks: Array | None = None,
) -> Array:  # fmt: skip
    """`q [B, T, H, Dh]` against caches `[B, S, Hkv, Dh]` under `structure` (each of its
    arrays `[B]`: one example's rules per row) -> heads `[B, T, H, Dh]` in q's dtype. No
    bias, mask or dropout. sinks `[H]`: each head's logit starts every row's running softmax
    (max = the sink, sum = 1, nothing accumulated), so it takes its share of the mass."""
    example = lambda b: jax.tree.map(lambda a: a[b], structure)  # example b's rules

    batch, new, heads, width = q.shape
    slots, kv_heads = k_cache.shape[1], k_cache.shape[2]
    block = min(block, slots)
    scale = options.scale if options.scale is not None else 1.0 / math.sqrt(width)

    # Qᵦ [B, Hkv·Dh, H·T]: query head h in the rows of its KV head g = h // (H / Hkv).
    owner = jax.nn.one_hot(jnp.arange(heads) // (heads // kv_heads), kv_heads, dtype=jnp.float32)  # [H, Hkv]
    scaled = q.astype(jnp.float32) * jnp.float32(scale)
    q_blocks = jnp.einsum("bthd,hg->bgdht", scaled, owner).reshape(batch, kv_heads * width, heads * new)

    # One step per (example, block): the example's keys [C, Hkv·Dh] are one contiguous slice
    # of the cache (slicing all B examples' blocks at once copies a strided [B, C, ...]: slower).
    # Every example runs the blocks of the batch's longest range; a block it cannot see is
    # masked out whole (the cost of a ragged batch).
    lo, hi = jax.vmap(lambda rules: rules.keys_seen(0, new - 1, slots))(structure)  # [B]
    first = jnp.min(jnp.where(hi > lo, lo, slots)) // block
    count = jnp.maximum((jnp.max(hi) + block - 1) // block - first, 0)  # blocks per example
    rows = jnp.arange(new)
    slopes = None
    head_ids = example(0).head_offset + jnp.arange(heads)  # the layer's head numbers
    if options.alibi:
        slopes = alibi.head_slopes(options.alibi, heads, example(0).head_offset).astype(jnp.float32)  # [H]

    def step(j, carry):
        top, total, acc = carry  # [B, H·T], [B, H·T], [B, H·T, Hkv·Dh]
        b, i = j // count, first + j % count
        # The last block may overhang the cache: slice inside it and skip the keys already seen.
        start = jnp.minimum(i * block, slots - block)
        keys = start + jnp.arange(block)  # [C]
        # (a bfloat16 cache: XLA:CPU widens the operand of a dynamic slice to float32, and
        # hoists that out of the loop: the whole cache, every step; see docs/bench_decode.md)
        k = jax.lax.dynamic_slice(k_cache, (b, start, 0, 0), (1, block, kv_heads, width)).astype(jnp.float32)
        v = jax.lax.dynamic_slice(v_cache, (b, start, 0, 0), (1, block, kv_heads, width)).astype(jnp.float32)
        k, v = k.reshape(block, kv_heads * width), v.reshape(block, kv_heads * width)  # [C, Hkv·Dh]
        # [1 or H, T, C]: per head only with a mask function, called on every entry of the block
        visible = example(b).allows_per_head(rows, keys, head_ids) & (keys >= i * block)
        # Hidden slots hold anything (unfilled, old values): zero them, as every kernel does
        # (the values for the output, the keys for the gradients; measured free here).
        seen = visible.any(axis=(0, 1))[:, None]  # [C, 1]
        k, v = jnp.where(seen, k, 0), jnp.where(seen, v, 0)  # [C, Hkv·Dh]
        scores = k @ q_blocks[b]  # [C, H·T]
        if options.softcap is not None:
            scores = stages.soft_cap(scores[None], options.softcap)[0]  # the stage takes [H, Lq, Lk]
        if slopes is not None:  # column h·T + t: slope_h · (key - query t), example b's positions
            rules = example(b)
            distance = (keys + rules.k_offset)[:, None] - (rows + rules.q_offset)[None, :]  # [C, T]
            scores = scores + (slopes[None, :, None] * distance[:, None, :].astype(jnp.float32)).reshape(
                scores.shape
            )
        if options.score_mod is not None:  # on the [H, T, C] grid of example b's positions
            rules = example(b)
            grid = scores.reshape(block, heads, new).transpose(1, 2, 0)
            grid = score_mod.apply(
                options.score_mod, grid, head_ids, rows + rules.q_offset, keys + rules.k_offset
            )
            scores = grid.transpose(2, 0, 1).reshape(scores.shape)
        seen = jnp.broadcast_to(visible.transpose(2, 0, 1), (block, heads, new)).reshape(scores.shape)
        scores = jnp.where(seen, scores, -jnp.inf)
        new_top = jnp.maximum(top[b], scores.max(axis=0))  # [H·T]
        safe = jnp.where(jnp.isfinite(new_top), new_top, 0)  # no key yet: exp(-inf - 0) = 0
        weights = jnp.where(seen, jnp.exp(scores - safe), 0)  # [C, H·T]
        rescale = jnp.exp(top[b] - safe)  # 0 while top is -inf
        return (
            top.at[b].set(new_top),
            total.at[b].set(total[b] * rescale + weights.sum(axis=0)),
            acc.at[b].set(acc[b] * rescale[:, None] + weights.T @ v),  # [H·T, Hkv·Dh]
        )

    top, total = (
        jnp.full((batch, heads * new), -jnp.inf, jnp.float32),
        jnp.zeros((batch, heads * new), jnp.float32),
    )
    if sinks is not None:  # row h·T + t starts at its head's sink: max = sink, sum = exp(0) = 1
        top = jnp.broadcast_to(jnp.repeat(sinks.astype(jnp.float32), new), top.shape)
        total = jnp.ones_like(total)
    carry = (top, total, jnp.zeros((batch, heads * new, kv_heads * width), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, batch * count, step, carry)
    out = jnp.where(total[..., None] > 0, acc / jnp.where(total > 0, total, 1)[..., None], 0)
    out = out.reshape(batch, heads, new, kv_heads, width)
    out = jnp.einsum("bhtgd,hg->bthd", out, owner)  # each query head's own KV head
    return out.astype(q.dtype)
