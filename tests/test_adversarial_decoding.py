"""The second adversarial run's library findings (decoding, public helpers), one regression
test per finding, then the hunts for their kind: hypothesis draws over every decoding input
(dtypes, lengths, cache lengths, capacities, steps of 0..20 tokens, every implementation,
eager and jitted) against a float64 NumPy spec of one cached step, with NaN and Inf in every
kind of hidden cache slot; float64 through every public function under x64.

`MHA_JAX_EXAMPLES=N` multiplies the hypothesis example counts (CI runs 1).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, note, settings
from hypothesis import strategies as st

import mha_jax as mj
import mha_jax.linen as mlinen
import mha_jax.nnx as mnnx
from mha_jax.decoding import KVCache, cached_attention, init_cache
from tests.reference import attention_np, core_np, normal

B, D, H, HKV, DH = 2, 16, 4, 2, 4
SCALE = float(os.environ.get("MHA_JAX_EXAMPLES", "1"))


def layer(seed=0, dtype=jnp.float32):
    params = mj.init_params(jax.random.PRNGKey(seed), D, H, num_kv_heads=HKV)
    params = params._replace(  # non-zero biases: a dropped bias cannot pass
        **{
            n: normal(seed + i + 1, getattr(params, n).shape)
            for i, n in enumerate(("b_q", "b_k", "b_v", "b_o"))
        }
    )
    return jax.tree.map(lambda p: p.astype(dtype), params)


def step_spec(params, x, cache, lengths, *, window=None, softcap=None):
    """One cached step in float64 NumPy, from the definition: example b writes the first
    `lengths[b]` new keys and values at slots `length[b], ...` (rounded to the cache's dtype),
    then new row t attends to the slots j it may see: filled (j < length + count), causal
    (j <= length + t), within the window; rows past `lengths[b]` get zero heads. Only the
    visible slots are read, so whatever the others hold cannot matter.
    Returns (out [B, T, D_out], k [B, S, Hkv, Dh], v, length [B])."""
    f64 = wide
    w = {n: f64(getattr(params, n)) for n in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")}
    x = f64(x)
    batch, new, _ = x.shape
    k_cache, v_cache, filled = f64(cache.k), f64(cache.v), np.asarray(cache.length)
    capacity = k_cache.shape[1]
    out = np.zeros((batch, new, w["w_o"].shape[1]))
    round_to = lambda a: f64(jnp.asarray(a).astype(cache.k.dtype))
    for b in range(batch):
        start, count = int(filled[b]), int(lengths[b])
        q = (x[b] @ w["w_q"] + w["b_q"]).reshape(new, H, DH)
        k = round_to(x[b] @ w["w_k"] + w["b_k"]).reshape(new, HKV, DH)
        v = round_to(x[b] @ w["w_v"] + w["b_v"]).reshape(new, HKV, DH)
        k_cache[b, start : start + count], v_cache[b, start : start + count] = k[:count], v[:count]
        heads = np.zeros((new, H, DH))
        for t in range(count):
            position = start + t
            seen = [
                j
                for j in range(start + count)
                if j <= position and (window is None or position - window[0] <= j <= position + window[1])
            ]
            sub_heads, _ = core_np(q[t : t + 1], k_cache[b, seen], v_cache[b, seen], softcap=softcap)
            heads[t] = sub_heads[0]
        out[b] = heads.reshape(new, H * DH) @ w["w_o"] + w["b_o"]
    return out, k_cache, v_cache, np.minimum(filled + np.asarray(lengths), capacity)


def filled_cache(seed, capacity, lengths, dtype=jnp.float32, garbage=np.nan):
    """A cache filled with finite random keys and values up to `lengths`, `garbage` beyond."""
    k, v = (normal(seed + i, (len(lengths), capacity, HKV, DH)) for i in (0, 1))
    unfilled = jnp.arange(capacity)[None, :, None, None] >= jnp.asarray(lengths)[:, None, None, None]
    k, v = (jnp.where(unfilled, garbage, a).astype(dtype) for a in (k, v))
    return KVCache(k, v, jnp.asarray(lengths, jnp.int32))


def wide(a) -> np.ndarray:
    """float64 NumPy of any floating array (NumPy has no bfloat16 arithmetic)."""
    a = jnp.asarray(a)
    return np.array(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, np.float64)


def assert_step_matches(params, x, cache, lengths, result, *, window=None, softcap=None, tol=1e-5):
    out, new_cache = result
    expected, k, v, length = step_spec(params, x, cache, lengths, window=window, softcap=softcap)
    np.testing.assert_array_equal(new_cache.length, length)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=tol, atol=tol)
    # Every slot: the new ones written, every other one untouched (NaN included).
    np.testing.assert_allclose(wide(new_cache.k), k, rtol=tol, atol=tol)
    np.testing.assert_allclose(wide(new_cache.v), v, rtol=tol, atol=tol)


@functools.cache
def jitted_step(**static):
    return jax.jit(functools.partial(cached_attention, num_heads=H, **static))


def run_step(jit, params, x, cache, **kw):
    options = kw.pop("options", None)
    if jit:
        return jitted_step(options=options, **{k: kw.pop(k) for k in ("window",) if k in kw})(
            params, x, cache, **kw
        )
    return cached_attention(params, x, cache, num_heads=H, options=options, **kw)


# ---------------------------------------------------------------------------
# Silent wrong results: decoding accepted what it cannot mean


@pytest.mark.parametrize(
    "make",
    [
        lambda: init_cache(B, 8, HKV, DH, jnp.int32),
        lambda: filled_cache(0, 8, [0, 0])._replace(k=jnp.zeros((B, 8, HKV, DH), jnp.int8)),
        lambda: filled_cache(0, 8, [0, 0])._replace(v=jnp.zeros((B, 8, HKV, DH), bool)),
    ],
    ids=["init_cache_int32", "user_int8_k", "user_bool_v"],
)
def test_a_cache_of_an_integer_or_bool_dtype_is_refused(make):
    """It used to be accepted: the keys were cast and truncated, the next step 1.9 off."""
    message = (
        r"(dtype must be a floating dtype \(the cache stores keys|cache\.[kv] must have a floating dtype)"
    )
    with pytest.raises(TypeError, match=message):
        cached_attention(layer(), normal(1, (B, 3, D)), make(), num_heads=H)


def test_the_nnx_cache_of_an_integer_dtype_is_refused_and_defaults_to_the_computation_dtype():
    module = mnnx.MultiHeadAttention(D, H, num_kv_heads=HKV, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype"):
        module.init_cache(B, 8, dtype=jnp.int32)
    module.init_cache(B, 8)
    assert module.cached_key[...].dtype == jnp.float32
    with jax.enable_x64(True):
        wide = mnnx.MultiHeadAttention(D, H, num_kv_heads=HKV, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        wide.init_cache(B, 8)
        assert wide.cached_key[...].dtype == jnp.float64


@pytest.mark.parametrize(
    "lengths",
    [[7, 1], [-1, 1], np.array([2**32 - 1, 1], np.uint32)],
    ids=["beyond_T", "negative", "uint32_wrap"],
)
def test_lengths_outside_zero_to_t_are_refused_eagerly_and_clamped_under_jit(lengths):
    """They used to be accepted: `cache.length` then counted slots never written (a later
    step attended to them) or went negative."""
    params, x = layer(), normal(2, (B, 3, D))
    cache = filled_cache(3, 8, [2, 4])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\] \(new rows to keep\); got \["):
        cached_attention(params, x, cache, num_heads=H, lengths=lengths)
    # Under jit: clamped to [0, T], so a step only writes the slots it fills.
    clamped = np.clip(np.asarray(lengths).astype(np.int64), 0, 3)
    if np.asarray(lengths).dtype == np.uint32:
        clamped = np.array([3, 1])  # 2**32 - 1 clamps to T, not to a wrapped -1
    result = jitted_step()(params, x, cache, lengths=jnp.asarray(lengths))
    assert_step_matches(params, x, cache, clamped, result)


@pytest.mark.parametrize("filled", [[-1, 2], [9, 2]], ids=["negative", "beyond_capacity"])
def test_a_cache_length_outside_zero_to_s_is_refused_eagerly_and_clamped_under_jit(filled):
    """A negative length used to write its first new key in the cache's *last* slot (JAX's
    negative-index wrapping)."""
    params, x = layer(), normal(4, (B, 1, D))
    cache = filled_cache(5, 8, [0, 2])._replace(length=jnp.array(filled, jnp.int32))
    with pytest.raises(ValueError, match=r"cache.length must lie in \[0, S=8\] \(filled slots\); got \["):
        cached_attention(params, x, cache, num_heads=H)
    _, new_cache = jitted_step()(params, x, cache)
    if filled[0] < 0:  # clamped to 0: the new key goes to slot 0, the last slot stays unwritten
        assert np.isfinite(new_cache.k[0, 0]).all() and np.isnan(new_cache.k[0, -1]).all()
        np.testing.assert_array_equal(new_cache.length, [1, 3])
    else:  # clamped to S: the cache is full, nothing is written
        np.testing.assert_array_equal(new_cache.length, [8, 3])
        np.testing.assert_array_equal(new_cache.k[0], cache.k[0])


def test_linen_decoding_under_x64_keeps_float64():
    """`init(..., decode=True)` made its cache in float32 (flax's own module: float64), so
    decoding was 1.9e-7 off the causal forward instead of ~1e-16. From flax's own tests."""
    with jax.enable_x64(True):
        module = mlinen.MultiHeadAttention(H, num_kv_heads=HKV, param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(0), (B, 6, D), jnp.float64)
        variables = module.init(jax.random.PRNGKey(1), x, decode=True)
        assert variables["cache"]["cached_key"].dtype == jnp.float64
        params = {"params": variables["params"]}
        full = module.apply(params, x, is_causal=True)
        cache, outs = variables["cache"], []
        for t in range(6):
            out, state = module.apply(
                {**params, "cache": cache}, x[:, t : t + 1], decode=True, mutable=["cache"]
            )
            outs.append(out)
            cache = state["cache"]
        steps = jnp.concatenate(outs, axis=1)
        assert steps.dtype == jnp.float64
        np.testing.assert_allclose(steps, full, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# NaN leaks from unfilled and window-hidden slots


@pytest.mark.parametrize("capacity", [64, 600, 3000])
@pytest.mark.parametrize("implementation", ["reference", "blockwise", "auto", "xla"])
@pytest.mark.parametrize("garbage", [np.nan, np.inf], ids=["nan", "inf"])
def test_garbage_in_unfilled_slots_never_reaches_an_output(implementation, capacity, garbage):
    """NaN or Inf in the slots past `length` reached every output of "reference" and
    "blockwise", and of "auto" wherever it did not take the CPU decode loop. A reused buffer
    (or a recycled page) holds anything there. Steps of 1 and 20 tokens (the decode loop
    and the prefill paths), jitted; a ragged batch with an empty example."""
    params = layer()
    options = mj.Options(implementation=implementation)
    cache = filled_cache(6, capacity, [0, 37], garbage=garbage)
    for new in (1, 20):
        x = normal(7 + new, (B, new, D))
        lengths = np.array([new, new // 2])
        result = jitted_step(options=options)(params, x, cache, lengths=jnp.asarray(lengths))
        assert_step_matches(params, x, cache, lengths, result, tol=2e-5)


@pytest.mark.parametrize("implementation", ["reference", "blockwise", "auto"])
def test_garbage_in_slots_a_window_hides_never_reaches_an_output(implementation):
    """Slots older than every query's window are filled but hidden: they too hold anything
    (a ring buffer's overwritten past). Eager, with gradients through the step finite."""
    params, options, window = layer(), mj.Options(implementation=implementation), (5, 0)
    cache = filled_cache(8, 700, [40, 600])
    hidden = jnp.arange(700)[None, :, None, None] < (cache.length - window[0])[:, None, None, None]
    cache = cache._replace(k=jnp.where(hidden, jnp.nan, cache.k), v=jnp.where(hidden, -jnp.inf, cache.v))
    x = normal(9, (B, 3, D))
    result = cached_attention(params, x, cache, num_heads=H, window=window, options=options)
    assert_step_matches(params, x, cache, [3, 3], result, window=window)
    # Gradients too ("auto" here is the CPU decode loop, scan.py: it zeroes hidden keys as well).
    loss = lambda params, x: (
        cached_attention(params, x, cache, num_heads=H, window=window, options=options)[0] ** 2
    ).sum()
    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------
# Crashes and unclear errors


def test_a_step_of_zero_tokens_returns_an_empty_output_and_the_cache_unchanged():
    """It used to crash with ZeroDivisionError (step.py's reshape)."""
    params, cache = layer(), filled_cache(10, 8, [3, 5])
    for call in (cached_attention, jax.jit(cached_attention, static_argnames="num_heads")):
        out, new_cache = call(params, jnp.ones((B, 0, D)), cache, num_heads=H)
        assert out.shape == (B, 0, D) and out.dtype == jnp.float32
        for a, b in zip(new_cache, cache, strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_capacity_check_under_jit_raises_a_jax_runtime_error_holding_our_message():
    """What the README promises: eagerly a ValueError; under jit with check_capacity=True,
    JAX's JaxRuntimeError (a RuntimeError) when the result is awaited, holding our message."""
    params, cache = layer(), filled_cache(11, 8, [6, 2])
    x = normal(12, (B, 3, D))
    with pytest.raises(ValueError, match=r"cache must have room for the new tokens \(capacity S=8\)"):
        cached_attention(params, x, cache, num_heads=H, check_capacity=True)
    message = (
        r"cache must have room for the new tokens \(capacity S=8\); got examples \[0\] that would hold \[9\]"
    )
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(jitted_step(check_capacity=True)(params, x, cache))


def test_numpy_and_list_arguments_are_accepted_wherever_jax_accepts_them():
    """Parameters as NumPy arrays or Python lists, kv_length and q_offset as lists, a
    KVCache of NumPy arrays: JAX users pass NumPy everywhere."""
    params, x = layer(), normal(13, (B, 5, D))
    as_numpy = mj.MHAParams(*(None if p is None else np.asarray(p) for p in params))
    as_lists = mj.MHAParams(*(None if p is None else np.asarray(p).tolist() for p in params))
    expected = mj.batched_attention(params, x, num_heads=H, kv_length=jnp.array([3, 5]), is_causal=True,
                                    q_offset=jnp.array([0, 1]))  # fmt: skip
    for given_params in (as_numpy, as_lists):
        out = mj.batched_attention(given_params, np.asarray(x), num_heads=H, kv_length=[3, 5], is_causal=True,
                                   q_offset=[0, 1])  # fmt: skip
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
        one = mj.attention(given_params, x[0], num_heads=H, kv_length=3)
        np.testing.assert_allclose(one, mj.attention(params, x[0], num_heads=H, kv_length=3), rtol=1e-6)
    cache = filled_cache(14, 8, [2, 0], garbage=0.0)
    numpy_cache = KVCache(np.asarray(cache.k), np.asarray(cache.v), [2, 0])
    ours = cached_attention(as_lists, np.asarray(x[:, :2]), numpy_cache, num_heads=H, lengths=[2, 1])
    theirs = cached_attention(params, x[:, :2], cache, num_heads=H, lengths=jnp.array([2, 1]))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# The hunt: every decoding input drawn, against the float64 spec

# (compute dtype, cache dtype, tolerance). A bfloat16 cache stores keys and values rounded (the
# spec rounds them too), and the kernels may run weights · v on bfloat16 operands, as flash
# kernels do (float32 accumulation): bfloat16's rounding, 2^-8, bounds the difference.
DTYPES = {"float32": (jnp.float32, jnp.float32, 2e-5), "bf16_cache": (jnp.float32, jnp.bfloat16, 2e-2),
          "float64": (jnp.float64, jnp.float64, 1e-10)}  # fmt: skip


@st.composite
def decoding_inputs(draw):
    """A ragged batch over a cache of any capacity and fill, a step of 0..20 tokens, any
    implementation, NaN/Inf in the unfilled slots and in the slots every window hides."""
    capacity = draw(st.sampled_from([8, 37, 600]))
    batch = draw(st.integers(1, 3))
    new = draw(st.integers(0, 20))
    dtype = draw(st.sampled_from(list(DTYPES)))
    implementation = draw(
        st.sampled_from(["reference", "blockwise", "auto"] + (["xla"] if dtype != "float64" else []))
    )
    filled = [draw(st.integers(0, capacity)) for _ in range(batch)]
    counts = [draw(st.integers(0, min(new, capacity - f))) for f in filled]
    window = draw(st.none() | st.tuples(st.integers(0, 12), st.integers(0, 3)))
    garbage = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
    softcap = draw(st.sampled_from([None] if implementation == "xla" else [None, 3.0]))  # xla: no soft-cap
    return dict(capacity=capacity, new=new, dtype=dtype, implementation=implementation, filled=filled,
                counts=counts, window=window, garbage=garbage, softcap=softcap, jit=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))  # fmt: skip


@settings(max_examples=int(24 * SCALE))
@given(decoding_inputs())
def test_decoding_draws_match_the_float64_spec(p):
    note(p)
    compute, stored, tol = DTYPES[p["dtype"]]
    with jax.enable_x64(compute == jnp.float64):
        params = layer(p["seed"] % 97, compute)
        x = normal(p["seed"], (len(p["filled"]), p["new"], D)).astype(compute)
        cache = filled_cache(p["seed"] + 1, p["capacity"], p["filled"], stored, garbage=p["garbage"])
        if p["window"] is not None:  # the slots no query's window reaches hold garbage too
            hidden = (
                jnp.arange(p["capacity"])[None, :, None, None]
                < (cache.length - p["window"][0])[:, None, None, None]
            )
            cache = cache._replace(v=jnp.where(hidden, p["garbage"], cache.v).astype(stored))
        options = mj.Options(implementation=p["implementation"], softcap=p["softcap"])
        lengths = jnp.asarray(p["counts"], jnp.int32)
        result = run_step(p["jit"], params, x, cache, options=options, window=p["window"], lengths=lengths)
        assert result[0].dtype == compute
        assert_step_matches(
            params, x, cache, p["counts"], result, window=p["window"], softcap=p["softcap"], tol=tol
        )


# ---------------------------------------------------------------------------
# float64 through every public function under x64


def test_float64_stays_float64_through_every_public_function():
    """Each public call, given float64, returns float64 and the float64 spec's numbers."""
    with jax.enable_x64(True):
        params = layer(20, jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(21), (B, 6, D), jnp.float64)
        expected = np.stack([attention_np(params, x[b], num_heads=H, is_causal=True)[0] for b in range(B)])
        q = jax.random.normal(jax.random.PRNGKey(22), (6, H, DH), jnp.float64)
        k, v = (jax.random.normal(jax.random.PRNGKey(23 + i), (6, HKV, DH), jnp.float64) for i in (0, 1))
        heads, weights = core_np(q, k, v, is_causal=True)
        causal = mj.masks.causal_mask(6)
        nnx_module = mnnx.MultiHeadAttention(
            D, H, num_kv_heads=HKV, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
        )
        nnx_module.load_params(params)
        linen_module = mlinen.MultiHeadAttention(H, num_kv_heads=HKV, param_dtype=jnp.float64)
        linen_params = {"params": {n: a for n, a in params._asdict().items() if a is not None}}
        decoded, _ = cached_attention(params, x, init_cache(B, 8, HKV, DH, jnp.float64), num_heads=H)
        scores = mj.attention_scores(q, k)
        calls = {
            "attention": (mj.attention(params, x[0], num_heads=H, is_causal=True), expected[0]),
            "batched_attention": (mj.batched_attention(params, x, num_heads=H, is_causal=True), expected),
            "cached_attention": (decoded, expected),
            "nnx": (nnx_module(x, is_causal=True), expected),
            "linen": (linen_module.apply(linen_params, x, is_causal=True), expected),
            "blockwise_attention": (
                mj.blockwise_attention(q, k, v, structure=mj.Structure(is_causal=True)),
                heads,
            ),
            "attention_weights": (mj.attention_weights(scores, causal), weights),
            "apply_weights": (mj.apply_weights(mj.attention_weights(scores, causal), v), heads),
        }
        for name, (got, want) in calls.items():
            assert got.dtype == jnp.float64, name
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=name)
        stages = {
            "project": mj.project(x[0], params.w_q, params.b_q),
            "split_heads": mj.split_heads(x[0], 4),
            "merge_heads": mj.merge_heads(q),
            "project_heads": mj.project_heads(x[0], params.w_q, params.b_q, H),
            "merge_project": mj.merge_project(q, params.w_o, params.b_o),
            "attention_scores": scores,
            "dropout_weights": mj.dropout_weights(jnp.asarray(weights), 0.5, jax.random.PRNGKey(0)),
        }
        for name, got in stages.items():
            assert got.dtype == jnp.float64, name
