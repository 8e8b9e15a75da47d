"""KV-cache decoding: prefill + step-by-step decode equals one causal forward,
for ragged batches, GQA, a sliding window, soft-capping, QK-norm and RoPE, on
the reference and blockwise kernels; gradients through a prefill; an in-place
cache update under donation; bad input named."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mha_jax as mj
from mha_jax import kernels
from mha_jax.decoding import KVCache, RoPE, cached_attention, init_cache
from mha_jax.kernels.scan import scan_cache
from mha_jax.masks import Structure
from tests.reference import normal

B, T, D, H, HKV, DH = 3, 11, 24, 6, 2, 4
PROMPTS = jnp.array([5, 1, 8])  # a ragged, right-padded batch of prompts
CAPACITY = 40

FEATURES = {
    "plain": dict(),
    "window": dict(rules=dict(window=(3, 0))),
    "softcap": dict(options=dict(softcap=2.0, scale=1.5)),
    "qk_norm_rope": dict(options=dict(rope=RoPE(theta=500.0, rotary_dim=2)), qk_norm=True),
    "rope_interleaved_window": dict(options=dict(rope=RoPE(layout="interleaved")), rules=dict(window=4)),
    # Llama 4's chunks (3 positions: prompts and decode steps cross chunk boundaries), and a
    # prefix per example, each within its prompt (a prefix is prefilled in one step)
    "chunk": dict(rules=dict(chunk=3)),
    "prefix_and_window": dict(rules=dict(prefix=(4, 1, 6), window=(2, 0))),
    # gpt-oss: a learned logit per head in every row's softmax (the scan kernel starts from it)
    "sinks_and_window": dict(rules=dict(window=(3, 0)), sinks=True),
}


def layer(qk_norm=False, sinks=False):
    params = mj.init_params(jax.random.PRNGKey(0), D, H, num_kv_heads=HKV, qk_norm=qk_norm, sinks=sinks)
    if sinks:  # spread out, one above every score: a sink that did nothing would fail
        params = params._replace(sinks=jnp.linspace(-2.0, 3.0, H))
    params = params._replace(b_q=normal(1, (H * DH,)), b_k=normal(2, (HKV * DH,)), b_o=normal(3, (D,)))
    if qk_norm:  # non-trivial scales, so that a skipped norm cannot pass
        params = params._replace(q_norm=1 + 0.3 * normal(4, (DH,)), k_norm=1 - 0.3 * normal(5, (DH,)))
    return params


@functools.cache
def steps(implementation, rules_items, options_items):
    options = mj.Options(implementation=implementation, **dict(options_items))
    rules = dict(rules_items)
    if "prefix" in rules:
        rules["prefix"] = jnp.array(rules["prefix"])
    step = functools.partial(cached_attention, num_heads=H, options=options, **rules)
    full = functools.partial(
        mj.batched_attention, num_heads=H, structure=Structure(is_causal=True, **rules), options=options
    )
    return jax.jit(step), full


def chosen(implementation: str, new: int, capacity: int) -> str:
    """The kernel `kernels.choose` picks for a decode step's batch (what `attend_batch` asks)."""
    q = jax.ShapeDtypeStruct((new, H, DH), jnp.float32)
    k = jax.ShapeDtypeStruct((capacity, HKV, DH), jnp.float32)
    rules = Structure(is_causal=True, q_offset=jnp.int32(0), kv_length=jnp.int32(1))
    options = mj.Options(implementation=implementation)
    request = kernels.Request.of(
        q, k, mask=None, bias=None, structure=rules, options=options, return_weights=False
    )
    request = request._replace(batched=True)
    return kernels.choose(implementation, request).name


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("implementation", ["reference", "blockwise", "auto"])
def test_prefill_then_decode_equals_one_causal_forward(implementation, feature):
    spec = FEATURES[feature]
    params = layer(spec.get("qk_norm", False), spec.get("sinks", False))
    x = normal(6, (B, T, D))
    step, full = steps(
        implementation,
        tuple(sorted(spec.get("rules", {}).items())),
        tuple(sorted(spec.get("options", {}).items())),
    )
    expected = full(params, x)  # [B, T, D]

    # "auto" on CPU with a cache over 512 slots: the decode loop of scan.py, prefill included (T=8)
    capacity = 600 if implementation == "auto" else CAPACITY
    assert (chosen(implementation, 8, capacity) == "scan") == (implementation == "auto")
    cache = init_cache(B, capacity, HKV, DH)
    out, cache = step(params, x[:, :8], cache, lengths=PROMPTS)  # prefill: each its own prompt
    np.testing.assert_array_equal(cache.length, PROMPTS)
    for b in range(B):
        np.testing.assert_allclose(out[b, : PROMPTS[b]], expected[b, : PROMPTS[b]], rtol=1e-5, atol=1e-5)
        # padding rows get zero heads: the output bias alone
        padding = out[b, PROMPTS[b] :]
        np.testing.assert_allclose(padding, jnp.broadcast_to(params.b_o, padding.shape))
    # then one token at a time, each example from where its prompt ended
    for _ in range(T - int(PROMPTS.min())):
        position = jnp.minimum(cache.length, T - 1)
        active = cache.length < T
        out, cache = step(
            params, x[jnp.arange(B), position][:, None], cache, lengths=active.astype(jnp.int32)
        )
        for b in np.flatnonzero(active):
            np.testing.assert_allclose(out[b, 0], expected[b, position[b]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.length, T)


@pytest.mark.parametrize("sinks", [None, (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window", [None, (5, 0)])
def test_decode_loop_equals_the_reference_across_blocks(window, dtype, sinks):
    """scan_cache with 8-key blocks over 45 slots (the last block overhangs the cache): GQA,
    soft-capping, ragged fills (one example empty, one full), garbage past the filled slots;
    with sinks, the empty example's rows are still zeros (the sink takes all the mass)."""
    sinks = None if sinks is None else jnp.array(sinks)
    queries, slots, lengths = 3, 45, jnp.array([0, 20, 45])
    offsets = jnp.maximum(lengths - queries, 0)  # the queries are the last ones appended
    q = normal(20, (3, queries, H, DH))
    k = normal(21, (3, slots, HKV, DH)).astype(dtype)
    v = normal(22, (3, slots, HKV, DH)).astype(dtype)
    garbage = jnp.arange(slots)[None, :, None, None] >= lengths[:, None, None, None]
    v = jnp.where(garbage, jnp.nan, v)  # never read: hidden slots hold anything
    options = mj.Options(softcap=3.0)
    rules = Structure(is_causal=True, q_offset=offsets, kv_length=lengths, window=window)
    heads = scan_cache(q, k, v, rules, options=options, block=8, sinks=sinks)
    reference = mj.Options(softcap=3.0, implementation="reference")
    for b in range(3):
        structure = Structure(is_causal=True, q_offset=offsets[b], kv_length=lengths[b], window=window)
        k_b, v_b = k[b].astype(jnp.float32), jnp.where(garbage[b], 0, v[b]).astype(jnp.float32)
        expected, _ = kernels.attend(q[b], k_b, v_b, mask=None, bias=None, structure=structure, sinks=sinks,
                                     options=reference, rng=None, return_weights=False)  # fmt: skip
        np.testing.assert_allclose(heads[b], expected, rtol=1e-5, atol=1e-5)
    assert not jnp.any(heads[0])  # nothing filled: zeros


def test_float64_decode_stays_float64():
    """ "auto" over a long cache keeps float64 (scan_cache computes in float32, so it stands aside)."""
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), layer())
        x = normal(8, (B, 6, D)).astype(jnp.float64)
        cache = init_cache(B, 600, HKV, DH, jnp.float64)
        _, cache = cached_attention(params, x[:, :5], cache, num_heads=H)
        out, _ = cached_attention(params, x[:, 5:], cache, num_heads=H)  # one decode step
        expected = mj.batched_attention(params, x, num_heads=H, is_causal=True, implementation="reference")
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out[:, 0], expected[:, 5], rtol=1e-12, atol=1e-12)


def test_gradients_through_a_prefill_step():
    params = layer(qk_norm=True)
    x = normal(7, (B, 9, D))
    options = mj.Options(rope=RoPE(), implementation="blockwise")
    cotangent = normal(8, (B, 9, D))

    def prefill(params, x):
        out, _ = cached_attention(params, x, init_cache(B, CAPACITY, HKV, DH), num_heads=H, options=options)
        return (out * cotangent).sum()

    def full(params, x):
        return (
            mj.batched_attention(params, x, num_heads=H, is_causal=True, options=options) * cotangent
        ).sum()

    chex.assert_trees_all_close(
        jax.jit(jax.grad(prefill, argnums=(0, 1)))(params, x),
        jax.grad(full, argnums=(0, 1))(params, x),
        rtol=1e-4,
        atol=1e-5,
    )


def test_explicit_positions_equal_the_default_ones_and_rotate_the_cached_keys():
    params = layer()
    options = mj.Options(rope=RoPE())
    x = normal(9, (B, 4, D))
    cache = init_cache(B, CAPACITY, HKV, DH)._replace(length=jnp.array([0, 3, 6], jnp.int32))
    default, _ = cached_attention(params, x, cache, num_heads=H, options=options)
    positions = cache.length[:, None] + jnp.arange(4)
    explicit, _ = cached_attention(params, x, cache, num_heads=H, options=options, positions=positions)
    np.testing.assert_array_equal(default, explicit)
    moved, moved_cache = cached_attention(
        params, x, cache, num_heads=H, options=options, positions=positions + 7
    )
    assert not np.allclose(moved, default)
    assert not np.allclose(
        moved_cache.k, cached_attention(params, x, cache, num_heads=H, options=options)[1].k
    )


def test_cache_is_updated_in_place_under_donation():
    """With the cache donated, XLA aliases it to the output: no second cache-sized buffer.
    (32768 slots: the decode loop's blocks, 2048 keys, are well under a copy of the cache.)"""
    params = layer()
    cache = init_cache(2, 32768, HKV, DH)
    x = normal(10, (2, 1, D))
    step = jax.jit(functools.partial(cached_attention, num_heads=H), donate_argnums=(2,))
    compiled = step.lower(params, x, cache).compile()
    cache_bytes = cache.k.nbytes + cache.v.nbytes
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes, memory
    assert memory.temp_size_in_bytes < cache.k.nbytes / 4, memory  # blocks, not copies of the cache
    out, cache = step(params, x, cache)
    np.testing.assert_array_equal(cache.length, [1, 1])


def test_a_step_costs_what_the_filled_length_costs():
    """The same step at 512 filled slots compiles to the same temporary memory whatever
    the capacity: the decode loop (scan.py) reads blocks of the cache, never all of it."""
    params = layer()
    x = normal(11, (1, 1, D))
    temp = []
    for capacity in (1024, 32768):
        cache = init_cache(1, capacity, HKV, DH)._replace(length=jnp.array([512], jnp.int32))
        compiled = jax.jit(functools.partial(cached_attention, num_heads=H)).lower(params, x, cache).compile()
        temp.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temp[1] <= 2 * temp[0] + 65536, temp


def test_appending_past_the_capacity():
    params = layer()
    cache = init_cache(2, 8, HKV, DH)._replace(length=jnp.array([6, 2], jnp.int32))
    x = normal(12, (2, 3, D))
    with pytest.raises(ValueError, match=r"cache must have room for the new tokens \(capacity S=8\); "
                                         r"got examples \[0\] would hold \[9\] positions"):  # fmt: skip
        cached_attention(params, x, cache, num_heads=H)
    # Under jit: the tokens that do not fit are dropped and length stops at the capacity...
    step = jax.jit(functools.partial(cached_attention, num_heads=H))
    _, full = step(params, x, cache)
    np.testing.assert_array_equal(full.length, [8, 5])
    # ...unless the checked mode is on: then the step raises at run time.
    checked = jax.jit(functools.partial(cached_attention, num_heads=H, check_capacity=True))
    with pytest.raises(Exception, match=r"cache must have room for the new tokens"):
        jax.block_until_ready(checked(params, x, cache))


BAD = [
    ("cache_heads", dict(cache=init_cache(B, 8, HKV + 1, DH)), ValueError,
     r"cache.k must have shape \[B, S, Hkv, Dh\]=\(3, \*, 2, 4\) \(Hkv and Dh of params\); "
     r"got shape \(3, 8, 3, 4\)"),
    ("cache_head_width", dict(cache=init_cache(B, 8, HKV, DH * 2)), ValueError, r"cache.k must have shape"),
    ("cache_batch", dict(cache=init_cache(B + 1, 8, HKV, DH)), ValueError, r"cache.k must have shape"),
    ("cache_not_a_cache", dict(cache=(1, 2, 3)), TypeError, r"cache must be an mha_jax.decoding.KVCache"),
    ("positions_shape", dict(positions=jnp.zeros((B,), jnp.int32)), ValueError,
     r"positions must have shape \[B, T\]=\(3, 2\); got shape \(3,\)"),
    ("positions_float", dict(positions=jnp.zeros((B, 2))), TypeError,
     r"positions must have an integer dtype"),
    ("lengths_shape", dict(lengths=jnp.array([1, 2], jnp.int32)), ValueError,
     r"lengths must have shape \[B\]"),
    ("rope_too_wide", dict(options=mj.Options(rope=RoPE(rotary_dim=8))), ValueError,
     r"rope.rotary_dim must be at most Dh=4; got 8"),
    ("chunk_negative", dict(chunk=-2), ValueError, r"chunk must be a positive int \(static\) or None"),
    ("prefix_beyond_the_cache", dict(prefix=9), ValueError, r"prefix must lie in \[0, Lk=8\]"),
    ("prefix_shape", dict(prefix=jnp.array([1, 2], jnp.int32)), ValueError, r"prefix must have shape \[B\]"),
    ("prefix_float", dict(prefix=1.5), TypeError, r"prefix must have an integer dtype"),
]  # fmt: skip


@pytest.mark.parametrize("case, exception, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_decoding_input_is_named(case, exception, message):
    arguments = dict(cache=init_cache(B, 8, HKV, DH)) | case
    with pytest.raises(exception, match=message):
        cached_attention(layer(), normal(13, (B, 2, D)), arguments.pop("cache"), num_heads=H, **arguments)


def test_the_scan_kernel_runs_batches_only_and_says_so():
    """Asked for one example (attention, under the batched call's vmap), "scan" names why not;
    through a decode step it equals the reference, GQA and a chunk rule included."""
    with pytest.raises(ValueError, match=r'implementation="scan" cannot attend one example at a time'):
        mj.attention(layer(), normal(14, (5, D)), num_heads=H, implementation="scan")
    x, cache = normal(15, (B, 3, D)), init_cache(B, 20, HKV, DH)
    out = {
        name: cached_attention(layer(), x, cache, num_heads=H, chunk=2, implementation=name)[0]
        for name in ("scan", "reference")
    }
    np.testing.assert_allclose(out["scan"], out["reference"], rtol=1e-5, atol=1e-5)


def test_rope_over_an_odd_head_width_is_named():
    params = mj.init_params(jax.random.PRNGKey(0), 15, 3)  # head width 5
    with pytest.raises(ValueError, match=r"the head width Dh must be even to rotate all of it"):
        cached_attention(params, normal(13, (B, 2, 15)), init_cache(B, 8, 3, 5), num_heads=3,
                         options=mj.Options(rope=RoPE()))  # fmt: skip


def test_init_cache_names_bad_sizes():
    with pytest.raises(ValueError, match=r"capacity must be a positive integer; got 0"):
        init_cache(1, 0, 2, 4)
    assert isinstance(init_cache(1, 3, 2, 4), KVCache)


# ---------------------------------------------------------------------------
# The modules: the cache as Flax state, or passed in and out


def module_input():
    return normal(20, (2, 9, D))


MODULE_OPTIONS = mj.Options(rope=RoPE(theta=300.0), softcap=4.0)


def test_nnx_decode_with_its_cache_state_equals_the_full_forward():
    from flax import nnx

    import mha_jax.nnx as mnnx

    module = mnnx.MultiHeadAttention(
        D, H, num_kv_heads=HKV, qk_norm=True, options=MODULE_OPTIONS, rngs=nnx.Rngs(0)
    )
    x = module_input()
    full = module(x, is_causal=True)
    module.init_cache(2, 32)
    step = nnx.jit(lambda module, x: module(x, decode=True))
    outs = [step(module, x[:, :4])] + [step(module, x[:, t : t + 1]) for t in range(4, 9)]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(module.cache_length[...], [9, 9])
    assert isinstance(module.cached_key, nnx.Cache)
    # the same with a cache kept outside the module, which stays untouched
    out, cache = module(x, cache=init_cache(2, 32, HKV, DH))
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.length, [9, 9])
    np.testing.assert_array_equal(module.cache_length[...], [9, 9])


def test_linen_decode_with_the_cache_collection_equals_the_full_forward():
    import mha_jax.linen as mlinen

    module = mlinen.MultiHeadAttention(H, num_kv_heads=HKV, qk_norm=True, options=MODULE_OPTIONS)
    x = module_input()
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, D)), decode=True)
    assert variables["cache"]["cached_key"].shape == (2, 32, HKV, DH)  # room for the init input
    params = {"params": variables["params"]}
    full = module.apply(params, x, is_causal=True)
    cache, outs = variables["cache"], []
    for start, stop in ((0, 4), *((t, t + 1) for t in range(4, 9))):
        out, state = module.apply(
            {**params, "cache": cache}, x[:, start:stop], decode=True, mutable=["cache"]
        )
        outs.append(out)
        cache = state["cache"]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    out, explicit = module.apply(params, x, cache=init_cache(2, 16, HKV, DH))
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(explicit.length, [9, 9])


def test_nnx_and_linen_hold_the_same_qk_norm_parameters_and_give_the_same_numbers():
    from flax import nnx

    import mha_jax.linen as mlinen
    import mha_jax.nnx as mnnx

    ours = mnnx.MultiHeadAttention(
        D, H, num_kv_heads=HKV, qk_norm=True, options=MODULE_OPTIONS, rngs=nnx.Rngs(0)
    )
    ours.load_params(layer(qk_norm=True))  # non-trivial norm scales
    linen = mlinen.MultiHeadAttention(H, num_kv_heads=HKV, qk_norm=True, options=MODULE_OPTIONS)
    x = module_input()
    variables = {"params": {k: v for k, v in ours.params._asdict().items() if v is not None}}
    assert jax.tree.map(jnp.shape, linen.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_array_equal(ours(x, is_causal=True), linen.apply(variables, x, is_causal=True))


MODULE_ERRORS = [
    ("decode_with_mask", lambda m, x: m(x, decode=True, mask=jnp.ones((9, 9), bool)), ValueError,
     r"decode=True and cache= take no mask"),
    ("decode_before_init_cache", lambda m, x: m(x, decode=True), ValueError,
     r"cache must be made with module.init_cache\(batch, capacity\) first"),
    ("decode_unbatched", lambda m, x: m(x[0], cache=init_cache(1, 16, HKV, DH)), ValueError,
     r"x_q must have rank 3 \[B, T, D\] when decoding"),
    ("load_wrong_shape", lambda m, x: m.load_params(layer()._replace(w_q=jnp.ones((D, 8)))), ValueError,
     r"params.w_q must have shape the module's shape=\(24, 24\); got shape \(24, 8\)"),
    ("load_missing_norm", lambda m, x: m.load_params(layer(qk_norm=True)._replace(k_norm=None)), ValueError,
     r"params.k_norm must be given; got None"),
    ("options_and_keywords", lambda m, x: type(m)(D, H, scale=0.5, options=mj.Options(scale=0.25), rngs=None),
     ValueError, r"scale must be given once, as a keyword or in options=; got scale=0.5 and options.scale"),
]  # fmt: skip


@pytest.mark.parametrize(
    "call, exception, message", [r[1:] for r in MODULE_ERRORS], ids=[r[0] for r in MODULE_ERRORS]
)
def test_module_decoding_errors_are_named(call, exception, message):
    from flax import nnx

    import mha_jax.nnx as mnnx

    module = mnnx.MultiHeadAttention(D, H, num_kv_heads=HKV, qk_norm=True, rngs=nnx.Rngs(0))
    with pytest.raises(exception, match=message):
        call(module, module_input())
