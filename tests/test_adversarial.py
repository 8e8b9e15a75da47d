"""Regressions for the adversarial findings (one test per finding, named for it),
then property tests that hunt for their kind: every implementation against a
float64 NumPy spec on hostile draws (-inf and huge biases, kv_length beyond Lk,
zero lengths, NaN in hidden positions, every dtype, extreme scales).

`MHA_JAX_EXAMPLES=N` multiplies the hypothesis example counts (CI runs 1).
"""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import mha_jax as mj
from mha_jax.masks import Structure
from tests.reference import attention_np, core_np, normal
from tests.test_implementations import core

IMPLEMENTATIONS = ["reference", "blockwise", "xla"]

# Everything below runs under jit: one compilation per case instead of one per
# primitive in eager mode (which made these tests ~5x slower).
jcore = jax.jit(core, static_argnames=("name", "structure", "scale", "block_sizes"))


def jattention(params, x_q, x_kv=None, *, mask=None, bias=None, **static):
    """`mj.attention` jitted with its static options; returns (out, grads of sum(out^2))."""
    x_kv = x_q if x_kv is None else x_kv
    return _jitted_attention(tuple(sorted(static.items())))(params, x_q, x_kv, mask, bias)


@functools.cache
def _jitted_attention(static):
    def run(params, x_q, x_kv, mask, bias):
        return mj.attention(params, x_q, x_kv, mask=mask, bias=bias, **dict(static))

    loss = lambda *a: (run(*a) ** 2).sum()
    return jax.jit(lambda *a: (run(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))


def finite(tree) -> bool:
    return all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(tree))


def layer(seed=0, d_model=16, num_heads=4, num_kv_heads=2):
    params = mj.init_params(jax.random.PRNGKey(seed), d_model, num_heads, num_kv_heads=num_kv_heads)
    # non-zero biases so that a dropped bias cannot pass
    return params._replace(
        **{
            n: normal(seed + i + 1, getattr(params, n).shape)
            for i, n in enumerate(("b_q", "b_k", "b_v", "b_o"))
        }
    )


def qkv(seed, length_q, length_k, num_heads=4, num_kv_heads=2, head_dim=8, dtype=jnp.float32):
    rngs = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(rngs[0], (length_q, num_heads, head_dim), dtype),
        jax.random.normal(rngs[1], (length_k, num_kv_heads, head_dim), dtype),
        jax.random.normal(rngs[2], (length_k, num_kv_heads, head_dim), dtype),
    )


# ---------------------------------------------------------------------------
# 1. -inf bias over a whole leading key block


def test_minus_inf_bias_over_leading_key_blocks_stays_finite():
    """Left padding written as an additive bias: keys 0..299 of 600 at -inf.
    At 600x600 "auto" takes the blockwise path, whose first key blocks are
    then all -inf (it used to compute exp(-inf - -inf) = NaN for every row)."""
    params = layer()
    x = normal(10, (600, 16))
    bias = jnp.zeros((600, 600)).at[:, :300].set(-jnp.inf)
    expected, _ = attention_np(params, x, num_heads=4, bias=bias)
    for name in IMPLEMENTATIONS + ["auto"]:
        out, grads = jattention(params, x, bias=bias, num_heads=4, implementation=name)
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4, err_msg=name)
        assert finite(grads), name


def test_minus_inf_bias_blocks_in_the_blockwise_kernel_with_small_blocks():
    q, k, v = qkv(0, 20, 40)
    bias = jnp.zeros((20, 40)).at[:, :17].set(-jnp.inf).at[:, 30:].set(-jnp.inf)
    run = lambda name: (
        lambda q, k, v: core(name, q, k, v, bias=bias, block_sizes=(8, 8) if name == "blockwise" else None)
    )
    grad = lambda f: jax.jit(jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2)))
    np.testing.assert_allclose(
        jax.jit(run("blockwise"))(q, k, v), core_np(q, k, v, bias=bias)[0], rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(
        grad(run("blockwise"))(q, k, v), grad(run("reference"))(q, k, v), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------
# 2. kv_length > Lk


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_kv_length_beyond_lk_means_no_padding(name):
    """Decided: kv_length is clamped to [0, Lk] (what the reference always did).
    The blockwise path used to attend to the zero keys padding its last block."""
    q, k, v = qkv(1, 5, 7)

    def run(kv_length):
        def f(q, k, v, kv_length=kv_length):
            return core(
                name,
                q,
                k,
                v,
                structure=Structure(kv_length=kv_length),
                block_sizes=(8, 8) if name == "blockwise" else None,
            )

        return jax.jit(lambda *a: (f(*a), jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(*a)))

    beyond, clean = run(jnp.int32(8))(q, k, v), run(None)(q, k, v)
    np.testing.assert_allclose(beyond[0], core_np(q, k, v)[0], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(beyond, clean, rtol=1e-5, atol=1e-5)  # outputs and gradients
    np.testing.assert_array_equal(run(jnp.int32(-3))(q, k, v)[0], 0.0)  # below 0: nothing visible


def test_kv_length_beyond_lk_in_a_batch_on_the_default_path():
    params = layer()
    x = normal(2, (2, 520, 16))  # 520^2 pairs: "auto" goes blockwise
    out = mj.batched_attention(params, x, num_heads=4, kv_length=jnp.array([600, 300]))
    expected = mj.batched_attention(params, x, num_heads=4, kv_length=jnp.array([520, 300]))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        out[1], attention_np(params, x[1, :, :], num_heads=4, kv_length=300)[0], rtol=2e-4, atol=2e-4
    )


# ---------------------------------------------------------------------------
# 3. jax_enable_x64: blockwise ran int32 and int64 indices together; float64 accuracy


X64_CASES = {
    "causal": dict(structure=dict(is_causal=True, q_offset=2)),
    "mask": dict(mask=True),
    "bias": dict(bias=True),
    "everything": dict(
        mask=True, bias=True, structure=dict(is_causal=True, window=(4, 1), kv_length=11, q_offset=2)
    ),
}


@pytest.mark.parametrize("case", list(X64_CASES))
def test_blockwise_runs_under_x64_with_float32_inputs(case):
    """Each option that reaches the block loops used to crash under x64
    (int32 block indices met int64 positions in fori_loop and dynamic_slice)."""
    with jax.enable_x64(True):
        q, k, v = qkv(3, 9, 13)
        options = X64_CASES[case]
        mask = jnp.ones((9, 13), bool).at[:, 3].set(False) if options.get("mask") else None
        bias = normal(4, (9, 13)) if options.get("bias") else None
        structure = Structure(**options.get("structure", {}))

        def run(q, k, v, bias):
            return mj.blockwise_attention(
                q, k, v, mask=mask, bias=bias, structure=structure, block_sizes=(8, 8)
            )

        expected, _ = core_np(q, k, v, mask=mask, bias=bias, **options.get("structure", {}))
        out = run(q, k, v, bias)  # eagerly, as a user calls it (this is what crashed)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        grads = jax.jit(jax.grad(lambda *a: run(*a).sum(), argnums=(0, 1, 2)))(q, k, v, bias)
        assert finite(grads)


def test_default_auto_call_runs_under_x64():
    with jax.enable_x64(True):
        params = layer()
        x = normal(5, (512, 16))
        out = mj.attention(params, x, num_heads=4, is_causal=True)  # auto: blockwise at 512^2
        assert out.dtype == jnp.float32
        expected, _ = attention_np(params, x, num_heads=4, is_causal=True)
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


def test_float64_stays_float64():
    """reference and blockwise accumulate float64 inputs in float64: within
    1e-12 of NumPy's float64 (the README's promise, exactly)."""
    with jax.enable_x64(True):
        q, k, v = (a.astype(jnp.float64) for a in qkv(6, 11, 19))
        bias = normal(7, (4, 11, 19), jnp.float64)
        structure = Structure(is_causal=True, q_offset=4)
        expected, _ = core_np(q, k, v, bias=bias, is_causal=True, q_offset=4)
        for name, blocks in (("reference", None), ("blockwise", (8, 8))):
            out = jcore(name, q, k, v, bias=bias, structure=structure, block_sizes=blocks)
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12, err_msg=name)


def test_implementations_that_compute_in_float32_refuse_float64():
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), layer())
        x = normal(8, (5, 16), jnp.float64)
        for name in ("xla", "pallas"):
            with pytest.raises(
                ValueError,
                match=rf'implementation="{name}" cannot.*compute in '
                r"float64 \(its softmax runs in float32\)",
            ):
                mj.attention(params, x, num_heads=4, implementation=name)


# ---------------------------------------------------------------------------
# 4. NaN in positions hidden only by is_causal or window


STRUCTURES = {
    # keys 6.. are beyond every query's causal reach; no query row is empty
    "causal": dict(is_causal=True),
    # rows 0..2 see nothing (q_offset=-3), keys 3.. are beyond reach
    "causal_negative_offset": dict(is_causal=True, q_offset=-3),
    # keys 0..1 and 9.. are outside every window
    "window": dict(window=(1, 2), q_offset=3),
}


@pytest.mark.parametrize("case", list(STRUCTURES))
def test_nan_in_positions_hidden_by_structure_does_not_leak(case):
    params = layer()
    options = STRUCTURES[case]
    x_q, x_kv = normal(11, (6, 16)), normal(12, (12, 16))
    structure = Structure(**options)
    rows, keys = structure.query_sees_any(6, 12), structure.key_seen_by_any(6, 12)
    assert not (rows.all() and keys.all()), "the case must hide something"
    poisoned_q = jnp.where(rows[:, None], x_q, jnp.nan)
    poisoned_kv = jnp.where(keys[:, None], x_kv, jnp.nan)
    for name in IMPLEMENTATIONS:
        clean, _ = jattention(params, x_q, x_kv, num_heads=4, implementation=name, **options)
        out, grads = jattention(params, poisoned_q, poisoned_kv, num_heads=4, implementation=name, **options)
        np.testing.assert_allclose(out, clean, rtol=1e-6, atol=1e-6, err_msg=name)
        assert finite(grads), name


def test_nan_in_keys_hidden_by_minus_inf_bias_does_not_leak():
    params = layer()
    x_q, x_kv = normal(13, (5, 16)), normal(14, (7, 16))
    bias = jnp.zeros((5, 7)).at[:, 4:].set(-jnp.inf)
    expected, _ = attention_np(params, x_q, x_kv[:4], num_heads=4)
    for name in IMPLEMENTATIONS:
        out, grads = jattention(
            params, x_q, x_kv.at[4:].set(jnp.nan), bias=bias, num_heads=4, implementation=name
        )
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=name)
        assert finite(grads), name


# ---------------------------------------------------------------------------
# 5 and 8. Scales: 0, negative, and powers of two that overflow f16 when folded


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_any_scale(dtype):
    """scale=0 or < 0 used to crash in math.log2; 2^16 and above folded into f16
    queries overflowed to inf (all-NaN output). Scores are float32 whatever
    the scale: compare with float64 on the same (rounded) inputs."""
    q, k, v = (a * 0.5 for a in qkv(15, 6, 9, dtype=dtype))
    for scale in (0.0, -0.5, 2.0**16, 2.0**20):
        expected, _ = core_np(q, k, v, scale=scale)
        for name in IMPLEMENTATIONS:
            if name == "xla" and dtype == jnp.float16:
                continue  # refused on CPU: test_xla_refuses_float16_on_cpu
            out = jcore(name, q, k, v, scale=scale).astype(jnp.float32)
            np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2, err_msg=f"{name} scale={scale}")


def test_xla_refuses_float16_on_cpu():
    """Found by running jax.nn's path under jit: its F16_F16_F32 dot is not
    supported by XLA's CPU backend (eager mode hides it behind a fallback)."""
    params = jax.tree.map(lambda p: p.astype(jnp.float16), layer())
    with pytest.raises(
        ValueError,
        match=r'implementation="xla" cannot compute in float16 on '
        r"backend 'cpu'",
    ):
        mj.batched_attention(params, jnp.ones((2, 5, 16), jnp.float16), num_heads=4, implementation="xla")


def test_zero_scale_gives_uniform_weights():
    params = layer()
    x = normal(16, (5, 16))
    _, weights = mj.attention(params, x, num_heads=4, scale=0.0, return_weights=True)
    np.testing.assert_allclose(weights, 1 / 5, rtol=1e-6)


# ---------------------------------------------------------------------------
# 6. Zero-length sequences


@pytest.mark.parametrize("lengths", [(5, 0), (0, 7), (0, 0)], ids=["Lk=0", "Lq=0", "both"])
def test_zero_length_sequences_give_zero_heads(lengths):
    """Decided: Lk = 0 means every row is fully masked, so heads are zeros and
    the output is the output bias; Lq = 0 gives an empty output."""
    length_q, length_k = lengths
    params = layer()
    x_q, x_kv = normal(17, (length_q, 16)), normal(18, (length_k, 16))
    cases = [dict(), dict(is_causal=True, kv_length=3), dict(mask=True)]
    for name in IMPLEMENTATIONS + ["auto"]:
        for options in cases:
            options = dict(options)
            mask = jnp.ones((length_q, length_k), bool) if options.pop("mask", False) else None
            out, grads = jattention(params, x_q, x_kv, mask=mask, num_heads=4, implementation=name, **options)
            chex.assert_shape(out, (length_q, 16))
            np.testing.assert_allclose(out, jnp.broadcast_to(params.b_o, out.shape), rtol=1e-6)
            assert finite(grads), (name, options)


def test_zero_length_in_the_kernels_and_the_batch():
    q, k, v = qkv(19, 4, 0)
    np.testing.assert_array_equal(mj.blockwise_attention(q, k, v), 0.0)
    q, k, v = qkv(19, 0, 6)
    chex.assert_shape(mj.blockwise_attention(q, k, v), (0, 4, 8))
    out = mj.batched_attention(layer(), jnp.ones((3, 0, 16)), num_heads=4)
    chex.assert_shape(out, (3, 0, 16))


# ---------------------------------------------------------------------------
# 7. A row whose visible keys all have -inf bias: zeros, one rule everywhere


@pytest.mark.parametrize("with_mask", [False, True], ids=["bias_only", "bias_and_mask"])
def test_row_with_only_minus_inf_bias_gives_zeros(with_mask):
    q, k, v = qkv(20, 5, 7)
    bias = normal(21, (5, 7)).at[2].set(-jnp.inf)  # row 2: nothing to attend to
    mask = None
    if with_mask:  # row 3 sees keys 0..2 only, and those have -inf bias
        mask = jnp.ones((5, 7), bool).at[3, 3:].set(False)
        bias = bias.at[3, :3].set(-jnp.inf)
    expected, _ = core_np(q, k, v, bias=bias, mask=mask)
    for name in IMPLEMENTATIONS:
        run = lambda q, k, v, name=name: core(name, q, k, v, bias=bias, mask=mask)
        f = jax.jit(
            lambda *a, run=run: (run(*a), jax.grad(lambda *a: (run(*a) ** 2).sum(), argnums=(0, 1, 2))(*a))
        )
        out, grads = f(q, k, v)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(out[2], 0.0)
        if with_mask:  # the masked-out keys of row 3 must not matter, whatever they hold
            np.testing.assert_array_equal(out[3], 0.0)
            np.testing.assert_array_equal(f(q, k, v.at[3:].multiply(100.0))[0][3], 0.0)
        assert finite(grads), name
        np.testing.assert_array_equal(grads[0][2], 0.0)


# ---------------------------------------------------------------------------
# The hunt: hostile draws, every implementation against the float64 spec

SCALE = float(os.environ.get("MHA_JAX_EXAMPLES", "1"))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
# Worst-case relative rounding of one input or output element in each dtype.
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-8, "float16": 2.0**-11, "float64": 2.0**-52}


@st.composite
def hostile(draw):
    """Sizes from 0; -inf over whole runs of keys (block-sized and not); huge
    finite biases; kv_length from below 0 to beyond Lk; every dtype; scales
    0, negative, tiny, huge."""
    length_q, length_k = draw(st.integers(0, 24)), draw(st.integers(0, 24))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    dtype = draw(st.sampled_from(list(DTYPES)))
    scale = draw(st.sampled_from([None, 0.0, -0.7, 1e-6, 0.5, 3.0, 2.0**10, 2.0**16]))
    structure = dict(
        is_causal=draw(st.booleans()),
        q_offset=draw(st.integers(-4, 8)),
        kv_length=draw(st.none() | st.integers(-2, length_k + 4)),
        window=draw(st.none() | st.tuples(st.integers(0, 5), st.integers(0, 5))),
    )
    seed = draw(st.integers(0, 2**16))
    bias = None
    kind = draw(st.sampled_from(["none", "normal", "runs_of_minus_inf", "huge"]))
    rng = np.random.default_rng(seed)
    if kind != "none":
        bias = rng.normal(size=(num_heads, length_q, length_k))
        if kind == "runs_of_minus_inf":  # a run of keys, maybe whole blocks, maybe whole rows
            start = draw(st.integers(0, max(length_k, 1)))
            stop = draw(st.integers(start, max(length_k, start)))
            bias[:, :, start:stop] = -np.inf
            bias[rng.random(bias.shape) < 0.1] = -np.inf
        elif kind == "huge":
            bias = bias * 1e4
    mask = None
    if draw(st.booleans()):
        mask = rng.random((num_heads, length_q, length_k)) < 0.7
    blocks = (draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16])))
    return dict(
        sizes=(length_q, length_k, num_heads, num_kv_heads, head_dim),
        dtype=dtype,
        scale=scale,
        structure=structure,
        bias=bias,
        mask=mask,
        seed=seed,
        blocks=blocks,
    )


def tolerance(p, q, k, v, expected_dtype_name):
    """How far a correct implementation may be from the float64 spec: the
    output's own rounding, plus float32 score error amplified by |scale|."""
    eps = EPS[expected_dtype_name]
    acc_eps = 2.0**-52 if expected_dtype_name == "float64" else 2.0**-23
    scale = abs(p["scale"] if p["scale"] is not None else q.shape[-1] ** -0.5)
    qk = (
        float(
            np.abs(np.asarray(q, np.float64)).max(initial=0)
            * np.abs(np.asarray(k, np.float64)).max(initial=0)
        )
        * q.shape[-1]
    )
    bias_max = 0.0 if p["bias"] is None else float(np.abs(p["bias"][np.isfinite(p["bias"])]).max(initial=0))
    logit_error = 8 * acc_eps * (scale * qk + bias_max) + 4 * eps  # inputs to exp
    v_max = float(np.abs(np.asarray(v, np.float64)).max(initial=0))
    return v_max * (4 * eps + 2 * logit_error) + 1e-30


def run_hostile(p, name):
    length_q, length_k, num_heads, num_kv_heads, head_dim = p["sizes"]
    dtype = DTYPES[p["dtype"]]
    q, k, v = qkv(p["seed"], length_q, length_k, num_heads, num_kv_heads, head_dim, dtype)
    mask = None if p["mask"] is None else jnp.asarray(p["mask"])
    bias = None if p["bias"] is None else jnp.asarray(p["bias"], jnp.float32)
    structure = Structure(**p["structure"])
    out = jcore(
        name,
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        structure=structure,
        scale=p["scale"],
        block_sizes=p["blocks"] if name == "blockwise" else None,
    )
    expected, _ = core_np(
        q,
        k,
        v,
        mask=p["mask"],
        bias=None if bias is None else np.asarray(bias),
        scale=p["scale"],
        **p["structure"],
    )
    return (
        q,
        k,
        v,
        np.asarray(
            out.astype(jnp.float64) if p["dtype"] == "float64" else out.astype(jnp.float32), np.float64
        ),
        expected,
    )


@settings(max_examples=int(10 * SCALE))
@given(hostile())
def test_hostile_draws_match_the_float64_spec(p):
    """Every implementation that accepts the call equals the spec within the
    dtype's tolerance and returns no NaN; one that cannot must say so."""
    note(repr(p))
    for name in IMPLEMENTATIONS:
        with jax.enable_x64(p["dtype"] == "float64"):
            if name == "xla" and p["dtype"] in ("float64", "float16"):
                continue  # refused at the public boundary (tests above)
            q, k, v, out, expected = run_hostile(p, name)
        assert np.isfinite(out).all(), f"{name}: NaN/Inf in the output"
        error = float(np.abs(out - expected).max(initial=0))
        assert error <= tolerance(p, q, k, v, p["dtype"]), (name, error)


@st.composite
def hidden_poison(draw):
    length_q, length_k = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    options = dict(
        is_causal=draw(st.booleans()),
        q_offset=draw(st.integers(-4, 6)),
        kv_length=draw(st.none() | st.integers(0, length_k + 2)),
        window=draw(st.none() | st.tuples(st.integers(0, 3), st.integers(0, 3))),
    )
    use_mask = draw(st.booleans())
    use_bias = draw(st.booleans())
    return length_q, length_k, options, use_mask, use_bias, draw(st.integers(0, 2**16))


@settings(max_examples=int(4 * SCALE))
@given(hidden_poison())
def test_nan_in_every_kind_of_hidden_position_never_leaks(draw):
    """NaN in every query row that sees nothing and every key that no query
    sees (hidden by mask, structure, kv_length or -inf bias): outputs equal the
    clean run, gradients stay finite, in every implementation."""
    length_q, length_k, options, use_mask, use_bias, seed = draw
    rng = np.random.default_rng(seed)
    params = layer(seed % 7)
    x_q, x_kv = normal(seed, (length_q, 16)), normal(seed + 1, (length_k, 16))
    mask = jnp.asarray(rng.random((length_q, length_k)) < 0.6) if use_mask else None
    bias = None
    if use_bias:
        bias = jnp.asarray(
            np.where(
                rng.random((4, length_q, length_k)) < 0.3, -np.inf, rng.normal(size=(4, length_q, length_k))
            ),
            jnp.float32,
        )
    visible = mj.masks.combine(
        Structure(**options).allows(jnp.arange(length_q), jnp.arange(length_k)),
        mask,
        None if bias is None else (bias > -jnp.inf).any(0),
    )
    poisoned_q = jnp.where(visible.any(1)[:, None], x_q, jnp.nan)
    poisoned_kv = jnp.where(visible.any(0)[:, None], x_kv, jnp.nan)
    for name in IMPLEMENTATIONS:
        run = functools.partial(jattention, mask=mask, bias=bias, num_heads=4, implementation=name, **options)
        out, grads = run(params, poisoned_q, poisoned_kv)
        np.testing.assert_allclose(out, run(params, x_q, x_kv)[0], rtol=1e-5, atol=1e-5)
        assert finite(grads), name
