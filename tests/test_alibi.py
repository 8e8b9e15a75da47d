"""ALiBi (`Options(alibi=True)`): head h's scores get `slope_h · (key position - query position)`.

The slopes against the definition (a geometric sequence from 2^(-8/n) for n heads; a head
count that is not a power of two takes the nearest power's and every other one of twice
as many) and transformers' BLOOM `build_alibi_tensor`; the reference, blockwise and scan
(decode) kernels against the float64 spec of tests/reference.py, forward and backward, on
hypothesis-drawn shapes and rules; a BLOOM attention layer of transformers 4.57.1 (random
weights, 8 and 6 heads, a padded row); cached decoding against one uncached call. The mesh
(the ring's global positions, heads split over devices) is in tests/test_parallel.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor

import mha_jax as mj
from mha_jax import alibi, kernels
from mha_jax.masks import Structure
from tests.problems import assert_decoding_equals, draw_problem
from tests.reference import attention_np, core_np


def slopes_np(num_heads):
    """The ALiBi paper's slopes, from its definition."""

    def geometric(n):  # start 2^(-8/n), ratio the same
        return [(2.0 ** (-8.0 / n)) ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.array(geometric(num_heads))
    n = 2 ** math.floor(math.log2(num_heads))
    return np.array(geometric(n) + geometric(2 * n)[0::2][: num_heads - n])


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 40])
def test_slopes_follow_the_definition_and_bloom(num_heads):
    np.testing.assert_allclose(alibi.slopes(num_heads), slopes_np(num_heads), rtol=1e-14)
    theirs = build_alibi_tensor(torch.ones(1, 3), num_heads, torch.float32)[:, 0, 1]  # position 1: the slope
    np.testing.assert_allclose(alibi.slopes(num_heads), theirs.numpy(), rtol=1e-6)


@st.composite
def problems(draw):
    return draw_problem(draw, groups=(1, 3))


@settings(max_examples=8, deadline=None)
@given(problems())
def test_kernels_equal_the_float64_spec_forward_and_backward(p):
    slopes = alibi.slopes(p["q"].shape[1])
    want, _ = core_np(
        p["q"], p["k"], p["v"], softcap=p["softcap"], sinks=p["sinks"], alibi=slopes, **p["rules"]
    )
    structure = Structure(**p["rules"])
    sinks = None if p["sinks"] is None else jnp.asarray(p["sinks"])

    def run(name, q, k, v):
        options = mj.Options(alibi=True, softcap=p["softcap"], implementation=name)
        if name == "blockwise":
            return mj.blockwise_attention(q, k, v, structure=structure, options=options, sinks=sinks,
                                          block_sizes=p["blocks"])  # fmt: skip
        return kernels.attend(q, k, v, mask=None, bias=None, structure=structure, options=options, rng=None,
                              return_weights=False, sinks=sinks)[0]  # fmt: skip

    args = (p["q"], p["k"], p["v"])
    loss = lambda name: lambda *a: jnp.sum(run(name, *a) * p["cotangent"])
    grads = {
        name: jax.jit(jax.grad(loss(name), argnums=(0, 1, 2)))(*args) for name in ("reference", "blockwise")
    }
    for name in ("reference", "blockwise"):
        np.testing.assert_allclose(
            jax.jit(lambda *a, name=name: run(name, *a))(*args), want, rtol=2e-5, atol=2e-5
        )
        for got, expected in zip(grads[name], grads["reference"], strict=True):
            np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
    # The spec's gradient of q, by central differences of the float64 spec along the cotangent's
    # pairing: d/dε Σ(out(q + ε·u) · c) = Σ(dq · u).
    u = np.random.default_rng(0).standard_normal(p["q"].shape)
    f = lambda q: np.sum(core_np(q, p["k"], p["v"], softcap=p["softcap"], sinks=p["sinks"], alibi=slopes,
                                 **p["rules"])[0] * p["cotangent"])  # fmt: skip
    numeric = (f(p["q"] + 1e-6 * u) - f(p["q"] - 1e-6 * u)) / 2e-6
    assert np.sum(np.asarray(grads["blockwise"][0], np.float64) * u) == pytest.approx(
        numeric, rel=1e-3, abs=1e-3
    )


def test_alibi_changes_the_numbers_and_only_by_position_differences():
    """A shift of every position (q_offset and the keys by the same amount) leaves the output
    as it was; a different slope set does not."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((12, 4, 8)), jnp.float32) for _ in range(3))
    run = lambda options, **rules: mj.blockwise_attention(
        q, k, v, structure=Structure(**rules), options=options
    )
    on = mj.Options(alibi=True)
    base = run(on, is_causal=True)
    np.testing.assert_allclose(base, run(on, is_causal=True, q_offset=5, k_offset=5), atol=1e-6)
    assert float(jnp.abs(base - run(mj.Options(), is_causal=True)).max()) > 1e-2
    # Heads 2..5 of an 8-head layer take that layer's slopes, not a 4-head one's.
    sliced = run(mj.Options(alibi=8), is_causal=True, head_offset=2)
    want, _ = core_np(q, k, v, is_causal=True, alibi=alibi.slopes(8)[2:6])
    np.testing.assert_allclose(sliced, want, atol=2e-5)


# ---------------------------------------------------------------------------
# BLOOM's attention layer, transformers 4.57.1


@pytest.mark.parametrize("num_heads", [8, 6])
def test_bloom_attention_layer_matches_transformers(num_heads):
    head_dim, length, lengths = 4, 21, [21, 13]
    d_model = num_heads * head_dim
    config = transformers.BloomConfig(hidden_size=d_model, n_head=num_heads, n_layer=1)
    layer = BloomAttention(config, layer_idx=0).eval()
    generator = torch.Generator().manual_seed(num_heads)
    with torch.no_grad():
        for weight in layer.parameters():
            weight.normal_(0, 0.3, generator=generator)
    # Its fused projection's rows are [H, (q, k, v), Dh].
    qkv = layer.query_key_value.weight.detach().numpy().reshape(num_heads, 3, head_dim, d_model)
    qkv_b = layer.query_key_value.bias.detach().numpy().reshape(num_heads, 3, head_dim)
    part = lambda n: (qkv[:, n].reshape(d_model, d_model).T, qkv_b[:, n].reshape(d_model))
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = part(0), part(1), part(2)
    params = mj.MHAParams(w_q, b_q, w_k, b_k, w_v, b_v, layer.dense.weight.detach().numpy().T,
                          layer.dense.bias.detach().numpy())  # fmt: skip
    params = jax.tree.map(jnp.asarray, params)

    x = np.random.default_rng(num_heads).standard_normal((2, length, d_model)).astype(np.float32)
    padding = torch.from_numpy((np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64))
    i, j = np.arange(length)[:, None], np.arange(length)[None]
    visible = (j <= i)[None] & (j[None] < np.array(lengths)[:, None, None])  # [B, L, L]
    additive = torch.from_numpy(np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32))[:, None]
    with torch.no_grad():
        bias = build_alibi_tensor(padding, num_heads, torch.float32)
        theirs = layer(torch.from_numpy(x), torch.zeros(2, length, d_model), bias, additive)[0].numpy()
    for name in ("reference", "blockwise"):
        options = mj.Options(alibi=True, implementation=name)
        ours = mj.batched_attention(params, x, num_heads=num_heads, is_causal=True,
                                    kv_length=jnp.array(lengths), options=options)  # fmt: skip
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(ours[0], theirs[0], atol=2e-5 * scale)
        np.testing.assert_allclose(ours[1, :13], theirs[1, :13], atol=2e-5 * scale)
    want, _ = attention_np(params, x[1], num_heads=num_heads, is_causal=True, kv_length=13,
                           alibi=alibi.slopes(num_heads))  # fmt: skip
    np.testing.assert_allclose(theirs[1, :13], want[:13], atol=2e-5 * scale)


# ---------------------------------------------------------------------------
# Decoding: the cache's positions


@pytest.mark.parametrize("implementation", ["scan", "blockwise"])
def test_cached_decoding_equals_one_uncached_call(implementation):
    """A prompt of 5, then 6 steps of one token: each step's output
    equals the same rows of one causal call over the whole sequence."""
    num_heads, d_model, total = 6, 24, 11
    params = mj.init_params(jax.random.PRNGKey(0), d_model, num_heads, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, total, d_model))
    options = mj.Options(alibi=True, implementation=implementation)
    full = mj.batched_attention(params, x, num_heads=num_heads, is_causal=True,
                                options=mj.Options(alibi=True, implementation="reference"))  # fmt: skip
    assert_decoding_equals(full, params, x, num_heads=num_heads, options=options)
