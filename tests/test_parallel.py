"""Attention on a device mesh (`mha_jax.parallel`): every strategy equals the single-device
reference, the ring holds O(L/N) per device, the striped layout balances causal work, and
bad input is named.

The checks that need several devices run in one subprocess with 8 forced host devices
(the device count is fixed when jax starts): this file, run as a script, calls
`on_eight_devices()` and prints one JSON line that the tests below read. The rest run
here: shapes and errors need only an abstract mesh (`jax.eval_shape`).
"""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import mha_jax as mj
from mha_jax import kernels, parallel
from mha_jax.decoding import DynamicNTKScaling, RoPE
from mha_jax.kernels import blockwise
from mha_jax.masks import Structure

AUTO = jax.sharding.AxisType.Auto
ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8


# The README's "Scaling out" example, verbatim (it runs as pasted when XLA_FLAGS sets 8
# host devices). Once the section is in README.md, read it from there instead.
def readme_example() -> str:
    """The README's mesh example (the python block that builds a ("data", "seq", "heads") mesh)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    (example,) = [block for block in blocks if '("data", "seq", "heads")' in block]
    return example


# ---------------------------------------------------------------------------
# Here, in this process: layouts, the load balance, the kv-head rule, the pieces, bad input


def test_striped_layout_puts_every_nth_position_on_each_device():
    layout = parallel.Layout("striped", 4)
    x = jnp.arange(2 * 12 * 3).reshape(2, 12, 3)  # [B, L, D]
    striped = parallel.to_layout(x, layout)
    for device in range(4):
        rows = striped[:, device * 3 : (device + 1) * 3]  # the contiguous shard of device d
        np.testing.assert_array_equal(rows, x[:, layout.positions(device, 3)])
    np.testing.assert_array_equal(layout.positions(1, 3), [1, 5, 9])
    np.testing.assert_array_equal(parallel.from_layout(striped, layout), x)
    np.testing.assert_array_equal(parallel.to_layout(x, parallel.Layout()), x)  # contiguous: as is


def test_striped_layout_balances_causal_work_within_ten_percent():
    """Tiles each device's forward visits over the whole ring, read from the kernel's loop
    bounds: equal with the striped layout (padded or not), and 10x apart contiguously."""
    sizes = dict(axis_size=8, length_q=8192, structure=Structure(is_causal=True))
    striped = parallel.ring_work(**sizes, layout=parallel.Layout("striped", 8))
    padded = parallel.ring_work(
        axis_size=8, length_q=8192, structure=Structure(is_causal=True, kv_length=5000),
        layout=parallel.Layout("striped", 8),
    )  # fmt: skip
    contiguous = parallel.ring_work(**sizes)
    for work in (striped, padded):
        assert work.max() <= 1.1 * work.min(), work
    assert contiguous.max() >= 8 * contiguous.min(), contiguous  # what the layout is for
    assert striped.max() < contiguous.max()  # the ring's critical path is shorter


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, axis_size, kv",
    [(8, 8, 4, "heads"), (8, 4, 4, "heads"), (8, 2, 4, None), (8, 1, 8, None), (4, 2, 2, "heads")],
)
def test_kv_heads_are_split_when_divisible_and_replicated_when_fewer(num_heads, num_kv_heads, axis_size, kv):
    names = parallel.partition_names(num_heads, num_kv_heads, axis_size=axis_size)
    assert names["w_q"] == (None, "heads") and names["b_q"] == ("heads",)
    assert names["w_k"] == names["w_v"] == (None, kv) and names["b_k"] == (kv,)
    assert names["w_o"] == ("heads", None) and names["b_o"] == (None,)
    assert names["q_norm"] == names["k_norm"] == (None,)


def test_pieces_over_key_chunks_merge_into_the_whole():
    """`attention_with_lse` on two key chunks, merged through the lse, is the whole
    attention; `attention_backward_with_lse` given the whole (out, lse) gives each chunk's
    dk, dv and a share of dq that add up to the whole gradient."""
    rng = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(rng[0], (19, 6, 4))  # [Lq, H, Dh]
    k, v = (jax.random.normal(r, (23, 2, 4)) for r in rng[1:3])  # [Lk, Hkv, Dh]
    d_out = jax.random.normal(rng[3], q.shape)
    whole = Structure(is_causal=True, q_offset=6, kv_length=20)
    chunks = (0, 11), (11, 23)  # two pieces of the keys, as two devices would hold them

    @jax.jit
    def pieces_and_whole(q, k, v, d_out):
        blocks = dict(block_sizes=(8, 8))
        rules = [
            Structure(True, 6 - lo, jnp.clip(20 - lo, 0, hi - lo)) for lo, hi in chunks
        ]  # key lo at row 0
        out, lse = 0.0, -jnp.inf
        for (lo, hi), rule in zip(chunks, rules, strict=True):
            out_c, lse_c = blockwise.attention_with_lse(q, k[lo:hi], v[lo:hi], structure=rule, **blocks)
            total = jnp.logaddexp(lse, lse_c)
            weight = lambda x, total=total: jnp.exp(x - total)[..., None]
            out, lse = out * weight(lse) + out_c * weight(lse_c), total
        grads = [
            blockwise.attention_backward_with_lse(
                q, k[lo:hi], v[lo:hi], out, lse, d_out, structure=rule, **blocks
            )
            for (lo, hi), rule in zip(chunks, rules, strict=True)
        ]
        dq, dk, dv = grads[0][0] + grads[1][0], *(jnp.concatenate([g[i] for g in grads]) for i in (1, 2))
        reference = lambda q, k, v: kernels.attend(
            q, k, v, mask=None, bias=None, structure=whole, options=mj.Options(implementation="reference"),
            rng=None, return_weights=False,
        )[0]  # fmt: skip
        expected, pullback = jax.vjp(reference, q, k, v)
        return (out, dq, dk, dv), (expected, *pullback(d_out))

    pieces, whole_results = pieces_and_whole(q, k, v, d_out)
    chex.assert_trees_all_close(pieces, whole_results, rtol=1e-5, atol=1e-5)


def _abstract(*axes):
    """An abstract mesh from (size, name) pairs: enough to trace, no devices needed."""
    sizes, names = zip(*axes, strict=True)
    return AbstractMesh(sizes, names, axis_types=(AUTO,) * len(sizes))


def _mesh(*axes):
    """A mesh of the first devices from (size, name) pairs."""
    sizes, names = zip(*axes, strict=True)
    return jax.make_mesh(
        sizes, names, axis_types=(AUTO,) * len(sizes), devices=jax.devices()[: np.prod(sizes)]
    )


MESH = _abstract((2, "data"), (8, "seq"), (4, "heads"))
SEQ8 = _abstract((8, "seq"))


def _layer(num_heads=8, num_kv_heads=4, length=32, batch=2, **kwargs):
    """`mesh_attention` traced (not run) on an abstract mesh."""
    init = functools.partial(
        mj.init_params, d_model=16, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=4
    )
    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((batch, length, 16), jnp.float32)
    layer = functools.partial(parallel.mesh_attention, num_heads=num_heads, **{"mesh": MESH, **kwargs})
    return jax.eval_shape(layer, params, x)


def _per_device(function, length=32, num_heads=8, **kwargs):
    """A per-device function traced inside shard_map over the abstract "seq" axis of 8."""
    spec = P("seq")
    sharded = jax.shard_map(functools.partial(function, **kwargs), mesh=SEQ8, in_specs=spec, out_specs=spec)
    q = jax.ShapeDtypeStruct((length, num_heads, 4), jnp.float32)
    kv = jax.ShapeDtypeStruct((length, 2, 4), jnp.float32)
    return jax.eval_shape(sharded, q, kv, kv)


def _learning_a_table(context):
    """The gradient of a table that a mesh path's score_mod closes over, traced (not run)."""
    init = functools.partial(mj.init_params, d_model=16, num_heads=8, num_kv_heads=4, head_dim=4)
    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((2, 32, 16), jnp.float32)

    def loss(table, params, x):
        options = mj.Options(score_mod=lambda s, h, q, k: s + table[h])
        out = parallel.mesh_attention(params, x, num_heads=8, mesh=MESH, seq_axis="seq", context=context,
                                      options=options)  # fmt: skip
        return jnp.sum(out)

    return jax.eval_shape(jax.grad(loss), jax.ShapeDtypeStruct((8,), jnp.float32), params, x)


BAD_INPUTS = [
    # (what, call, exception, message)
    (
        "sequence not divisible by the ring",
        lambda: _layer(length=30, seq_axis="seq"),
        ValueError,
        r"x_q.shape\[1\] \(Lq\) must be divisible by the size of seq_axis 'seq'=8; got 30",
    ),
    (
        "heads not divisible by the head axis",
        lambda: _layer(num_heads=6, num_kv_heads=6, heads_axis="heads"),
        ValueError,
        r"num_heads must be divisible by the size of mesh axis 'heads' \(4\); got 6",
    ),
    (
        "kv heads neither split nor replicated",
        lambda: _layer(num_heads=12, num_kv_heads=3, heads_axis="heads"),
        ValueError,
        r"num_kv_heads must divide, or be divisible by, the size of mesh axis 'heads' \(4\).*; got 3",
    ),
    (
        "mesh axis that does not exist",
        lambda: _layer(seq_axis="sequence"),
        ValueError,
        r"seq_axis must name an axis of the mesh \('data', 'seq', 'heads'\); got 'sequence'",
    ),
    (
        "striped layout made for another ring size",
        lambda: _layer(seq_axis="seq", is_causal=True, layout=parallel.Layout("striped", 4)),
        ValueError,
        r"layout must be made for the 8 devices of mesh axis 'seq' .*\(Layout\('striped', 8\)\); "
        r"got Layout\(kind='striped', num_shards=4\)",
    ),
    (
        "striped layout for the all-gather baseline",
        lambda: _layer(seq_axis="seq", context="all_gather", layout=parallel.Layout("striped", 8)),
        ValueError,
        r'layout must be contiguous \(None\) for context="all_gather"; got Layout',
    ),
    (
        "striped layout without a sequence axis",
        lambda: _layer(heads_axis="heads", layout=parallel.Layout("striped", 8)),
        ValueError,
        r"layout must be None or contiguous when no seq_axis shards the sequence",
    ),
    (
        "window with a striped ring",
        lambda: _layer(seq_axis="seq", window=4, layout=parallel.Layout("striped", 8)),
        ValueError,
        r"window must be None for a striped ring",
    ),
    (
        "ALiBi with a striped ring",
        lambda: _layer(
            seq_axis="seq",
            is_causal=True,
            layout=parallel.Layout("striped", 8),
            options=mj.Options(alibi=True),
        ),
        ValueError,
        r"options.alibi must be False for a striped ring \(use a contiguous one\); got True",
    ),  # fmt: skip
    (
        "score_mod with a striped ring",
        lambda: _layer(
            seq_axis="seq",
            is_causal=True,
            layout=parallel.Layout("striped", 8),
            options=mj.Options(score_mod=lambda s, h, q, k: s - 0.1 * h),
        ),
        ValueError,
        r"options.score_mod must be None for a striped ring \(use a contiguous one\)",
    ),  # fmt: skip
    *[
        (
            f"{context} learning what its score_mod closes over",
            functools.partial(_learning_a_table, context),
            ValueError,
            r"options.score_mod must close over no array that is being differentiated inside "
            r"jax.shard_map \(the mesh paths: ring, all-to-all, all-gather\); it closes over 1",
        )
        for context in ("ring", "all_to_all", "all_gather")
    ],
    (
        "mask_mod with a striped ring",
        lambda: _layer(
            seq_axis="seq",
            layout=parallel.Layout("striped", 8),
            structure=Structure(is_causal=True, mask_mod=lambda h, q, k: q - k < 4),
        ),
        ValueError,
        r"mask_mod must be None for a striped ring",
    ),  # fmt: skip
    (
        "unknown layout kind",
        lambda: _layer(seq_axis="seq", layout=parallel.Layout("zigzag", 8)),
        ValueError,
        r"layout.kind must be one of \['contiguous', 'striped'\]; got 'zigzag'",
    ),
    (
        "all-to-all with fewer heads than devices",
        lambda: _layer(num_heads=4, num_kv_heads=4, seq_axis="seq", context="all_to_all"),
        ValueError,
        r"num_heads \(H\) must be divisible by the size of mesh axis 'seq' \(8\) for all-to-all",
    ),
    (
        "all-to-all after the head split",
        lambda: _layer(seq_axis="seq", heads_axis="heads", context="all_to_all"),
        ValueError,
        r"num_heads \(H\) must be divisible by .* \(per device of heads_axis 'heads'\); got 2",
    ),
    (
        "unknown context",
        lambda: _layer(seq_axis="seq", context="zigzag"),
        ValueError,
        r"context must be one of \['ring', 'all_to_all', 'all_gather'\]; got 'zigzag'",
    ),
    (
        "one axis for two roles",
        lambda: _layer(data_axis="seq", seq_axis="seq"),
        ValueError,
        r"data_axis, seq_axis and heads_axis must name different mesh axes; got \['seq', 'seq'\]",
    ),
    (
        "batch not divisible by the data axis",
        lambda: _layer(batch=3, data_axis="data"),
        ValueError,
        r"x_q.shape\[0\] \(B\) must be divisible by the size of data_axis 'data'=2; got 3",
    ),
    (
        "dropout on a mesh",
        lambda: _layer(seq_axis="seq", options=mj.Options(dropout_rate=0.1)),
        ValueError,
        r"options must have dropout_rate=0",
    ),
    (
        "ring outside shard_map",
        lambda: parallel.ring_attention(
            jnp.ones((4, 2, 4)), jnp.ones((4, 2, 4)), jnp.ones((4, 2, 4)), axis_name="seq"
        ),
        ValueError,
        r"axis_name must name a mesh axis of the enclosing jax.shard_map .*; got 'seq'",
    ),
    (
        "ring over an axis the mesh lacks",
        lambda: _per_device(parallel.ring_attention, axis_name="sequence"),
        ValueError,
        r"axis_name must name a mesh axis .*; got 'sequence'",
    ),
    (
        "per-device ring, layout for another ring size",
        lambda: _per_device(parallel.ring_attention, axis_name="seq", layout=parallel.Layout("striped", 2)),
        ValueError,
        r"layout must be made for the 8 devices of mesh axis 'seq'",
    ),
    (
        "per-device all-to-all, too few heads",
        lambda: _per_device(parallel.all_to_all_attention, num_heads=4, axis_name="seq"),
        ValueError,
        r"num_heads \(H\) must be divisible by the size of mesh axis 'seq' \(8\)",
    ),
    (
        "to_layout of a length the ring does not divide",
        lambda: parallel.to_layout(jnp.ones((2, 30, 4)), parallel.Layout("striped", 8)),
        ValueError,
        r"x.shape\[1\] \(L\) must be divisible by layout.num_shards=8; got 30",
    ),
    (
        "module partition without a mesh",
        lambda: parallel.mesh_partition_names(8, 2, "heads"),
        ValueError,
        r"heads_axis must name an axis of the mesh set around the module's construction",
    ),
]


@pytest.mark.parametrize("what, call, exception, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_named(what, call, exception, message):
    with pytest.raises(exception, match=message):
        call()


# ---------------------------------------------------------------------------
# On 8 devices, in one subprocess (this file run as a script)


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    done = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


STRATEGIES = [
    "heads: jit with shard_params",
    "heads: mesh_attention, kv heads replicated",
    "ring: cross-attention, causal, q_offset, window, padded",
    "ring: causal, striped, padded",
    "all_to_all: seq x heads, causal, padded, kv heads repeated",
    "all_gather: causal, padded",
    "ring: data x seq x heads, striped, QK-norm, RoPE, softcap",
    "ring: packed segment ids, padded",
    "ring: packed segment ids, striped",
    "ring: chunk, prefix and segment ids",
    "all_to_all: chunk, prefix and segment ids, striped",
    "all_gather: chunk, prefix and segment ids",
    "ring: sinks, data x seq x heads, causal, window, padded",
    "all_to_all: sinks, seq x heads, striped, padded",
    "all_gather: sinks, causal, padded",
    "ring: dynamic-NTK RoPE, striped, causal, padded",
    "ring: ALiBi, data x seq x heads, causal, window, padded",
    "all_to_all: ALiBi and sinks, seq x heads, striped, padded",
    "ring: score_mod of global positions and heads, data x seq x heads, causal, padded",
    "all_to_all: score_mod reading a table, seq x heads, striped, padded",
    "all_gather: score_mod reading a table, causal, padded",
    "ring: mask_mod of global positions and heads, data x seq x heads, causal, padded",
    "all_to_all: mask_mod of global positions and heads, seq x heads, striped",
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_equals_the_single_device_reference(eight_devices, strategy):
    """Outputs and gradients (parameters and inputs), float32, to 1e-5 (rtol and atol)."""
    result = eight_devices["strategies"][strategy]
    assert result["ok"], result


def test_ring_holds_no_full_length_keys_or_values(eight_devices):
    """The compiled ring (forward and backward) moves K/V with collective-permutes only,
    and its per-device temporaries shrink as 1/N from N=2 to 8; the all-gather baseline's
    do not (every device holds all of K/V)."""
    memory = eight_devices["memory"]
    assert "error" not in memory, memory
    ops = memory["ring ops"]
    assert ops["collective-permute"] > 0 and ops["all-gather"] == 0 and ops["all-to-all"] == 0, ops
    ring = {int(n): t for n, t in memory["ring temp"].items()}
    gather = {int(n): t for n, t in memory["all_gather temp"].items()}
    chunk = memory["q chunk bytes at N=8"]
    # N=4 -> 8 halves exactly (1/N); N=2 is below the 1/N line (its one-hop loop is unrolled).
    assert ring[8] <= ring[4] / 1.8 and ring[8] <= ring[2] / 2.5, ring
    assert ring[8] <= 16 * chunk, (ring, chunk)  # a bounded number of L/N-row buffers
    assert gather[8] >= gather[2] / 1.5, gather  # the gathered K/V do not shrink with N
    assert ring[8] < gather[8] / 1.5, (ring, gather)


def test_head_parallel_jit_keeps_each_devices_heads_local(eight_devices):
    """`jax.jit` of the plain layer with `shard_params` weights (heads over 4 devices, batch
    over 2): the partitioner gathers no weight or activation; the only collectives are
    all-reduces (the output projection's partial sums, the data-parallel gradients)."""
    ops = eight_devices["heads hlo"]
    assert "error" not in ops, ops
    assert ops["all-gather"] == 0 and ops["all-to-all"] == 0 and ops["all-reduce"] > 0, ops


def test_readme_example_runs_as_pasted(eight_devices):
    example = eight_devices["readme example"]
    assert "error" not in example, example
    shape, error = example["printed"].split(") ")
    assert shape == "(4, 4096, 256" and float(error) < 1e-5, example


def _reference(params, x_q, x_kv, options=None, **kwargs):
    """The single-device reference: `batched_attention` with implementation="reference"."""
    options = dataclasses.replace(options or mj.Options(), implementation="reference")
    return mj.batched_attention(params, x_q, x_kv, options=options, **kwargs)


def _compare(run, expected, args) -> dict:
    """Outputs and gradients of `run` and `expected` (same arguments, same cotangent)."""

    cotangent = jax.random.normal(jax.random.PRNGKey(7), jax.eval_shape(expected, *args).shape)

    def out_and_grads(f):  # one compilation for both
        def both(*args):
            out, pullback = jax.vjp(f, *args)
            return out, pullback(cotangent)

        return jax.jit(both)

    want, got = out_and_grads(expected)(*args), out_and_grads(run)(*args)
    error = lambda a, b: max(
        float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    try:
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
        ok, detail = True, ""
    except AssertionError as failure:
        ok, detail = False, str(failure)[:2000]
    return dict(ok=ok, out_error=error(got[0], want[0]), grad_error=error(got[1], want[1]), detail=detail)


def _strategies() -> dict:
    rng = jax.random.split(jax.random.PRNGKey(0), 5)
    num_heads, d_model = 8, 40
    params = mj.init_params(rng[0], d_model, num_heads, num_kv_heads=2, head_dim=6)
    params = params._replace(b_k=jax.random.normal(rng[1], params.b_k.shape))  # nonzero biases matter
    x = jax.random.normal(rng[2], (2, 48, d_model))  # [B, Lq, D]
    x_kv = jax.random.normal(rng[3], (2, 56, d_model))  # [B, Lk, D]
    padded = jnp.array([48, 29])
    seq8, seq4_heads2 = _mesh((8, "seq")), _mesh((4, "seq"), (2, "heads"))
    data2_heads4, cube = _mesh((2, "data"), (4, "heads")), _mesh((2, "data"), (2, "seq"), (2, "heads"))
    layer = functools.partial(parallel.mesh_attention, num_heads=num_heads)
    blockwise = functools.partial(mj.batched_attention, num_heads=num_heads, implementation="blockwise")
    striped8, striped2 = parallel.Layout("striped", 8), parallel.Layout("striped", 2)

    def in_layout(f, layout):  # f on data in layout order, wrapped to take and give the natural order
        return lambda p, x: parallel.from_layout(f(p, parallel.to_layout(x, layout)), layout)

    causal = dict(is_causal=True, kv_length=padded)
    cross = dict(is_causal=True, q_offset=8, window=(20, 0), kv_length=jnp.array([56, 37]))
    options = mj.Options(rope=RoPE(theta=100.0), softcap=5.0)
    qk_params = params._replace(q_norm=1 + 0.1 * jnp.arange(6.0), k_norm=1 - 0.05 * jnp.arange(6.0))
    sharded = parallel.shard_params(params, data2_heads4, num_heads=num_heads, heads_axis="heads")
    x_sharded = jax.device_put(x, NamedSharding(data2_heads4, P("data")))
    reference = lambda **kw: lambda p, x: _reference(p, x, None, num_heads=num_heads, **kw)
    cases = {
        "heads: jit with shard_params": (
            lambda p, x: blockwise(p, x, **causal),
            reference(**causal),
            (sharded, x_sharded),
        ),
        "heads: mesh_attention, kv heads replicated": (
            lambda p, x: layer(p, x, mesh=data2_heads4, data_axis="data", heads_axis="heads", **causal),
            reference(**causal),
            (params, x),
        ),
        "ring: cross-attention, causal, q_offset, window, padded": (
            lambda p, x, x_kv: layer(p, x, x_kv, mesh=seq8, seq_axis="seq", **cross),
            lambda p, x, x_kv: _reference(p, x, x_kv, num_heads=num_heads, **cross),
            (params, x, x_kv),
        ),
        "ring: causal, striped, padded": (
            in_layout(lambda p, x: layer(p, x, mesh=seq8, seq_axis="seq", layout=striped8, **causal),
                      striped8),
            reference(**causal),
            (params, x),
        ),
        "all_to_all: seq x heads, causal, padded, kv heads repeated": (
            lambda p, x: layer(
                p, x, mesh=seq4_heads2, seq_axis="seq", heads_axis="heads", context="all_to_all", **causal
            ),
            reference(**causal),
            (params, x),
        ),
        "all_gather: causal, padded": (
            lambda p, x: layer(p, x, mesh=seq8, seq_axis="seq", context="all_gather", **causal),
            reference(**causal),
            (params, x),
        ),
        "ring: data x seq x heads, striped, QK-norm, RoPE, softcap": (
            in_layout(
                lambda p, x: layer(
                    p, x, mesh=cube, data_axis="data", seq_axis="seq", heads_axis="heads",
                    layout=striped2, options=options, **causal,
                ),
                striped2,
            ),
            reference(options=options, **causal),
            (qk_params, x),
        ),
    }  # fmt: skip
    # Packed rows: documents that cross device boundaries (6 rows a device on seq8), one-token
    # ones, a row of one document; the keys' ids travel round the ring with their keys.
    ids = jnp.array([[0] * 7 + [1] + [2] * 20 + [3] * 20, [5] * 48])
    packed = mj.Structure(is_causal=True, segment_ids=ids, kv_length=padded)
    chunked = mj.Structure(is_causal=True, chunk=10, prefix=jnp.array([5, 13]), segment_ids=ids)
    for name, rules, context, layout in (
        ("ring: packed segment ids, padded", packed, "ring", None),
        ("ring: packed segment ids, striped", packed, "ring", striped8),
        ("ring: chunk, prefix and segment ids", chunked, "ring", None),
        (
            "all_to_all: chunk, prefix and segment ids, striped",
            chunked,
            "all_to_all",
            parallel.Layout("striped", 4),
        ),
        ("all_gather: chunk, prefix and segment ids", chunked, "all_gather", None),
    ):
        mesh = seq4_heads2 if context == "all_to_all" else seq8
        heads = dict(heads_axis="heads") if context == "all_to_all" else {}

        def run(p, x, rules=rules, context=context, layout=layout, mesh=mesh, heads=heads):
            if layout is None:
                return layer(p, x, mesh=mesh, seq_axis="seq", context=context, structure=rules, **heads)
            ordered = rules.replace(segment_ids=parallel.to_layout(rules.segment_ids, layout))  # rows' order
            f = lambda p, x: layer(p, x, mesh=mesh, seq_axis="seq", context=context, structure=ordered,
                                   layout=layout, **heads)  # fmt: skip
            return in_layout(f, layout)(p, x)

        expected = lambda p, x, rules=rules: _reference(p, x, None, num_heads=num_heads, structure=rules)
        cases[name] = (run, expected, (params, x))
    # Sinks: split with the heads, joined once after the ring's merge, sliced after all-to-all's
    # exchange; a padded row's sink takes what its hidden keys leave (its gradient included).
    sink_params = params._replace(sinks=jnp.linspace(-1.0, 2.0, num_heads))
    banded = dict(is_causal=True, window=(9, 0), kv_length=padded)
    cases["ring: sinks, data x seq x heads, causal, window, padded"] = (
        lambda p, x: layer(p, x, mesh=cube, data_axis="data", seq_axis="seq", heads_axis="heads", **banded),
        reference(**banded),
        (sink_params, x),
    )
    striped4 = parallel.Layout("striped", 4)
    cases["all_to_all: sinks, seq x heads, striped, padded"] = (
        in_layout(lambda p, x: layer(p, x, mesh=seq4_heads2, seq_axis="seq", heads_axis="heads",
                                     context="all_to_all", layout=striped4, **causal), striped4),
        reference(**causal),
        (sink_params, x),
    )  # fmt: skip
    cases["all_gather: sinks, causal, padded"] = (
        lambda p, x: layer(p, x, mesh=seq8, seq_axis="seq", context="all_gather", **causal),
        reference(**causal),
        (sink_params, x),
    )
    # Dynamic NTK scales for the whole sequence's length (48 > the original 16), not a device's.
    dynamic = mj.Options(rope=RoPE(theta=100.0, scaling=DynamicNTKScaling(2.0, 16)))
    cases["ring: dynamic-NTK RoPE, striped, causal, padded"] = (
        in_layout(lambda p, x: layer(p, x, mesh=seq8, seq_axis="seq", layout=striped8, options=dynamic,
                                     **causal), striped8),
        reference(options=dynamic, **causal),
        (params, x),
    )  # fmt: skip
    # ALiBi at global positions and of the layer's heads: a device holds a slice of both.
    with_alibi = mj.Options(alibi=True)
    cases["ring: ALiBi, data x seq x heads, causal, window, padded"] = (
        lambda p, x: layer(p, x, mesh=cube, data_axis="data", seq_axis="seq", heads_axis="heads",
                           options=with_alibi, **banded),
        reference(options=with_alibi, **banded),
        (params, x),
    )  # fmt: skip
    cases["all_to_all: ALiBi and sinks, seq x heads, striped, padded"] = (
        in_layout(lambda p, x: layer(p, x, mesh=seq4_heads2, seq_axis="seq", heads_axis="heads",
                                     context="all_to_all", layout=striped4, options=with_alibi, **causal),
                  striped4),
        reference(options=with_alibi, **causal),
        (sink_params, x),
    )  # fmt: skip
    # A score function sees global positions and the layer's head numbers (a table it closes
    # over is read, not learned: the mesh paths refuse that, BAD_INPUTS).
    curved = mj.Options(
        score_mod=lambda s, h, q, k: jnp.tanh(s) * (2.0 + 0.25 * h) + 0.02 * (k - q) * (h % 3)
    )
    cases["ring: score_mod of global positions and heads, data x seq x heads, causal, padded"] = (
        lambda p, x: layer(p, x, mesh=cube, data_axis="data", seq_axis="seq", heads_axis="heads",
                           options=curved, **causal),
        reference(options=curved, **causal),
        (params, x),
    )  # fmt: skip
    table = jax.random.normal(rng[4], (num_heads, 16))
    tabled = mj.Options(score_mod=lambda s, h, q, k: s + table[h, jnp.clip(q - k, 0, 15)])
    ulysses = dict(
        mesh=seq4_heads2, seq_axis="seq", heads_axis="heads", context="all_to_all", layout=striped4
    )
    cases["all_to_all: score_mod reading a table, seq x heads, striped, padded"] = (
        in_layout(lambda p, x: layer(p, x, options=tabled, **ulysses, **causal), striped4),
        reference(options=tabled, **causal),
        (params, x),
    )
    cases["all_gather: score_mod reading a table, causal, padded"] = (
        lambda p, x: layer(p, x, mesh=seq8, seq_axis="seq", context="all_gather", options=tabled, **causal),
        reference(options=tabled, **causal),
        (params, x),
    )
    # A mask function reads global positions and the layer's head numbers (and closes over data).
    documents = jnp.asarray(np.repeat(np.arange(6), [5, 11, 2, 14, 9, 7]))  # ids of positions 0 ... 47
    by_document = lambda h, q, k: (documents[q] == documents[k]) | ((h % 3 == 0) & (q - k < 6))
    masked = mj.Structure(is_causal=True, kv_length=padded, mask_mod=by_document)
    cases["ring: mask_mod of global positions and heads, data x seq x heads, causal, padded"] = (
        lambda p, x: layer(p, x, mesh=cube, data_axis="data", seq_axis="seq", heads_axis="heads",
                           structure=masked),
        lambda p, x: _reference(p, x, None, num_heads=num_heads, structure=masked),
        (params, x),
    )  # fmt: skip
    unpadded = masked.replace(kv_length=None)
    cases["all_to_all: mask_mod of global positions and heads, seq x heads, striped"] = (
        in_layout(lambda p, x: layer(p, x, mesh=seq4_heads2, seq_axis="seq", heads_axis="heads",
                                     context="all_to_all", layout=striped4, structure=unpadded), striped4),
        lambda p, x: _reference(p, x, None, num_heads=num_heads, structure=unpadded),
        (params, x),
    )  # fmt: skip
    return {name: _guarded(_compare, run, expected, args) for name, (run, expected, args) in cases.items()}


def _memory() -> dict:
    """Compile (not run) the ring's forward and backward at L=32768 for N = 2, 4, 8."""
    length, num_heads, num_kv_heads, head_dim = 32768, 4, 2, 64
    results = {"ring temp": {}, "all_gather temp": {}}
    for context, sizes in (("ring", (2, 4, 8)), ("all_gather", (2, 8))):
        for n in sizes:
            mesh = _mesh((n, "seq"))
            attend = functools.partial(
                parallel.CONTEXTS[context],
                axis_name="seq",
                structure=Structure(is_causal=True),
                block_sizes=(256, 256),
            )
            sharded = jax.shard_map(attend, mesh=mesh, in_specs=P("seq"), out_specs=P("seq"))
            loss = lambda q, k, v: jnp.sum(sharded(q, k, v) ** 2)  # noqa: B023 (used at once)
            shape = lambda heads: jax.ShapeDtypeStruct(
                (length, heads, head_dim),
                jnp.float32,
                sharding=NamedSharding(mesh, P("seq")),  # noqa: B023
            )
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            compiled = grads.lower(shape(num_heads), shape(num_kv_heads), shape(num_kv_heads)).compile()
            results[f"{context} temp"][n] = compiled.memory_analysis().temp_size_in_bytes
            if context == "ring" and n == 8:
                hlo = compiled.as_text()
                ops = ("collective-permute", "all-gather", "all-to-all")
                results["ring ops"] = {op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in ops}
    results["q chunk bytes at N=8"] = length // 8 * num_heads * head_dim * 4
    return results


def _heads_hlo() -> dict:
    mesh = _mesh((2, "data"), (4, "heads"))
    params = parallel.shard_params(mj.init_params(jax.random.PRNGKey(0), 64, 8), mesh, num_heads=8)
    x = jax.device_put(jnp.ones((4, 1024, 64)), NamedSharding(mesh, P("data")))  # [B, L, D]
    loss = lambda p, x: jnp.sum(mj.batched_attention(p, x, num_heads=8, is_causal=True) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    return {
        op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in ("all-gather", "all-to-all", "all-reduce")
    }


def _readme_example() -> dict:
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(readme_example(), {})
    return {"printed": printed.getvalue().strip()}


def _guarded(f, *args) -> dict:
    """`f(*args)`, or the error it raised (so one failing check does not hide the others)."""
    try:
        return f(*args)
    except Exception:
        return {"ok": False, "error": traceback.format_exc()[-3000:]}


def test_nnx_module_weights_are_sharded_by_heads(eight_devices):
    """Built inside `jax.set_mesh(mesh)` with heads_axis="heads", the NNX layer's weights
    are created split by heads (kv heads replicated: Hkv=2 < 4), carry the same
    partition metadata, hold the same numbers as an unsharded layer, and compute the
    same outputs and gradients, through its own call and through mesh_attention."""
    result = eight_devices["nnx module"]
    assert result.get("ok"), result


def _nnx_module() -> dict:
    from flax import nnx

    import mha_jax.nnx

    mesh = _mesh((2, "data"), (4, "heads"))
    make = lambda **kw: mha_jax.nnx.MultiHeadAttention(
        40, 8, num_kv_heads=2, head_dim=6, rngs=nnx.Rngs(0), **kw
    )
    with jax.set_mesh(mesh):
        sharded = make(heads_axis="heads")
    plain = make()
    names = ("w_q", "b_q", "w_k", "b_k", "w_o", "b_o")
    specs = {name: getattr(sharded, name)[...].sharding.spec for name in names}
    expected = dict(
        w_q=P(None, "heads"),
        b_q=P("heads"),
        w_k=P(None, None),
        b_k=P(None),
        w_o=P("heads", None),
        b_o=P(None),
    )
    metadata = nnx.get_partition_spec(nnx.state(sharded))
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 48, 40))  # [B, L, D]
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    loss = lambda model, x: jnp.sum(jnp.sin(model(x, is_causal=True)))
    value_and_grads = nnx.jit(nnx.value_and_grad(loss))
    pure = lambda value, grads: (value, nnx.to_pure_dict(grads))  # values, not the metadata
    got, want = pure(*value_and_grads(sharded, x_sharded)), pure(*value_and_grads(plain, x))
    functional = jax.jit(
        lambda p, x: parallel.mesh_attention(
            p, x, num_heads=8, mesh=mesh, data_axis="data", heads_axis="heads", is_causal=True
        )
    )(sharded.params, x_sharded)
    chex.assert_trees_all_close(sharded.params, plain.params)  # the same init draws
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)  # weight gradients reach ~40
    chex.assert_trees_all_close(functional, plain(x, is_causal=True), rtol=1e-5, atol=1e-5)
    ok = specs == expected and all(metadata[name].get_value() == expected[name] for name in expected)
    return dict(ok=ok, specs={k: str(v) for k, v in specs.items()})


def on_eight_devices() -> dict:
    assert jax.device_count() == DEVICES, jax.devices()
    return {
        "strategies": _guarded(_strategies),
        "memory": _guarded(_memory),
        "heads hlo": _guarded(_heads_hlo),
        "readme example": _guarded(_readme_example),
        "nnx module": _guarded(_nnx_module),
    }


if __name__ == "__main__":
    print(json.dumps(on_eight_devices()))
