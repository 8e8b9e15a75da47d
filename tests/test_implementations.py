"""Every implementation equals the reference: forward and gradients, on random
shapes, masks and options (hypothesis), plus the memory-scaling promise."""

import functools
import os
import re
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mha_jax as mj
from mha_jax import kernels
from mha_jax.kernels import Request
from mha_jax.masks import Structure


def core(name, q, k, v, *, mask=None, bias=None, structure=None, scale=None, softcap=None, block_sizes=None):
    """The kernel `name` on q, k, v: `kernels.attend`, the one call the library makes."""
    structure = Structure() if structure is None else structure
    if name == "blockwise" and block_sizes is not None:
        return mj.blockwise_attention(
            q, k, v, mask=mask, bias=bias, structure=structure, scale=scale, softcap=softcap,
            block_sizes=block_sizes,
        )  # fmt: skip
    options = mj.Options(scale=scale, softcap=softcap, implementation=name)
    return kernels.attend(
        q, k, v, mask=mask, bias=bias, structure=structure, options=options, rng=None, return_weights=False
    )[0]


@st.composite
def problems(draw, allow_mask=True, allow_bias=True, allow_softcap=True):
    """Random sizes (not multiples of the blocks), GQA, structure, masks with
    mostly non-empty rows and some fully masked ones."""
    length_q, length_k = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**16))
    structure = Structure(
        is_causal=draw(st.booleans()),
        q_offset=draw(st.integers(-3, 10)),
        kv_length=draw(st.none() | st.integers(0, length_k)),
        window=draw(st.none() | st.tuples(st.integers(0, 6), st.integers(0, 6))),
    )
    mask = bias = None
    rngs = jax.random.split(jax.random.PRNGKey(seed), 6)
    if allow_mask and draw(st.booleans()):
        heads = draw(st.sampled_from([1, num_heads]))
        mask = jax.random.bernoulli(rngs[3], 0.7, (heads, length_q, length_k))
        mask = mask.at[:, :, 0].set(True)  # non-empty rows...
        if length_q > 1:
            mask = mask.at[:, length_q // 2].set(False)  # ...and one fully masked row
        mask = mask if heads > 1 or draw(st.booleans()) else mask[0]
    if allow_bias and draw(st.booleans()):
        bias = jax.random.normal(rngs[4], (num_heads, length_q, length_k))
    q = jax.random.normal(rngs[0], (length_q, num_heads, head_dim))
    k = jax.random.normal(rngs[1], (length_k, num_kv_heads, head_dim))
    v = jax.random.normal(rngs[2], (length_k, num_kv_heads, head_dim))
    blocks = (draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16])))
    softcap = draw(st.none() | st.sampled_from([0.5, 3.0])) if allow_softcap else None
    return dict(
        softcap=softcap,
        q=q,
        k=k,
        v=v,
        mask=mask,
        bias=bias,
        structure=structure,
        blocks=blocks,
        cotangent=jax.random.normal(rngs[5], q.shape),
    )


def assert_matches_reference(name, p, rtol=2e-5, atol=2e-5, grads=True):
    def run(impl, q, k, v, bias):
        return core(
            impl,
            q,
            k,
            v,
            mask=p["mask"],
            bias=bias,
            structure=p["structure"],
            softcap=p["softcap"],
            block_sizes=p["blocks"] if impl == "blockwise" else None,
        )

    args = (p["q"], p["k"], p["v"], p["bias"])
    expected = run("reference", *args)
    actual = jax.jit(functools.partial(run, name))(*args)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    if grads:
        argnums = (0, 1, 2) + ((3,) if p["bias"] is not None else ())
        vjp = lambda impl: jax.grad(lambda *a: (run(impl, *a) * p["cotangent"]).sum(), argnums=argnums)(*args)
        for a, b in zip(jax.jit(lambda: vjp(name))(), vjp("reference"), strict=True):
            np.testing.assert_allclose(a, b, rtol=10 * rtol, atol=10 * atol)


# Each example compiles a forward and a backward (~5 s on 2 cores): CI runs a
# handful; MHA_JAX_EXAMPLES=10 runs ten times as many.
SCALE = float(os.environ.get("MHA_JAX_EXAMPLES", "1"))


@settings(max_examples=int(16 * SCALE))
@given(problems())
def test_blockwise_matches_reference(p):
    assert_matches_reference("blockwise", p)


@settings(max_examples=int(6 * SCALE))
@given(problems(allow_softcap=False))
def test_xla_matches_reference(p):
    assert_matches_reference("xla", p)


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_pallas_interpret_matches_reference(is_causal, num_kv_heads, segments):
    """The GPU (Triton) kernel in interpret mode; with segment ids: documents of 5, 20 and 7."""
    rngs = jax.random.split(jax.random.PRNGKey(7), 4)
    ids = jnp.repeat(jnp.arange(3), jnp.array([5, 20, 7]), total_repeat_length=32) if segments else None
    q = jax.random.normal(rngs[0], (32, 2, 16))
    k = jax.random.normal(rngs[1], (32, num_kv_heads, 16))
    v = jax.random.normal(rngs[2], (32, num_kv_heads, 16))
    p = dict(
        q=q,
        k=k,
        v=v,
        mask=None,
        bias=None,
        structure=Structure(is_causal=is_causal, segment_ids=ids),
        blocks=None,
        softcap=None,
        cotangent=jax.random.normal(rngs[3], q.shape),
    )
    assert_matches_reference("pallas", p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["blockwise", "xla"])
def test_fully_masked_rows_are_zero_in_every_implementation(name):
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (6, 2, 4)) for i in range(3))
    mask = jnp.ones((6, 6), bool).at[2].set(False)
    out = core(name, q, k, v, mask=mask)
    np.testing.assert_array_equal(out[2], 0.0)
    out = core(name, q, k, v, structure=Structure(kv_length=0))
    np.testing.assert_array_equal(out, 0.0)
    grads = jax.grad(lambda q, k, v: core(name, q, k, v, mask=mask).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(jnp.all(jnp.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[0][2], 0.0)


@pytest.mark.parametrize("traced_positions", [False, True])
def test_blockwise_under_vmap_matches_reference(traced_positions):
    """Under vmap the blockwise op loops over the batch (sequential_vmap) inside its
    custom VJP; with static and with per-example traced positions it must still
    match the spec, forward and gradients, across several blocks."""
    batch, length_q, length_k = 3, 21, 29
    rngs = jax.random.split(jax.random.PRNGKey(11), 4)
    q = jax.random.normal(rngs[0], (batch, length_q, 4, 8))
    k = jax.random.normal(rngs[1], (batch, length_k, 2, 8))
    v = jax.random.normal(rngs[2], (batch, length_k, 2, 8))
    cotangent = jax.random.normal(rngs[3], q.shape)
    positions = (jnp.array([0, 5, -3]), jnp.array([29, 11, 0])) if traced_positions else ()

    def run(impl, q, k, v):
        def one(q, k, v, offset=3, length=17):  # the defaults are static Python ints
            structure = Structure(is_causal=True, q_offset=offset, kv_length=length)
            return core(
                impl, q, k, v, structure=structure, block_sizes=(8, 8) if impl == "blockwise" else None
            )

        return jax.vmap(one)(q, k, v, *positions)

    loss = lambda impl: lambda *a: (run(impl, *a) * cotangent).sum()
    np.testing.assert_allclose(
        jax.jit(functools.partial(run, "blockwise"))(q, k, v), run("reference", q, k, v), rtol=2e-5, atol=2e-5
    )
    chex.assert_trees_all_close(
        jax.jit(jax.grad(loss("blockwise"), argnums=(0, 1, 2)))(q, k, v),
        jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v),
        rtol=2e-4,
        atol=2e-4,
    )


@pytest.mark.parametrize("name", ["reference", "blockwise", "xla"])
def test_runs_inside_shard_map(name):
    """Data parallelism written with shard_map: the blockwise loop carries must
    vary over the mesh axis like the inputs do, or tracing fails. L=600 gives
    several query and key blocks; a one-device mesh is enough to check types."""
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    params = mj.init_params(jax.random.PRNGKey(0), 24, 6, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 600, 24))
    plain = functools.partial(mj.batched_attention, num_heads=6, is_causal=True, implementation=name)
    spec = jax.sharding.PartitionSpec
    sharded = jax.jit(
        jax.shard_map(plain, mesh=mesh, in_specs=(spec(), spec("data")), out_specs=spec("data"))
    )
    loss = lambda f: lambda params, x: (f(params, x) ** 2).sum()
    np.testing.assert_allclose(sharded(params, x), plain(params, x), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(
        jax.grad(loss(sharded))(params, x), jax.grad(loss(plain))(params, x), rtol=1e-5, atol=1e-5
    )


def test_blockwise_composes_with_nested_vmap_checkpoint_and_export():
    params = mj.init_params(jax.random.PRNGKey(0), 24, 6, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 600, 24))  # [E, B, L, D]

    def layer(name):
        return jax.vmap(
            functools.partial(mj.batched_attention, num_heads=6, is_causal=True, implementation=name),
            in_axes=(None, 0),
        )

    expected = layer("reference")(params, x)
    np.testing.assert_allclose(layer("blockwise")(params, x), expected, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p: (f(p, x) ** 2).sum()
    plain = jax.grad(loss(layer("blockwise")))(params)
    remat = jax.grad(loss(jax.checkpoint(layer("blockwise"))))(params)
    chex.assert_trees_all_close(remat, plain, rtol=1e-5, atol=1e-5)
    exported = jax.export.export(jax.jit(layer("blockwise")))(params, x)
    np.testing.assert_allclose(exported.call(params, x), expected, rtol=1e-5, atol=1e-5)


def test_batch_sharded_by_jit_is_not_gathered():
    """On one device the blockwise op loops over the batch (cache-sized tiles);
    with several devices it must not, or a batch sharded by jit is gathered onto
    every device and data parallelism is lost. Two host devices in a subprocess."""
    code = textwrap.dedent("""
        import re, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import mha_jax as mj
        mesh = Mesh(jax.devices(), ("data",))
        params = mj.init_params(jax.random.PRNGKey(0), 24, 6)
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 600, 24))
        x = jax.device_put(x, NamedSharding(mesh, P("data")))
        loss = lambda p, x: (mj.batched_attention(p, x, num_heads=6,
                                                  implementation="blockwise") ** 2).sum()
        hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
        print(len(jax.devices()), "devices,", len(re.findall(r" all-gather\\(", hlo)), "all-gathers")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 devices, 0 all-gathers" in done.stdout, done.stdout


@pytest.mark.parametrize("name", ["blockwise", "xla"])
def test_end_to_end_options_match_reference(name):
    params = mj.init_params(jax.random.PRNGKey(0), 24, 6, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 37, 24))
    options = dict(
        num_heads=6, is_causal=True, kv_length=jnp.array([37, 20, 5]), q_offset=jnp.array([0, 3, -2])
    )
    np.testing.assert_allclose(
        mj.batched_attention(params, x, implementation=name, **options),
        mj.batched_attention(params, x, implementation="reference", **options),
        rtol=2e-5,
        atol=2e-5,
    )


@pytest.mark.parametrize("name", ["blockwise", "xla"])
def test_bf16_error_is_at_most_twice_the_reference_bf16_error(name):
    rngs = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(rngs[0], (200, 4, 32)) * 2
    k = jax.random.normal(rngs[1], (300, 2, 32)) * 2
    v = jax.random.normal(rngs[2], (300, 2, 32))
    structure = Structure(is_causal=True, q_offset=100)
    exact = core("reference", q, k, v, structure=structure)
    low = lambda impl: core(impl, *(x.astype(jnp.bfloat16) for x in (q, k, v)), structure=structure).astype(
        jnp.float32
    )
    reference_error = float(jnp.abs(low("reference") - exact).max())
    error = float(jnp.abs(low(name) - exact).max())
    assert error <= 2 * reference_error + 1e-6, (error, reference_error)


def temp_bytes(name, length):
    q = jax.ShapeDtypeStruct((length, 4, 64), jnp.float32)

    def loss(q, k, v):
        return core(name, q, k, v, structure=Structure(is_causal=True)).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_while_reference_grows_quadratically():
    # forward+backward, L -> 4L
    reference_growth = temp_bytes("reference", 2048) / temp_bytes("reference", 512)
    blockwise_growth = temp_bytes("blockwise", 2048) / temp_bytes("blockwise", 512)
    assert reference_growth > 10, reference_growth  # ~16x minus the O(L) parts
    assert blockwise_growth < 5, blockwise_growth


def request(length=16, backend="cpu", dtype=jnp.float32, head_dim=8, **facts):
    """A Request for an [L, L] call; `facts` override the rest."""
    facts = (
        dict(structure=Structure(), has_mask=False, has_bias=False, dropout_rate=0.0, return_weights=False)
        | facts
    )
    return Request(backend, jnp.dtype(dtype), length, length, head_dim, **facts)


def test_auto_picks_reference_when_short_and_blockwise_when_long_on_cpu():
    pick = lambda *a, **kw: kernels.choose("auto", request(*a, **kw)).name
    assert pick(16) == "reference"
    assert pick(4096) == "blockwise"
    assert pick(4096, return_weights=True) == "reference"  # the only one that can
    assert pick(4096, dropout_rate=0.1) == "reference"


def test_auto_picks_the_accelerator_kernels_only_when_they_can_honour_the_call():
    """Checked on CPU by passing the backend: cuDNN on GPU with bf16, then Pallas's Triton
    kernel for what cuDNN refuses; Pallas on TPU. (tests/test_lowering.py lowers them.)"""
    pick = lambda *a, **kw: kernels.choose("auto", request(*a, **kw)).name
    assert pick(1024, "gpu", jnp.bfloat16, 64) == "cudnn"
    assert pick(1024, "gpu", jnp.float32, 64) == "pallas"  # cuDNN needs bf16/f16; Triton takes f32
    assert pick(1024, "gpu", jnp.bfloat16, 12) == "pallas"  # cuDNN: a multiple of 8; Triton pads it
    assert pick(1000, "gpu", jnp.float32, 64) == "blockwise"  # Triton: 128-blocks must fit
    assert pick(1024, "gpu", jnp.bfloat16, 64, has_mask=True) == "blockwise"
    assert pick(1024, "tpu", jnp.float32, 64, structure=Structure(is_causal=True)) == "pallas"
    assert pick(1000, "tpu", jnp.float32, 64) == "blockwise"  # TPU blocks of 128 must fit
    assert pick(16, "tpu", jnp.float32, 64) == "reference"


CUDNN_CASES = {
    # (request facts, what it must refuse, or None when it can run)
    "plain_bf16": (dict(dtype=jnp.bfloat16), None),
    "float32": (dict(), r"compute in float32 \(it needs bfloat16 or float16\)"),
    "head_dim_160_before_hopper": (dict(dtype=jnp.bfloat16, head_dim=160), r"head_dim=160"),
    "head_dim_160_on_hopper": (dict(dtype=jnp.bfloat16, head_dim=160, gpu_capability=(9, 0)), None),
    "head_dim_12": (dict(dtype=jnp.bfloat16, head_dim=12), r"head_dim=12 \(a multiple of 8"),
    "mask": (dict(dtype=jnp.bfloat16, has_mask=True), r"dense boolean mask"),
    "odd_length_bias": (dict(dtype=jnp.bfloat16, length=1023, has_bias=True), r"odd Lq or Lk"),
    # jax.nn's cuDNN path raises for a right window unless the mask is plain causal
    "window_right_not_causal": (
        dict(dtype=jnp.bfloat16, structure=Structure(window=(8, 2))),
        r"window with a right side without is_causal",
    ),
    "window_left_only": (dict(dtype=jnp.bfloat16, structure=Structure(window=(8, 0))), None),
    "window_right_causal_padded": (
        dict(
            dtype=jnp.bfloat16, structure=Structure(is_causal=True, window=(8, 2), kv_length=jnp.array(900))
        ),
        None,
    ),  # we pass (8, 0)
    "q_offset": (
        dict(dtype=jnp.bfloat16, structure=Structure(is_causal=True, q_offset=3)),
        r"shift the causal mask by q_offset",
    ),
    "traced_q_offset": (
        dict(dtype=jnp.bfloat16, structure=Structure(is_causal=True, q_offset=jnp.array(0))),
        r"shift the causal mask by q_offset",
    ),
    "dropout": (dict(dtype=jnp.bfloat16, dropout_rate=0.1), r"apply dropout"),
}


@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_limitations_match_jax_nn(case):
    facts, refusal = CUDNN_CASES[case]
    reasons = kernels.KERNELS["cudnn"].cannot(
        request(**({"length": 1024, "backend": "gpu", "head_dim": 64} | facts))
    )
    if refusal is None:
        assert reasons == []
    else:
        assert any(re.search(refusal, r) for r in reasons), reasons


PALLAS_CASES = {
    "gpu_causal": (dict(backend="gpu", structure=Structure(is_causal=True)), None),
    "gpu_short": (dict(backend="gpu", length=100), None),  # one block of min(128, L)
    "gpu_not_multiple": (dict(backend="gpu", length=200), r"length_q=200 \(at most 128 or a multiple"),
    "tpu_short": (dict(backend="tpu", length=100), r"length_q=100 \(a multiple of 128"),
    "tpu_multiple": (dict(backend="tpu", length=256), None),
    "window": (dict(backend="gpu", structure=Structure(window=(4, 4))), r"take kv_length or window"),
    "bias": (dict(backend="tpu", has_bias=True), r"take a mask or bias array"),
    "float64": (dict(backend="gpu", dtype=jnp.float64), r"compute in float64"),
    "gpu_segment_ids": (dict(backend="gpu", structure=Structure(segment_ids=jnp.zeros(256, int))), None),
    "gpu_segment_id_pair": (
        dict(backend="gpu", structure=Structure(segment_ids=(jnp.zeros(256, int), jnp.zeros(256, int)))),
        r"take segment_ids",
    ),
    "tpu_segment_ids": (
        dict(backend="tpu", structure=Structure(segment_ids=jnp.zeros(256, int))),
        r"take segment_ids",
    ),
}


@pytest.mark.parametrize("case", list(PALLAS_CASES))
def test_pallas_limitations_match_its_kernels(case):
    facts, refusal = PALLAS_CASES[case]
    reasons = kernels.KERNELS["pallas"].cannot(request(**({"length": 256} | facts)))
    if refusal is None:
        assert reasons == []
    else:
        assert any(re.search(refusal, r) for r in reasons), reasons
