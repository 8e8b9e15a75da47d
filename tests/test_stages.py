"""Each stage on its own: shapes at every step, a hand-computed case, and the
softmax policy (rows sum to 1, masked weights exactly 0, empty rows zero)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mha_jax as mj
from tests.reference import normal

# The chapter's sizes, and sizes where every axis differs so a swap cannot pass.
CHAPTER = dict(B=4, Lq=16, Lk=16, D=768, H=12, Hkv=12, Dh=64)
DISTINCT = dict(B=2, Lq=5, Lk=7, D=12, H=6, Hkv=3, Dh=4)


@pytest.mark.parametrize("sizes", [CHAPTER, DISTINCT], ids=["chapter", "distinct"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_stage_shapes(sizes, jit):
    B, Lq, Lk, D, H, Hkv, Dh = (sizes[n] for n in ("B", "Lq", "Lk", "D", "H", "Hkv", "Dh"))
    params = mj.init_params(jax.random.PRNGKey(0), D, H, num_kv_heads=Hkv, head_dim=Dh)
    x_q, x_kv = normal(1, (Lq, D)), normal(2, (Lk, D))
    maybe_jit = jax.jit if jit else (lambda f, **_: f)

    q_flat = maybe_jit(mj.project)(x_q, params.w_q, params.b_q)
    chex.assert_shape(q_flat, (Lq, H * Dh))
    q = maybe_jit(mj.split_heads, static_argnums=1)(q_flat, H)
    chex.assert_shape(q, (Lq, H, Dh))
    k = mj.split_heads(mj.project(x_kv, params.w_k, params.b_k), Hkv)
    v = mj.split_heads(mj.project(x_kv, params.w_v, params.b_v), Hkv)
    chex.assert_shape([k, v], (Lk, Hkv, Dh))
    scores = maybe_jit(mj.attention_scores)(q, k)
    chex.assert_shape(scores, (H, Lq, Lk))
    chex.assert_type(scores, jnp.float32)
    weights = maybe_jit(mj.attention_weights)(scores)
    chex.assert_shape(weights, (H, Lq, Lk))
    heads = maybe_jit(mj.apply_weights)(weights, v)
    chex.assert_shape(heads, (Lq, H, Dh))
    merged = maybe_jit(mj.merge_heads)(heads)
    chex.assert_shape(merged, (Lq, H * Dh))
    np.testing.assert_array_equal(mj.merge_heads(q), q_flat)  # merge inverts split

    x = normal(3, (B, Lq, D))
    out = mj.batched_attention(params, x, normal(4, (B, Lk, D)), num_heads=H)
    chex.assert_shape(out, (B, Lq, D))


def test_hand_computed_tiny_case():
    # One head, Dh=1, q=1 against keys [0, 1]: scores [0, 1], weights [1, e]/(1+e).
    q = jnp.array([[[1.0]]])  # [Lq=1, H=1, Dh=1]
    k = jnp.array([[[0.0]], [[1.0]]])  # [Lk=2, 1, 1]
    v = jnp.array([[[2.0]], [[4.0]]])
    weights = mj.attention_weights(mj.attention_scores(q, k))
    e = np.e
    np.testing.assert_allclose(weights[0, 0], [1 / (1 + e), e / (1 + e)], rtol=1e-6)
    heads = mj.apply_weights(weights, v)
    np.testing.assert_allclose(heads[0, 0, 0], (2 + 4 * e) / (1 + e), rtol=1e-6)


def test_split_heads_is_the_contiguous_split():
    x = jnp.arange(2 * 6.0).reshape(2, 6)
    heads = mj.split_heads(x, 3)
    np.testing.assert_array_equal(heads[1, 2], x[1, 4:6])  # head 2 owns features 4:6


@pytest.mark.parametrize("rows", [5, 40], ids=["matmul_form", "einsum_form"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_fused_projections_equal_the_two_step_stages(use_bias, rows):
    """`attention` uses project_heads / merge_project; they are the chapter's
    project + split_heads and merge_heads + project, up to float rounding, in
    both of their forms (fewer rows than features, or at least as many)."""
    params = mj.init_params(
        jax.random.PRNGKey(0), 12, 6, num_kv_heads=3, head_dim=4, d_out=10, use_bias=use_bias
    )
    if use_bias:  # init_params zeroes biases; make them count
        params = params._replace(b_k=normal(3, (12,)), b_o=normal(4, (10,)))
    x = normal(1, (rows, 12))
    k = mj.project_heads(x, params.w_k, params.b_k, 3)
    chex.assert_shape(k, (rows, 3, 4))
    np.testing.assert_allclose(
        k, mj.split_heads(mj.project(x, params.w_k, params.b_k), 3), rtol=1e-6, atol=1e-6
    )
    heads = normal(2, (5, 6, 4))
    out = mj.merge_project(heads, params.w_o, params.b_o)
    chex.assert_shape(out, (5, 10))
    np.testing.assert_allclose(
        out, mj.project(mj.merge_heads(heads), params.w_o, params.b_o), rtol=1e-6, atol=1e-6
    )


def test_scores_are_scaled_by_inverse_sqrt_head_dim():
    q, k = normal(0, (3, 2, 16)), normal(1, (4, 2, 16))
    expected = np.einsum("qhd,khd->hqk", q, k) / 4.0
    np.testing.assert_allclose(mj.attention_scores(q, k), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mj.attention_scores(q, k, scale=1.0), expected * 4, rtol=1e-5)


def test_weights_rows_sum_to_one_and_masked_entries_are_exactly_zero():
    scores = normal(0, (3, 5, 7)) * 10
    mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.6, (3, 5, 7)).at[:, :, 0].set(True)
    weights = mj.attention_weights(scores, mask)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert jnp.all(jnp.where(mask, True, weights == 0.0))
    assert jnp.all(weights >= 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fully_masked_row_gives_zero_weights_and_zero_finite_gradients(dtype):
    scores = (normal(0, (2, 3, 4)) * 1e4).astype(dtype)  # large logits: overflow bait
    mask = jnp.ones((2, 3, 4), bool).at[1, 2].set(False)
    weights = mj.attention_weights(scores, mask)
    assert jnp.all(jnp.isfinite(weights))
    np.testing.assert_array_equal(weights[1, 2], 0.0)
    grad = jax.grad(lambda s: (mj.attention_weights(s, mask) * normal(1, (2, 3, 4))).sum())(
        scores.astype(jnp.float32)
    )
    assert jnp.all(jnp.isfinite(grad))
    np.testing.assert_array_equal(grad[1, 2], 0.0)


def test_low_precision_inputs_keep_float32_scores():
    q, k = normal(0, (4, 2, 8), jnp.bfloat16), normal(1, (6, 2, 8), jnp.bfloat16)
    scores = mj.attention_scores(q, k)
    chex.assert_type(scores, jnp.float32)
    exact = np.einsum("qhd,khd->hqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
    # float32 accumulation of bf16 products is (nearly) exact for Dh=8
    np.testing.assert_allclose(scores, exact / np.sqrt(8), rtol=1e-5, atol=1e-5)


def test_dropout_keeps_expectation_and_zeroes_a_fraction():
    weights = jnp.full((4, 64, 64), 0.5)
    dropped = mj.dropout_weights(weights, 0.25, jax.random.PRNGKey(0))
    zero_fraction = float((dropped == 0).mean())
    assert 0.22 < zero_fraction < 0.28
    np.testing.assert_allclose(dropped[dropped > 0], 0.5 / 0.75, rtol=1e-6)
    # heads are dropped independently (no broadcast across heads)
    assert not jnp.array_equal(dropped[0] == 0, dropped[1] == 0)
