"""The composed function against independent references, and its properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import mha_jax as mj
from mha_jax import masks
from tests.reference import attention_np, normal
from tests.test_implementations import core as kernel

reference = functools.partial(kernel, "reference")

B, Lq, Lk, D, Dkv, H, Dh = 2, 5, 7, 12, 10, 6, 4


def make(seed=0, num_kv_heads=None, use_bias=True, d_out=None, head_dim=Dh):
    params = mj.init_params(
        jax.random.PRNGKey(seed),
        D,
        H,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        d_kv=Dkv,
        d_out=d_out,
        use_bias=use_bias,
    )
    # non-zero biases so a missing bias cannot pass
    params = params._replace(
        **{
            n: normal(seed + i + 1, getattr(params, n).shape)
            for i, n in enumerate(("b_q", "b_k", "b_v", "b_o"))
            if getattr(params, n) is not None
        }
    )
    return params, normal(seed + 10, (Lq, D)), normal(seed + 11, (Lk, Dkv))


CASES = {
    "plain": {},
    "mask_2d": dict(mask=np.random.default_rng(0).random((Lq, Lk)) < 0.6),
    "mask_per_head": dict(mask=np.random.default_rng(1).random((H, Lq, Lk)) < 0.6),
    "causal": dict(is_causal=True),
    "causal_offset": dict(is_causal=True, q_offset=2),
    "kv_length": dict(kv_length=4),
    "window": dict(window=(1, 2)),
    "bias": dict(bias=np.random.default_rng(2).normal(size=(H, Lq, Lk))),
    "scale": dict(scale=0.3),
    "softcap": dict(softcap=0.7, bias=np.random.default_rng(5).normal(size=(H, Lq, Lk)), scale=3.0),
    "everything": dict(
        mask=np.random.default_rng(3).random((Lq, Lk)) < 0.8,
        is_causal=True,
        q_offset=3,
        kv_length=6,
        bias=np.random.default_rng(4).normal(size=(Lq, Lk)),
    ),
}


@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_float64_numpy(case, num_kv_heads):
    params, x_q, x_kv = make(num_kv_heads=num_kv_heads)
    options = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in CASES[case].items()}
    settings = {k: options.pop(k) for k in ("scale", "softcap") if k in options}  # as an Options value
    options["options"] = mj.Options(implementation="reference", **settings)
    out, weights = mj.attention(params, x_q, x_kv, num_heads=H, return_weights=True, **options)
    expected_out, expected_weights = attention_np(params, x_q, x_kv, num_heads=H, **CASES[case])
    np.testing.assert_allclose(weights, expected_weights, atol=1e-6)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)


def test_matches_jax_nn_dot_product_attention():
    params, x_q, x_kv = make()
    q = mj.split_heads(mj.project(x_q, params.w_q, params.b_q), H)
    k = mj.split_heads(mj.project(x_kv, params.w_k, params.b_k), H)
    v = mj.split_heads(mj.project(x_kv, params.w_v, params.b_v), H)
    mask = jnp.asarray(CASES["mask_per_head"]["mask"]).at[:, :, 0].set(True)
    bias = normal(5, (H, Lq, Lk))
    ours = reference(q, k, v, mask=mask, bias=bias)
    theirs = jax.nn.dot_product_attention(q, k, v, bias=bias[None], mask=mask[None])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    causal = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    ours = reference(q, k, v, structure=masks.Structure(True))
    np.testing.assert_allclose(ours, causal, rtol=1e-5, atol=1e-6)  # same top-left alignment


def test_gqa_equals_repeated_kv_heads():
    params, x_q, x_kv = make(num_kv_heads=2)
    group = H // 2
    # head h reads kv head h // G: repeating each kv head G times gives plain MHA
    expand = lambda w: jnp.repeat(w.reshape(*w.shape[:-1], 2, Dh), group, axis=-2).reshape(
        *w.shape[:-1], H * Dh
    )
    full = params._replace(
        w_k=expand(params.w_k), b_k=expand(params.b_k), w_v=expand(params.w_v), b_v=expand(params.b_v)
    )
    np.testing.assert_allclose(
        mj.attention(params, x_q, x_kv, num_heads=H),
        mj.attention(full, x_q, x_kv, num_heads=H),
        rtol=1e-5,
        atol=1e-6,
    )


def test_self_attention_defaults_x_kv_to_x_q():
    params = mj.init_params(jax.random.PRNGKey(0), D, H, head_dim=Dh)
    x = normal(1, (Lq, D))
    np.testing.assert_array_equal(
        mj.attention(params, x, num_heads=H), mj.attention(params, x, x, num_heads=H)
    )


def test_permuting_keys_and_values_together_changes_nothing():
    params, x_q, x_kv = make()
    perm = np.random.default_rng(0).permutation(Lk)
    np.testing.assert_allclose(
        mj.attention(params, x_q, x_kv, num_heads=H),
        mj.attention(params, x_q, x_kv[perm], num_heads=H),
        rtol=1e-5,
        atol=1e-6,
    )
    # and permuting queries permutes the output rows
    perm_q = np.random.default_rng(1).permutation(Lq)
    np.testing.assert_allclose(
        mj.attention(params, x_q, x_kv, num_heads=H)[perm_q],
        mj.attention(params, x_q[perm_q], x_kv, num_heads=H),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("how", ["kv_length", "padding_mask"])
def test_padding_equals_truncation(how):
    params, x_q, x_kv = make()
    valid = 4
    padded = x_kv.at[valid:].set(normal(7, (Lk - valid, Dkv)) * 100)  # garbage in padding
    if how == "kv_length":
        out = mj.attention(params, x_q, padded, num_heads=H, kv_length=valid)
    else:
        out = mj.attention(params, x_q, padded, num_heads=H, mask=masks.padding_mask(valid, Lq, Lk))
    truncated = mj.attention(params, x_q, x_kv[:valid], num_heads=H)
    np.testing.assert_allclose(out, truncated, rtol=1e-5, atol=1e-5)


def test_nan_in_padding_does_not_leak_into_valid_rows_or_gradients():
    params, x_q, x_kv = make()
    valid = 4
    poisoned_kv = x_kv.at[valid:].set(jnp.nan)
    poisoned_q = x_q.at[3:].set(jnp.nan)
    mask = masks.padding_mask(valid, Lq, Lk, q_lengths=3)

    def loss(params, x_q, x_kv):
        out = mj.attention(params, x_q, x_kv, num_heads=H, mask=mask)
        return (out[:3] ** 2).sum()

    out = mj.attention(params, poisoned_q, poisoned_kv, num_heads=H, mask=mask)
    clean = mj.attention(params, x_q[:3], x_kv[:valid], num_heads=H)
    np.testing.assert_allclose(out[:3], clean, rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss)(params, poisoned_q, poisoned_kv)
    assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))


def test_fully_masked_query_row_outputs_zero_heads_and_finite_gradients():
    params, x_q, x_kv = make(use_bias=False)
    mask = jnp.ones((Lq, Lk), bool).at[2].set(False)
    out, weights = mj.attention(params, x_q, x_kv, num_heads=H, mask=mask, return_weights=True)
    np.testing.assert_array_equal(weights[:, 2], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)  # no output bias: zero heads -> zero row
    grads = jax.grad(lambda p, x: mj.attention(p, x, x_kv, num_heads=H, mask=mask).sum(), argnums=(0, 1))(
        params, x_q
    )
    assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(grads[1][2], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_masking_in_half_precision_gives_no_nan_or_inf(dtype):
    params, x_q, x_kv = make()
    params = jax.tree.map(lambda p: (p * 30).astype(dtype), params)  # huge logits
    mask = jnp.ones((Lq, Lk), bool).at[1].set(False).at[:, 0].set(False)
    out = mj.attention(params, x_q.astype(dtype), x_kv.astype(dtype), num_heads=H, mask=mask, is_causal=True)
    assert out.dtype == dtype
    assert jnp.all(jnp.isfinite(out))


def test_causal_output_does_not_depend_on_the_future():
    params = mj.init_params(jax.random.PRNGKey(0), D, H, head_dim=Dh)
    x = normal(1, (Lq, D))
    for i in range(Lq):
        row = lambda x, i=i: mj.attention(params, x, num_heads=H, is_causal=True)[i].sum()
        grad = jax.grad(row)(x)
        assert jnp.all(grad[i + 1 :] == 0), f"output {i} depends on a later input"
        assert jnp.any(grad[: i + 1] != 0)


def test_vmap_equals_python_loop():
    params, _, _ = make()
    x_q, x_kv = normal(1, (B, Lq, D)), normal(2, (B, Lk, Dkv))
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (B, H, Lq, Lk))
    kv_length = jnp.array([7, 3])
    batched = mj.batched_attention(
        params,
        x_q,
        x_kv,
        num_heads=H,
        mask=mask,
        kv_length=kv_length,
        is_causal=True,
        q_offset=jnp.array([1, 2]),
    )
    for b in range(B):
        one = mj.attention(
            params,
            x_q[b],
            x_kv[b],
            num_heads=H,
            mask=mask[b],
            kv_length=kv_length[b],
            is_causal=True,
            q_offset=b + 1,
        )
        np.testing.assert_allclose(batched[b], one, rtol=1e-5, atol=1e-6)


def test_shared_mask_with_leading_one_broadcasts_over_batch():
    params, _, _ = make()
    x_q, x_kv = normal(1, (B, Lq, D)), normal(2, (B, Lk, Dkv))
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (1, Lq, Lk))
    shared = mj.batched_attention(params, x_q, x_kv, num_heads=H, mask=mask)
    tiled = mj.batched_attention(params, x_q, x_kv, num_heads=H, mask=jnp.tile(mask, (B, 1, 1)))
    np.testing.assert_array_equal(shared, tiled)


def test_gradients_match_finite_differences():
    params, x_q, x_kv = make(num_kv_heads=3)
    mask = jnp.ones((Lq, Lk), bool).at[0, 3:].set(False)
    f = lambda p, x_q, x_kv: mj.attention(
        p, x_q, x_kv, num_heads=H, mask=mask, is_causal=False, bias=jnp.ones((Lq, Lk)) * 0.1
    )
    with jax.enable_x64(False):
        check_grads(f, (params, x_q, x_kv), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        params, x_q, x_kv = make()
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        f = lambda p, x: mj.attention(p, x, x_kv.astype(jnp.float64), num_heads=H, is_causal=True, q_offset=2)
        check_grads(f, (params, x_q.astype(jnp.float64)), order=2, modes=["fwd", "rev"])


def test_returning_weights_does_not_change_the_output():
    params, x_q, x_kv = make()
    for dtype in (jnp.float32, jnp.bfloat16):
        plain = mj.attention(params, x_q, x_kv, num_heads=H, dtype=dtype, is_causal=True)
        out, weights = mj.attention(
            params, x_q, x_kv, num_heads=H, dtype=dtype, is_causal=True, return_weights=True
        )
        np.testing.assert_array_equal(plain, out)
        chex.assert_shape(weights, (H, Lq, Lk))


def test_dropout_off_equals_no_dropout_and_on_depends_on_rng():
    params, x_q, x_kv = make()
    base = mj.attention(params, x_q, x_kv, num_heads=H)
    off = mj.attention(
        params, x_q, x_kv, num_heads=H, dropout_rate=0.5, deterministic=True, rng=jax.random.PRNGKey(1)
    )
    np.testing.assert_array_equal(base, off)
    on = lambda seed: mj.attention(
        params, x_q, x_kv, num_heads=H, dropout_rate=0.5, deterministic=False, rng=jax.random.PRNGKey(seed)
    )
    assert not np.allclose(on(1), base)
    assert not np.allclose(on(1), on(2))
    np.testing.assert_array_equal(on(1), on(1))


def test_bf16_compute_is_close_to_float32():
    params, x_q, x_kv = make()
    exact = mj.attention(params, x_q, x_kv, num_heads=H)
    low = mj.attention(params, x_q, x_kv, num_heads=H, dtype=jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), exact, atol=0.1, rtol=0.05)


def test_no_retrace_on_second_call_with_same_shapes():
    params, _, _ = make()
    traced = chex.assert_max_traces(mj.attention, n=1)
    f = jax.jit(lambda p, x_q, x_kv: traced(p, x_q, x_kv, num_heads=H, is_causal=True))
    f(params, normal(1, (Lq, D)), normal(2, (Lk, Dkv)))
    f(params, normal(3, (Lq, D)), normal(4, (Lk, Dkv)))  # a retrace would raise here
    chex.clear_trace_counter()


def test_batched_attention_is_cached_across_calls():
    params, _, _ = make()
    x = normal(1, (B, Lq, D))
    mj.batched_attention(params, x, normal(2, (B, Lk, Dkv)), num_heads=H, is_causal=True)
    size = _batched_cache_size()
    mj.batched_attention(params, x * 2, normal(3, (B, Lk, Dkv)), num_heads=H, is_causal=True)
    assert _batched_cache_size() == size


def test_equal_settings_compile_once_whether_given_as_keywords_or_values():
    """The cache key is (Options, the static Structure, ...): equal values hit it."""
    params, _, _ = make()
    x, x_kv = normal(1, (B, Lq, D)), normal(2, (B, Lk, Dkv))
    calls = [
        dict(scale=0.25, is_causal=True, window=(2, 1)),
        dict(options=mj.Options(scale=0.25), structure=mj.Structure(True, window=(2, 1))),
        dict(options=mj.Options(scale=np.float32(0.25)), is_causal=True, window=[2, 1]),
    ]
    outs = []
    for i, call in enumerate(calls):
        outs.append(mj.batched_attention(params, x * (i + 1), x_kv, num_heads=H, **call))
        if i == 0:
            size = _batched_cache_size()
    assert _batched_cache_size() == size
    np.testing.assert_array_equal(outs[1], mj.batched_attention(params, x * 2, x_kv, num_heads=H, **calls[0]))


def test_structure_values_cannot_be_mixed_with_their_keywords_and_options_merge():
    params, x_q, x_kv = make()
    with pytest.raises(
        ValueError,
        match=r"structure must be given alone or not at all; got "
        r"structure= together with is_causal",
    ):
        mj.attention(params, x_q, x_kv, num_heads=H, structure=mj.Structure(), is_causal=True)
    # The settings merge: a keyword fills what the options leave at its default...
    merged = mj.attention(params, x_q, x_kv, num_heads=H, options=mj.Options(softcap=5.0), scale=0.1)
    whole = mj.attention(params, x_q, x_kv, num_heads=H, options=mj.Options(softcap=5.0, scale=0.1))
    np.testing.assert_array_equal(merged, whole)
    # ...and a setting given both ways, differently, is an error naming both.
    with pytest.raises(ValueError, match=r"scale must be given once, as a keyword or in options=; got "
                                         r"scale=0.1 and options.scale=0.2"):  # fmt: skip
        mj.attention(params, x_q, x_kv, num_heads=H, options=mj.Options(scale=0.2), scale=0.1)


def test_head_dim_independent_of_d_model_and_other_output_width():
    params, x_q, x_kv = make(head_dim=5, d_out=3)
    out = mj.attention(params, x_q, x_kv, num_heads=H)
    chex.assert_shape(out, (Lq, 3))
    expected, _ = attention_np(params, x_q, x_kv, num_heads=H)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_masks_helpers():
    np.testing.assert_array_equal(masks.causal_mask(2, 3), [[1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(masks.causal_mask(2, 3, q_offset=1), [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(masks.padding_mask(jnp.array([1, 2]), 1, 3), [[[1, 0, 0]], [[1, 1, 0]]])
    np.testing.assert_array_equal(masks.local_mask(3, 3, 0), np.eye(3, dtype=bool))
    assert masks.combine(None, None) is None
    np.testing.assert_array_equal(
        masks.combine(masks.causal_mask(2), None, jnp.array([[True, True], [False, True]])), [[1, 0], [0, 1]]
    )


def _batched_cache_size():
    from mha_jax import core

    return core._batched._cache_size()
