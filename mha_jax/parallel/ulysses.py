"""All-to-all (DeepSpeed-Ulysses) context parallelism: trade the sequence split for a
head split, attend locally, trade back.

Each of the N devices on `axis_name` holds a chunk of the sequence with every head,
`[C, H, Dh]`. One `all_to_all` sends head group g of each chunk to device g, which
then holds the whole sequence for `H/N` heads, `[L, H/N, Dh]`: ordinary attention,
with every mask rule the blockwise kernel knows. A second `all_to_all` brings the
heads back to their sequence chunks. Four all-to-alls per layer (q, out: `C·H·Dh`
values; k, v: `C·Hkv·Dh`), each moving `(N-1)/N` of its array: per device O(L/N)
traffic, against the ring's O(L).

Head-count limits (N the axis size): `H` divisible by `N`; `Hkv` divisible by `N`, or
`N` divisible by `Hkv`, in which case each kv head is repeated `N/Hkv` times before the
exchange (query head h still reads kv head h // G: the repeat keeps the grouping), so
the kv traffic grows to that of `N` heads. Under head parallelism too, these apply to
the heads *each* device holds. So N cannot exceed H: Ulysses scales with the head
count, the ring with the sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax import _checks
from mha_jax.kernels.blockwise import blockwise_attention
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.parallel.layout import Layout, bound_axis_size, check_layout_for, from_layout, to_layout
from mha_jax.parallel.ring import check_rules


def check_heads(num_heads: int, num_kv_heads: int, axis_size: int, axis_name: str, where: str = "") -> None:
    """The head-count limits above, as errors naming the count."""
    limit = f"the size of mesh axis {axis_name!r} ({axis_size}) for all-to-all attention{where}"
    if num_heads % axis_size:
        raise _checks.fail("num_heads (H)", f"be divisible by {limit}", num_heads)
    if num_kv_heads % axis_size and axis_size % num_kv_heads:
        raise _checks.fail("num_kv_heads (Hkv)", f"divide, or be divisible by, {limit}", num_kv_heads)


def all_to_all_attention(
    q: Array,  # [Cq, H, Dh] this device's queries
    k: Array,  # [Ck, Hkv, Dh]
    v: Array,  # [Ck, Hkv, Dh]
    *,
    axis_name: str,
    structure: Structure | None = None,
    options: Options | None = None,
    layout: Layout | None = None,
    block_sizes: tuple[int, int] | None = None,
    sinks: Array | None = None,  # float [H]
) -> Array:  # [Cq, H, Dh]
    """As `ring_attention` (same arguments, one example per device inside `jax.shard_map`),
    by all-to-all: every mask rule in global positions, any layout; the segment ids of
    every row are gathered (two `[L]` int arrays per device)."""
    axis_size = bound_axis_size(axis_name)
    layout = check_layout_for(layout, axis_name, axis_size)
    structure, options = check_rules(q, k, v, structure, options, block_sizes, axis_size * k.shape[0])
    num_heads = q.shape[1]
    check_heads(num_heads, k.shape[1], axis_size, axis_name)
    if k.shape[1] % axis_size:  # fewer kv heads than devices: one (repeated) kv head each
        k, v = (jnp.repeat(x, axis_size // k.shape[1], axis=1) for x in (k, v))

    def heads_to_sequence(x):  # [C, heads, Dh] -> [L, heads / N, Dh] (rows in layout order)
        return jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=0, tiled=True)

    q, k, v = (from_layout(heads_to_sequence(x), layout, axis=0) for x in (q, k, v))  # natural order
    if structure.segment_ids is not None:  # every row's id, in natural order
        gather = lambda ids: from_layout(jax.lax.all_gather(ids, axis_name, tiled=True), layout, axis=0)
        structure = structure.replace(segment_ids=tuple(gather(ids) for ids in structure.segment_ids))
    group = num_heads // axis_size  # the heads this device holds after the exchange: group `me`
    me = jax.lax.axis_index(axis_name)
    structure = structure.replace(head_offset=structure.head_offset + me * group)
    if options.alibi is True:  # the slopes are those of the call's heads, all of them
        options = dataclasses.replace(options, alibi=num_heads)
    if sinks is not None:  # the heads this device now holds: group `me` of the H (as q's exchange split them)
        sinks = _checks.check_sinks("sinks", sinks, num_heads)
        sinks = jax.lax.dynamic_slice_in_dim(sinks, me * group, group)
    heads = blockwise_attention(q, k, v, structure=structure, options=options, block_sizes=block_sizes,
                                sinks=sinks)  # fmt: skip
    heads = to_layout(heads, layout, axis=0)  # [Lq, H / N, Dh]
    return jax.lax.all_to_all(heads, axis_name, split_axis=0, concat_axis=1, tiled=True)  # [Cq, H, Dh]
