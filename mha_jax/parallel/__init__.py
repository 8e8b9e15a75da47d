"""Attention on a device mesh: head, context (sequence) and data parallelism.

    sharding.py  head parallelism: PartitionSpecs of MHAParams over a mesh axis
    layout.py    which sequence positions each device holds (contiguous, striped)
    ring.py      ring attention: K/V chunks travel around the devices (ppermute)
    ulysses.py   all-to-all attention: swap the sequence split for a head split
    gather.py    all-gather attention: every K/V chunk on every device (the baseline)
    layer.py     the whole layer over a data × sequence × heads mesh (`mesh_attention`)

The per-device functions (`ring_attention`, `all_to_all_attention`,
`all_gather_attention`) take one example's local chunk inside `jax.shard_map`;
`mesh_attention` takes global `[B, L, D]` arrays and places them itself.
"""

from mha_jax.parallel.gather import all_gather_attention
from mha_jax.parallel.layer import CONTEXTS, mesh_attention
from mha_jax.parallel.layout import LAYOUTS, Layout, from_layout, to_layout
from mha_jax.parallel.ring import ring_attention, ring_work
from mha_jax.parallel.sharding import (
    kv_heads_split,
    mesh_partition_names,
    param_specs,
    partition_names,
    shard_params,
)
from mha_jax.parallel.ulysses import all_to_all_attention

__all__ = [
    "CONTEXTS",
    "LAYOUTS",
    "Layout",
    "all_gather_attention",
    "all_to_all_attention",
    "from_layout",
    "kv_heads_split",
    "mesh_partition_names",
    "mesh_attention",
    "param_specs",
    "partition_names",
    "ring_attention",
    "ring_work",
    "shard_params",
    "to_layout",
]
