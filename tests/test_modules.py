"""The Flax wrappers: parity with Flax's own attention given the same weights,
NNX == linen, sowing, dropout plumbing, unbatched inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mha_jax as mj
import mha_jax.linen as mlinen
import mha_jax.nnx as mnnx
from tests.reference import normal

B, Lq, Lk, D, Dkv, H, Dh = 2, 5, 7, 12, 10, 3, 4


def flax_kernels(params: mj.MHAParams, num_kv_heads=H):
    """Our `[D, H*Dh]` matrices as Flax's `[D, H, Dh]` DenseGeneral kernels."""
    split = lambda w, heads: w.reshape(w.shape[0], heads, Dh)
    return {
        "query": {"kernel": split(params.w_q, H), "bias": params.b_q.reshape(H, Dh)},
        "key": {"kernel": split(params.w_k, num_kv_heads), "bias": params.b_k.reshape(num_kv_heads, Dh)},
        "value": {"kernel": split(params.w_v, num_kv_heads), "bias": params.b_v.reshape(num_kv_heads, Dh)},
        "out": {"kernel": params.w_o.reshape(H, Dh, -1), "bias": params.b_o},
    }


def random_params(num_kv_heads=None, seed=0):
    params = mj.init_params(jax.random.PRNGKey(seed), D, H, num_kv_heads=num_kv_heads, head_dim=Dh, d_kv=Dkv)
    return params._replace(
        b_q=normal(1, (H * Dh,)),
        b_k=normal(2, params.b_k.shape),
        b_v=normal(3, params.b_v.shape),
        b_o=normal(4, (D,)),
    )


def mask_with_nonempty_rows():
    # Flax averages V over an empty row while we return zeros: keep rows non-empty here.
    return jax.random.bernoulli(jax.random.PRNGKey(5), 0.6, (B, Lq, Lk)).at[:, :, 0].set(True)


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
def test_matches_flax_linen_outputs_and_gradients(use_mask):
    params = random_params()
    x_q, x_kv = normal(6, (B, Lq, D)), normal(7, (B, Lk, Dkv))
    mask = mask_with_nonempty_rows() if use_mask else None
    theirs = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * Dh, out_features=D)

    def ours_fn(params, x_q, x_kv):
        return mj.batched_attention(params, x_q, x_kv, num_heads=H, mask=mask)

    def theirs_fn(params, x_q, x_kv):
        flax_mask = None if mask is None else mask[:, None]
        return theirs.apply({"params": flax_kernels(params)}, x_q, x_kv, mask=flax_mask)

    np.testing.assert_allclose(ours_fn(params, x_q, x_kv), theirs_fn(params, x_q, x_kv), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: (f(*a) * normal(8, (B, Lq, D))).sum()
    ours_grads = jax.grad(loss(ours_fn), argnums=(0, 1, 2))(params, x_q, x_kv)
    theirs_grads = jax.grad(loss(theirs_fn), argnums=(0, 1, 2))(params, x_q, x_kv)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(theirs_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [H, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_matches_flax_nnx_outputs_and_gradients(num_kv_heads, is_causal):
    params = random_params(num_kv_heads)
    x_q, x_kv = normal(6, (B, Lq, D)), normal(7, (B, Lk, Dkv))
    mask = mask_with_nonempty_rows()
    theirs = nnx.MultiHeadAttention(
        H,
        D,
        qkv_features=H * Dh,
        out_features=D,
        num_kv_heads=num_kv_heads,
        in_kv_features=Dkv,
        decode=False,
        rngs=nnx.Rngs(0),
    )
    graph, _ = nnx.split(theirs)

    def theirs_fn(params, x_q, x_kv):
        module = nnx.merge(graph, nnx.State(jax.tree.map(nnx.Param, flax_kernels(params, num_kv_heads))))
        return module(x_q, x_kv, x_kv, mask=mask[:, None], is_causal=is_causal)

    def ours_fn(params, x_q, x_kv):
        return mj.batched_attention(params, x_q, x_kv, num_heads=H, mask=mask, is_causal=is_causal)

    np.testing.assert_allclose(ours_fn(params, x_q, x_kv), theirs_fn(params, x_q, x_kv), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: (f(*a) ** 2).sum()
    ours_grads = jax.grad(loss(ours_fn), argnums=(0, 1, 2))(params, x_q, x_kv)
    theirs_grads = jax.grad(loss(theirs_fn), argnums=(1, 2))(params, x_q, x_kv)
    for a, b in zip(ours_grads[1:], theirs_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def copy_into_linen(nnx_module):
    return {
        "params": {name: value for name, value in nnx_module.params._asdict().items() if value is not None}
    }


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_kv_heads=1),
        dict(use_bias=False),
        dict(head_dim=5, out_features=7),
    ],
    ids=["plain", "mqa", "no_bias", "sizes"],
)
def test_nnx_and_linen_give_identical_outputs(options):
    ours = mnnx.MultiHeadAttention(D, H, in_kv_features=Dkv, rngs=nnx.Rngs(0), **options)
    linen = mlinen.MultiHeadAttention(H, **options)
    x_q, x_kv = normal(1, (B, Lq, D)), normal(2, (B, Lk, Dkv))
    variables = linen.init(jax.random.PRNGKey(0), x_q, x_kv)
    # same parameter names and shapes from both wrappers
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, copy_into_linen(ours))
    kwargs = dict(mask=mask_with_nonempty_rows(), is_causal=True)
    np.testing.assert_array_equal(
        ours(x_q, x_kv, **kwargs), linen.apply(copy_into_linen(ours), x_q, x_kv, **kwargs)
    )


def test_module_equals_functional_api():
    module = mnnx.MultiHeadAttention(D, H, num_kv_heads=1, rngs=nnx.Rngs(3))
    x = normal(1, (B, Lq, D))
    np.testing.assert_array_equal(
        module(x, is_causal=True), mj.batched_attention(module.params, x, num_heads=H, is_causal=True)
    )


def test_unbatched_input_equals_batch_of_one():
    module = mnnx.MultiHeadAttention(D, H, rngs=nnx.Rngs(0))
    x = normal(1, (Lq, D))
    np.testing.assert_allclose(
        module(x, kv_length=3), module(x[None], kv_length=jnp.array([3]))[0], rtol=1e-6
    )


def test_sow_weights_stores_the_weights_and_keeps_the_output():
    plain = mnnx.MultiHeadAttention(D, H, rngs=nnx.Rngs(0))
    sowing = mnnx.MultiHeadAttention(D, H, rngs=nnx.Rngs(0), sow_weights=True)
    x = normal(1, (B, Lq, D))
    out, intermediates = nnx.capture(sowing, nnx.Intermediate)(x, is_causal=True)
    np.testing.assert_array_equal(plain(x, is_causal=True), out)
    (weights,) = intermediates["attention_weights"].get_value()
    assert weights.shape == (B, H, Lq, Lq)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert jnp.all(jnp.triu(weights, 1) == 0)

    linen = mlinen.MultiHeadAttention(H, sow_weights=True)
    variables = linen.init(jax.random.PRNGKey(0), x)
    _, state = linen.apply({"params": variables["params"]}, x, mutable=["intermediates"])
    assert state["intermediates"]["attention_weights"][0].shape == (B, H, Lq, Lq)


def test_nnx_dropout_needs_deterministic_and_uses_its_rngs():
    module = mnnx.MultiHeadAttention(D, H, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = normal(1, (B, Lq, D))
    with pytest.raises(ValueError, match="deterministic must be given"):
        module(x)
    a, b = module(x, deterministic=False), module(x, deterministic=False)
    assert not np.allclose(a, b)  # the stored stream advances
    clean = module(x, deterministic=True)
    module.eval()  # Flax's switch sets module.deterministic = True
    np.testing.assert_array_equal(module(x), clean)
    np.testing.assert_array_equal(
        module(x, deterministic=False, rngs=nnx.Rngs(dropout=1)),
        module(x, deterministic=False, rngs=nnx.Rngs(dropout=1)),
    )


def test_linen_dropout_uses_the_dropout_rng():
    module = mlinen.MultiHeadAttention(H, dropout_rate=0.5)
    x = normal(1, (B, Lq, D))
    variables = module.init(jax.random.PRNGKey(0), x, deterministic=True)
    run = lambda seed: module.apply(
        variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)}
    )
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    np.testing.assert_array_equal(
        module.apply(variables, x, deterministic=True), mlinen.MultiHeadAttention(H).apply(variables, x)
    )


def test_modules_jit_without_retracing():
    module = mnnx.MultiHeadAttention(D, H, rngs=nnx.Rngs(0))
    traces = []

    @nnx.jit
    def step(module, x):
        traces.append(1)
        return module(x, is_causal=True)

    step(module, normal(1, (B, Lq, D)))
    step(module, normal(2, (B, Lq, D)))
    assert len(traces) == 1


def test_bf16_compute_with_float32_params():
    module = mnnx.MultiHeadAttention(D, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = normal(1, (B, Lq, D))
    out = module(x)
    assert out.dtype == jnp.bfloat16 and module.w_q[...].dtype == jnp.float32
    exact = mnnx.MultiHeadAttention(D, H, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------
# What a user moving from Flax writes (issue 16's frictions)


def test_the_modules_take_flax_masks_as_flax_means_them():
    """`nnx.make_causal_mask` gives a float `[B, 1, L, L]`; flax's attention also takes bool and
    per-head masks. Ours reads each as Flax does, on NNX and linen, and equals flax's own
    MultiHeadAttention given the same weights and mask."""
    params = mj.init_params(jax.random.PRNGKey(0), D, H, head_dim=Dh)
    x = normal(40, (B, Lq, D))
    ours = mnnx.MultiHeadAttention(D, H, head_dim=Dh, rngs=nnx.Rngs(0))
    ours.load_params(params)
    linen = mlinen.MultiHeadAttention(H, head_dim=Dh)
    variables = {"params": {k: v for k, v in params._asdict().items() if v is not None}}
    causal = ours(x, is_causal=True)
    theirs = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * Dh, out_features=D)
    flax_variables = {"params": flax_kernels(params)}
    for mask in (
        nnx.make_causal_mask(jnp.ones((B, Lq))),  # float32 [B, 1, L, L]
        nnx.make_causal_mask(jnp.ones((B, Lq)), dtype=bool),
        jnp.broadcast_to(nnx.make_causal_mask(jnp.ones((B, Lq)), dtype=jnp.int32), (B, H, Lq, Lq)),
    ):
        np.testing.assert_allclose(ours(x, mask=mask), causal, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(linen.apply(variables, x, mask=mask), causal, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(theirs.apply(flax_variables, x, mask=mask), causal, rtol=1e-5, atol=1e-5)


def test_is_causal_true_is_accepted_when_decoding_and_false_refused():
    module = mnnx.MultiHeadAttention(D, H, head_dim=Dh, rngs=nnx.Rngs(0))
    x = normal(41, (B, 4, D))
    module.init_cache(B, 8)
    plain = module(x, decode=True)
    module.init_cache(B, 8)
    np.testing.assert_array_equal(module(x, decode=True, is_causal=True), plain)  # one code path for blocks
    with pytest.raises(ValueError, match=r"is_causal must be True or left out when decoding"):
        module(x, decode=True, is_causal=False)


def test_module_positions_move_rope_and_lengths_outside_decoding_is_refused():
    """`positions=` used to be read only when decoding (silently ignored otherwise), and
    `lengths=` outside decoding was ignored; `rope=` is a keyword like the other settings."""
    rope = mj.RoPE(theta=50.0)
    module = mnnx.MultiHeadAttention(D, H, head_dim=Dh, rope=rope, rngs=nnx.Rngs(0))
    same = mnnx.MultiHeadAttention(D, H, head_dim=Dh, options=mj.Options(rope=rope), rngs=nnx.Rngs(0))
    x = normal(42, (B, Lq, D))
    positions = jnp.array([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(module(x), same(x))
    moved = module(x, is_causal=True, positions=positions)
    expected = mj.batched_attention(
        module.params, x, num_heads=H, is_causal=True, rope=rope, positions=positions
    )
    np.testing.assert_allclose(moved, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(moved, module(x, is_causal=True))
    linen = mlinen.MultiHeadAttention(H, head_dim=Dh, rope=rope)
    variables = {"params": {k: v for k, v in module.params._asdict().items() if v is not None}}
    np.testing.assert_allclose(
        linen.apply(variables, x, is_causal=True, positions=positions), moved, rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"lengths must be left out unless decoding"):
        module(x, lengths=jnp.array([5, 5]))
    with pytest.raises(ValueError, match=r"positions must come with options.rope"):
        mnnx.MultiHeadAttention(D, H, head_dim=Dh, rngs=nnx.Rngs(0))(x, positions=positions)
