"""The whole attention layer on a device mesh: data × sequence × heads.

`mesh_attention` is `mha_jax.batched_attention` for sequences too long, or layers
too wide, for one device. One `jax.shard_map` over the mesh; on each device:

    x_q [b, Cq, D], x_kv [b, Ck, D_kv]      b = B / data, C = L / seq (rows per `layout`)
      │ project_heads with this device's head columns (parallel/sharding.py),
      │ QK-norm, RoPE at the rows' global positions
      ▼
    q [b, Cq, H/h, Dh], k, v [b, Ck, Hkv/h, Dh]
      │ context parallelism over the seq axis, one example at a time (vmap):
      │   "ring" (ring.py), "all_to_all" (ulysses.py) or "all_gather" (gather.py)
      ▼
    heads [b, Cq, H/h, Dh]
      │ merge_project with this device's rows of w_o: a partial sum over its heads
      ▼ psum over the heads axis, + b_o once
    out [b, Cq, D_out]

Parameters replicated over the data and sequence axes get their gradients summed over
those axes by shard_map's transpose: the data-parallel all-reduce comes for free.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import PartitionSpec as P

from mha_jax import _checks, _validate, frame
from mha_jax.kernels.blockwise import blockwise_attention
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.parallel import sharding
from mha_jax.parallel.gather import all_gather_attention
from mha_jax.parallel.layout import Layout, check_layout_for
from mha_jax.parallel.ring import refuse_bands, ring_attention
from mha_jax.parallel.ulysses import all_to_all_attention, check_heads
from mha_jax.params import MHAParams
from mha_jax.rope import DynamicNTKScaling

CONTEXTS = {"ring": ring_attention, "all_to_all": all_to_all_attention, "all_gather": all_gather_attention}


class Plan(NamedTuple):
    """What each device does (static)."""

    data_axis: str | None
    seq_axis: str | None
    heads_axis: str | None
    heads_size: int
    num_heads: int  # H and Hkv of the whole layer
    num_kv_heads: int
    kv_split: bool  # kv heads split over the heads axis (else replicated: parallel/sharding.py)
    context: str
    layout: Layout
    options: Options
    block_sizes: tuple[int, int] | None
    length_q: int  # global lengths
    length_k: int


def mesh_attention(
    params: MHAParams,
    x_q: Array,  # [B, Lq, D]
    x_kv: Array | None = None,  # [B, Lk, D_kv]
    *,
    num_heads: int,
    mesh: jax.sharding.Mesh,
    data_axis: str | None = None,
    seq_axis: str | None = None,
    heads_axis: str | None = None,
    context: str = "ring",
    is_causal: bool = False,
    q_offset: int = 0,
    kv_length: int | Array | None = None,
    window: int | tuple[int, int] | None = None,
    structure: Structure | None = None,
    layout: Layout | None = None,
    options: Options | None = None,
    block_sizes: tuple[int, int] | None = None,
) -> Array:  # [B, Lq, D_out]
    """Multi-head attention over a batch, sharded over `mesh`: the batch over `data_axis`,
    the sequence over `seq_axis` (by `context`: "ring", "all_to_all" or "all_gather"),
    the heads over `heads_axis`. An axis left None is not used; mesh axes not named hold
    copies. Equals `mha_jax.batched_attention` up to float rounding.

    is_causal, q_offset (a Python int), kv_length (`[B]`), window: the mask rules in
    global positions, as in `batched_attention`, or `structure=`, which also takes
    segment ids `[B, L]` (or a pair; rows in the layout's order, like `x_q`), chunk and
    prefix (window, chunk and prefix not with a striped ring).
    layout: the order of the sequence rows in `x_q`, `x_kv` and the output (None:
    natural; `Layout("striped", N)` balances causal work, see `to_layout`).
    options: scale, dtype, softcap, rope, qk_norm_eps as in `mha_jax.Options` (no
    dropout; each device runs the blockwise kernel). Call inside `jax.jit`; the output
    is sharded `P(data_axis, seq_axis)`.
    """
    options = Options() if options is None else options
    params = _validate.as_params(params)
    x_q = _checks.as_array("x_q", x_q)
    x_kv = x_q if x_kv is None else _checks.as_array("x_kv", x_kv)
    plan = _plan(params, x_q, x_kv, mesh, num_heads, data_axis, seq_axis, heads_axis, context, options)
    batch, length_q, length_k = x_q.shape[0], x_q.shape[1], x_kv.shape[1]
    if seq_axis is None and layout is not None and layout.kind != "contiguous":
        raise _checks.fail(
            "layout", "be None or contiguous when no seq_axis shards the sequence", repr(layout)
        )
    layout = check_layout_for(layout, seq_axis, mesh.shape[seq_axis] if seq_axis else 1)
    if context == "all_gather" and layout.kind != "contiguous":
        raise _checks.fail("layout", 'be contiguous (None) for context="all_gather"', repr(layout))
    structure = _validate.settle_structure(
        structure, is_causal=is_causal, q_offset=q_offset, kv_length=kv_length, window=window
    )
    if not _checks.is_int(structure.q_offset):
        q_offset = structure.q_offset
        raise _checks.fail("q_offset", "be a Python int (the same for every example)", repr(q_offset))
    if context == "ring" and layout.kind == "striped":
        refuse_bands(structure)
    _validate.check_call(
        params, x_q, x_kv, num_heads=num_heads, mask=None, bias=None, structure=structure,
        options=options, rng=None, return_weights=False, batch=batch,
    )  # fmt: skip
    plan = plan._replace(
        layout=layout,
        block_sizes=None if block_sizes is None else tuple(block_sizes),
        length_q=length_q,
        length_k=length_k,
    )
    # Every array of the rules gets a leading B (a shared scalar is broadcast), so that each
    # splits over the data axis; segment ids split over the sequence too, as the rows do.
    per_example = lambda a: None if a is None else jnp.broadcast_to(a, (batch,)) if jnp.ndim(a) == 0 else a
    kv_length = None if structure.kv_length is None else jnp.clip(structure.kv_length, 0, length_k)
    structure = structure.replace(
        kv_length=per_example(kv_length),
        prefix=per_example(structure.prefix),
        segment_ids=None if structure.segment_ids is None else tuple(structure.segments),
    )
    leaves, treedef = jax.tree.flatten(structure)
    rule_specs = [P(data_axis, seq_axis) if jnp.ndim(leaf) == 2 else P(data_axis) for leaf in leaves]
    rows = P(data_axis, seq_axis)
    specs = sharding.param_specs(params, mesh, num_heads=num_heads, heads_axis=heads_axis)
    per_device = jax.shard_map(
        functools.partial(_on_each_device, plan=plan, treedef=treedef),
        mesh=mesh,
        in_specs=(specs, rows, rows, rule_specs),
        out_specs=rows,
    )
    return per_device(params, x_q, x_kv, leaves)


def _plan(params, x_q, x_kv, mesh, num_heads, data_axis, seq_axis, heads_axis, context, options) -> Plan:
    """Check the mesh, the shapes and the head counts against each other (trace time)."""
    if not isinstance(params, MHAParams):
        raise TypeError(f"params must be an mha_jax.MHAParams; got {type(params).__name__}")
    if not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    _checks.check_choice("context", context, list(CONTEXTS))
    if not isinstance(options, Options):
        raise TypeError(f"options must be an mha_jax.Options or None; got {type(options).__name__}")
    if options.dropout_rate > 0 or options.implementation not in ("auto", "blockwise"):
        raise _checks.fail(
            "options", 'have dropout_rate=0 and implementation "auto" or "blockwise" (the kernel '
            "mesh_attention runs on each device)", options,
        )  # fmt: skip
    sizes = {
        name: sharding.check_axis(name, axis, mesh)
        for name, axis in (("data_axis", data_axis), ("seq_axis", seq_axis), ("heads_axis", heads_axis))
    }
    named = [axis for axis in (data_axis, seq_axis, heads_axis) if axis is not None]
    if len(set(named)) != len(named):
        raise _checks.fail("data_axis, seq_axis and heads_axis", "name different mesh axes", named)
    _checks.check_rank("x_q", x_q, 3, "[B, Lq, D]")
    _checks.check_rank("x_kv", x_kv, 3, "[B, Lk, D_kv]")
    data = f"the size of data_axis {data_axis!r}"
    _checks.check_divides("x_q.shape[0] (B)", x_q.shape[0], data, sizes["data_axis"])
    seq = f"the size of seq_axis {seq_axis!r}"
    _checks.check_divides("x_q.shape[1] (Lq)", x_q.shape[1], seq, sizes["seq_axis"])
    _checks.check_divides("x_kv.shape[1] (Lk)", x_kv.shape[1], seq, sizes["seq_axis"])
    num_heads, num_kv_heads = sharding.head_counts(params, num_heads)
    heads_size = sizes["heads_axis"]
    split = sharding.kv_heads_split(num_heads, num_kv_heads, heads_size, heads_axis) if heads_axis else True
    if context == "all_to_all" and seq_axis is not None:
        local_kv = num_kv_heads // heads_size if split else 1
        where = f" (per device of heads_axis {heads_axis!r})" if heads_axis else ""
        check_heads(num_heads // heads_size, local_kv, sizes["seq_axis"], seq_axis, where)
    if options.alibi is True:  # each device holds a share of the heads: the slopes are the layer's
        options = dataclasses.replace(options, alibi=num_heads)
    return Plan(
        data_axis, seq_axis, heads_axis, heads_size, num_heads, num_kv_heads, split, context,
        Layout(), options, None, 0, 0,
    )  # fmt: skip


def _on_each_device(params: MHAParams, x_q, x_kv, leaves, *, plan: Plan, treedef):
    """One device: `[b, Cq, D], [b, Ck, D_kv] -> [b, Cq, D_out]`, the rules' arrays `[b, ...]`
    (`leaves` of `treedef`): the layer frame with this device's heads, its rows' global
    positions, the sequence-parallel attend, and the output projection's partial sums added
    over the heads axis."""
    chunk_q, chunk_k = x_q.shape[1], x_kv.shape[1]
    replicated = dict(split=plan.kv_split, heads_axis=plan.heads_axis, axis_size=plan.heads_size)
    w_k, b_k = sharding.local_kv(params.w_k, params.b_k, num_kv_heads=plan.num_kv_heads, **replicated)
    w_v, b_v = sharding.local_kv(params.w_v, params.b_v, num_kv_heads=plan.num_kv_heads, **replicated)
    shard = 0 if plan.seq_axis is None else jax.lax.axis_index(plan.seq_axis)
    q_rows = plan.layout.positions(shard, chunk_q)  # [Cq] global row numbers of our queries
    k_rows = plan.layout.positions(shard, chunk_k)  # [Ck] and keys
    per_example = lambda f, *arrays: jax.vmap(lambda *a: f(*a[:-1], jax.tree.unflatten(treedef, a[-1])))(
        *arrays, leaves
    )

    def hide(x_q, x_kv):
        hide_one = functools.partial(_hide_unseen_rows, q_rows=q_rows, k_rows=k_rows, plan=plan)
        return per_example(hide_one, x_q, x_kv)

    def attend(q, k, v, sinks):  # sinks [H/h]: this device's heads' (split with them)
        return per_example(
            functools.partial(_attend, plan=plan, sinks=sinks), q, k, v
        ), None  # [b, Cq, H/h, Dh]

    def reduce(out):  # this device's heads times its rows of w_o: a partial sum
        return out if plan.heads_axis is None else jax.lax.psum(out, plan.heads_axis)

    batch = x_q.shape[0]
    q_offset = treedef.unflatten(leaves).q_offset  # a Python int: static
    positions = (  # RoPE at the rows' global positions, whatever the layout
        jnp.broadcast_to(q_rows + q_offset, (batch, chunk_q)),
        jnp.broadcast_to(k_rows, (batch, chunk_k)),
    )
    rope_length = None
    rope = plan.options.rope
    if rope is not None and isinstance(rope.scaling, DynamicNTKScaling):
        # It scales for the whole sequence's length, not this device's rows'.
        longest = jnp.maximum(positions[0].max(), positions[1].max())
        longest = longest if plan.seq_axis is None else jax.lax.pmax(longest, plan.seq_axis)
        rope_length = jnp.full((batch,), longest + 1)
    local = params._replace(w_k=w_k, b_k=b_k, w_v=w_v, b_v=b_v)
    out, _ = frame.layer(local, x_q, x_kv, num_heads=plan.num_heads // plan.heads_size, options=plan.options,
                         hide=hide, attend=attend, positions=positions, rope_length=rope_length,
                         reduce=reduce)  # fmt: skip
    return out  # [b, Cq, D_out]


def _attend(q, k, v, structure: Structure, *, plan: Plan, sinks=None):
    """One example on one device: `[Cq, H/h, Dh], [Ck, Hkv/h, Dh] x2 -> [Cq, H/h, Dh]`, its
    rules in global positions (its segment ids this device's rows)."""
    settings = dict(options=plan.options, block_sizes=plan.block_sizes, sinks=sinks)
    if plan.heads_axis is not None:  # this device's heads are a slice of the layer's
        structure = structure.replace(head_offset=jax.lax.axis_index(plan.heads_axis) * q.shape[1])
    if plan.seq_axis is None:
        return blockwise_attention(q, k, v, structure=structure, **settings)
    return CONTEXTS[plan.context](q, k, v, axis_name=plan.seq_axis, structure=structure, layout=plan.layout,
                                  **settings)  # fmt: skip


def _hide_unseen_rows(x_q, x_kv, structure: Structure, *, q_rows, k_rows, plan: Plan):
    """Zero the key rows no query may see and the query rows that see nothing (one
    example, this device's rows, given by their global row numbers), as
    `mha_jax.core.zero_hidden_rows` does: garbage, NaN included, in padding then never
    reaches a valid row or a gradient. By every rule but segment ids, whose other rows
    lie on other devices: a row hidden by them alone is attended to as zero weights."""
    rules = structure.replace(segment_ids=None)
    if rules.is_trivial:
        return x_q, x_kv
    lo, hi = rules.keys_seen(q_rows, q_rows, plan.length_k)
    query_sees = hi > lo
    lo, hi = rules.rows_seeing(k_rows, k_rows, plan.length_q)
    key_seen = hi > lo
    return jnp.where(query_sees[:, None], x_q, 0), jnp.where(key_seen[:, None], x_kv, 0)
