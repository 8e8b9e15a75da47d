"""Head parallelism (tensor parallelism): where each parameter lives on a mesh axis.

Head `h` owns the features `h·Dh:(h+1)·Dh` of the projections, so splitting the
*columns* of `w_q`, `w_k`, `w_v` (and their biases) `n` ways gives each device whole
heads, and splitting the *rows* of `w_o` the same way gives it the matching inputs of
the output projection. Each device then attends with its own heads and nothing
crosses the mesh until the output projection, whose per-device partial sums add up
(one psum of `[B, L, D_out]`); `b_o` is added once, after it. Megatron-LM's layout.

    w_q [D, H·Dh]        split columns      b_q [H·Dh]     split
    w_k [D_kv, Hkv·Dh]   split columns, or replicated (below)
    w_v [D_kv, Hkv·Dh]   as w_k             b_k, b_v       as w_k
    w_o [H·Dh, D_out]    split rows         b_o [D_out]    replicated
    q_norm, k_norm [Dh]  replicated (one scale shared by every head)

The rule for the key/value heads (grouped-query attention), with `n` the axis size:
`H` must be divisible by `n`. If `Hkv` is too, the kv heads are split like the query
heads (device d holds kv heads d·Hkv/n ... and their query groups). Otherwise, if `n`
is divisible by `Hkv` (fewer kv heads than devices), the kv projections are
*replicated*: each device's `H/n` query heads then read one kv head, `d·Hkv // n`,
and the device projects only that one (a slice of its copy of the weight), so the
compute stays split and only the kv weights are repeated. Anything else (e.g. H=12,
Hkv=3, n=4) cannot give every device whole query groups: an error naming Hkv.
"""

from __future__ import annotations

import jax
from jax import Array
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mha_jax import _checks
from mha_jax.params import PARAM_NAMES, MHAParams


def check_axis(name: str, axis: str | None, mesh) -> int:
    """The size of mesh axis `axis` (1 for None), or an error naming the argument."""
    if axis is None:
        return 1
    if axis not in mesh.axis_names:
        raise _checks.fail(name, f"name an axis of the mesh {tuple(mesh.axis_names)}", repr(axis))
    return mesh.shape[axis]


def kv_heads_split(num_heads: int, num_kv_heads: int, axis_size: int, axis: str = "heads") -> bool:
    """True: the kv heads are split over the axis; False: they are replicated (module
    docstring). An error when the heads cannot be shared out in whole groups."""
    _checks.check_positive("num_heads", num_heads)
    _checks.check_positive("num_kv_heads", num_kv_heads)
    if num_heads % axis_size:
        raise _checks.fail(
            "num_heads", f"be divisible by the size of mesh axis {axis!r} ({axis_size})", num_heads
        )
    if num_kv_heads % axis_size == 0:
        return True
    if axis_size % num_kv_heads == 0:
        return False
    raise _checks.fail(
        "num_kv_heads",
        f"divide, or be divisible by, the size of mesh axis {axis!r} ({axis_size}): the kv heads are "
        "split when divisible and replicated when fewer",
        num_kv_heads,
    )


def partition_names(
    num_heads: int, num_kv_heads: int, *, axis_size: int, heads_axis: str = "heads"
) -> dict[str, tuple[str | None, ...]]:
    """The mesh axis of each dimension of each parameter, by name (`None`: not split),
    for every name a layer may have (a layer without biases or QK-norm uses the rest).
    The form `flax.nnx.Param(..., out_sharding=names)` and `nnx.with_partitioning` take."""
    kv = heads_axis if kv_heads_split(num_heads, num_kv_heads, axis_size, heads_axis) else None
    names = dict(
        w_q=(None, heads_axis),
        b_q=(heads_axis,),
        w_k=(None, kv),
        b_k=(kv,),
        w_v=(None, kv),
        b_v=(kv,),
        w_o=(heads_axis, None),
        b_o=(None,),
        q_norm=(None,),  # one [Dh] scale shared by every head: on every device
        k_norm=(None,),
        sinks=(heads_axis,),  # one per query head: with its head
    )
    return {name: names[name] for name in PARAM_NAMES}


def head_counts(params: MHAParams, num_heads: int) -> tuple[int, int]:
    """(H, Hkv) of `params`, as the core derives Hkv from the projections' widths."""
    _checks.check_positive("num_heads", num_heads)
    _checks.check_divides("params.w_q.shape[1] (H*Dh)", params.w_q.shape[1], "num_heads", num_heads)
    head_dim = params.w_q.shape[1] // num_heads
    _checks.check_divides("params.w_k.shape[1] (Hkv*Dh)", params.w_k.shape[1], "Dh", head_dim)
    return num_heads, params.w_k.shape[1] // head_dim


def param_specs(
    params: MHAParams, mesh: Mesh, *, num_heads: int, heads_axis: str | None = "heads"
) -> MHAParams:
    """`MHAParams` of `PartitionSpec`s (None where a bias is absent) for head parallelism
    over `heads_axis` (None: everything replicated)."""
    size = check_axis("heads_axis", heads_axis, mesh)
    num_heads, num_kv_heads = head_counts(params, num_heads)
    if heads_axis is None:
        return MHAParams(*(None if p is None else P() for p in params))
    names = partition_names(num_heads, num_kv_heads, axis_size=size, heads_axis=heads_axis)
    return MHAParams(*(None if p is None else P(*names[n]) for n, p in zip(PARAM_NAMES, params, strict=True)))


def shard_params(
    params: MHAParams, mesh: Mesh, *, num_heads: int, heads_axis: str | None = "heads"
) -> MHAParams:
    """`params` placed on `mesh` by `param_specs`: ready for `jax.jit` (the partitioner then
    keeps each device's heads local) or for `mesh_attention`."""
    specs = param_specs(params, mesh, num_heads=num_heads, heads_axis=heads_axis)
    return MHAParams(
        *(
            None if p is None else jax.device_put(p, NamedSharding(mesh, s))
            for p, s in zip(params, specs, strict=True)
        )
    )


def local_kv(w: Array, b: Array | None, *, split: bool, heads_axis: str, axis_size: int, num_kv_heads: int):
    """Inside `shard_map`: this device's kv projection `(w [D_kv, Hkv_local·Dh], b)`.
    Split: already local. Replicated: the one kv head this device's query heads read,
    `d·Hkv // n`, sliced out of the whole weight (its gradient lands in that slice; the
    psum over the axis that `shard_map` adds for a replicated input sums the slices)."""
    if split:
        return w, b
    head_dim = w.shape[1] // num_kv_heads
    start = jax.lax.axis_index(heads_axis) * num_kv_heads // axis_size * head_dim
    take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, head_dim, axis=axis)
    return take(w, 1), None if b is None else take(b, 0)


def mesh_partition_names(
    num_heads: int, num_kv_heads: int, heads_axis: str | None
) -> dict[str, tuple[str | None, ...]]:
    """`partition_names` for a module built inside `with jax.set_mesh(mesh):`, the size
    of `heads_axis` read from that mesh; `{}` (nothing split) for `heads_axis=None`.
    What a Flax module passes as `out_sharding` of each parameter it creates."""
    if heads_axis is None:
        return {}
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise _checks.fail(
            "heads_axis",
            "name an axis of the mesh set around the module's construction "
            "(`with jax.set_mesh(mesh):`); there is no mesh set",
            repr(heads_axis),
        )
    size = check_axis("heads_axis", heads_axis, mesh)
    return partition_names(num_heads, num_kv_heads, axis_size=size, heads_axis=heads_axis)
