"""All-gather context parallelism: the baseline the ring is measured against.

Each device gathers every key/value chunk (`all_gather`, `[L, Hkv, Dh]` on every
device) and attends its own queries to all of them with the blockwise kernel; the
backward of the gather is a reduce-scatter of `dk`, `dv` (jax's transpose, no custom
VJP). The simplest context parallelism (MaxText's default): it moves the same
`(N-1)/N · 2·L·Hkv·Dh` values per device as the ring, but holds them all at once, so
per-device memory for K/V is O(L), not O(L/N). Contiguous layout only (striped
queries against naturally ordered keys are not a causal triangle), so causal work
is unbalanced: device N-1 does N times the work of device 0.
"""

from __future__ import annotations

import jax
from jax import Array

from mha_jax import _checks
from mha_jax.kernels.blockwise import blockwise_attention
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.parallel.layout import Layout, bound_axis_size, check_layout_for
from mha_jax.parallel.ring import check_rules


def all_gather_attention(
    q: Array,  # [Cq, H, Dh]
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
    """As `ring_attention` (one example per device inside `jax.shard_map`), by gathering
    every key and value (and the keys' segment ids) onto every device."""
    axis_size = bound_axis_size(axis_name)
    layout = check_layout_for(layout, axis_name, axis_size)
    if layout.kind != "contiguous":
        raise _checks.fail("layout", "be contiguous (None) for all-gather attention", repr(layout))
    structure, options = check_rules(q, k, v, structure, options, block_sizes, axis_size * k.shape[0])
    gather = lambda x: jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
    k, v = gather(k), gather(v)  # [Lk, Hkv, Dh]
    # Device d's query row a is global position d·Cq + a.
    structure = structure.replace(q_offset=structure.q_offset + jax.lax.axis_index(axis_name) * q.shape[0])
    if structure.segment_ids is not None:
        structure = structure.replace(
            segment_ids=(structure.segment_ids[0], gather(structure.segment_ids[1]))
        )
    return blockwise_attention(q, k, v, structure=structure, options=options, block_sizes=block_sizes,
                               sinks=sinks)  # fmt: skip
