"""Attention sinks (gpt-oss): head h's learned logit `sinks[h]` joins every row's softmax as
one more term of the denominator, with no value.

Against the float64 spec (`tests.reference.core_np`, written from that sentence): the
reference and blockwise kernels forward on hypothesis-drawn problems (GQA, every mask rule,
masks, biases, soft-capping, several blocks), the blockwise gradients against the reference
kernel's and `d sinks` against the spec's central differences; a row that sees no key gives
zeros; the layer, the modules and the weight layouts carry `sinks`; a gpt-oss attention
layer of HF transformers 4.57.1 (random weights, sliding and full layers, GQA, padding)
gives our numbers. Decoding with sinks is in tests/test_decoding.py, the mesh strategies
in tests/test_parallel.py, bad input in tests/test_errors.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import masking_utils
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

import mha_jax as mj
import mha_jax.linen as mlinen
import mha_jax.nnx as mnnx
from mha_jax import kernels
from mha_jax.interop import export_params, import_params
from mha_jax.masks import Structure
from tests.reference import attention_np, core_np, normal
from tests.test_implementations import SCALE, problems


def core(name, q, k, v, sinks, p, bias=None):
    """Kernel `name` through `kernels.attend` (blockwise with the problem's block sizes)."""
    if name == "blockwise":
        return mj.blockwise_attention(q, k, v, mask=p["mask"], bias=bias, structure=p["structure"],
                                      softcap=p["softcap"], block_sizes=p["blocks"], sinks=sinks)  # fmt: skip
    options = mj.Options(softcap=p["softcap"], implementation=name)
    return kernels.attend(q, k, v, mask=p["mask"], bias=bias, structure=p["structure"], options=options,
                          rng=None, return_weights=False, sinks=sinks)[0]  # fmt: skip


def spec(p, sinks, q=None):
    rules = p["structure"]
    heads, _ = core_np(
        p["q"] if q is None else q, p["k"], p["v"], mask=p["mask"], bias=p["bias"],
        is_causal=rules.is_causal, q_offset=rules.q_offset, kv_length=rules.kv_length,
        window=rules.window, softcap=p["softcap"], sinks=np.asarray(sinks, np.float64),
    )  # fmt: skip
    return heads


def drawn_sinks(p, spread):
    """Sinks from well below to well above the scores: each shifts the rows visibly."""
    heads = p["q"].shape[1]
    return jnp.linspace(-spread, spread, heads) + normal(3, (heads,))


@settings(max_examples=int(12 * SCALE))
@given(problems(), st.sampled_from([0.5, 4.0]))
def test_kernels_with_sinks_equal_the_float64_spec(p, spread):
    sinks = drawn_sinks(p, spread)
    expected = spec(p, sinks)
    for name in ("reference", "blockwise"):
        got = jax.jit(functools.partial(core, name, p=p, bias=p["bias"]))(p["q"], p["k"], p["v"], sinks)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=name)


@settings(max_examples=int(6 * SCALE))
@given(problems())
def test_blockwise_gradients_with_sinks_equal_the_reference_and_the_spec(p):
    """dq, dk, dv, d bias and d sinks of blockwise equal the reference kernel's (autodiff of
    the formula); d sinks equals central differences of the float64 spec."""
    sinks = drawn_sinks(p, 2.0)
    cotangent = p["cotangent"]
    args = (p["q"], p["k"], p["v"], sinks) + (() if p["bias"] is None else (p["bias"],))

    def loss(name):
        return lambda q, k, v, sinks, bias=None: jnp.sum(core(name, q, k, v, sinks, p, bias) * cotangent)

    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss("blockwise"), argnums=argnums))(*args)
    want = jax.grad(loss("reference"), argnums=argnums)(*args)
    for name, a, b in zip(("dq", "dk", "dv", "d sinks", "d bias"), got, want, strict=False):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)

    step, c = 1e-5, np.asarray(cotangent, np.float64)
    base = np.asarray(sinks, np.float64)
    numeric = [
        (np.sum(spec(p, base + step * e) * c) - np.sum(spec(p, base - step * e) * c)) / (2 * step)
        for e in np.eye(len(base))
    ]
    np.testing.assert_allclose(got[3], numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["reference", "blockwise", "scan"])
def test_a_row_that_sees_no_key_is_zero_with_zero_gradients(name):
    """The sink takes all the mass of a row with no visible key: zero heads, and nothing
    flows back to the sink from that row (d sinks = -p_sink·rowsum(dO·O) = 0 for O = 0)."""
    q, k, v = normal(0, (6, 4, 8)), normal(1, (9, 2, 8)), normal(2, (9, 2, 8))
    sinks = jnp.array([0.0, 1.0, -1.0, 3.0])
    rules = Structure(is_causal=True, q_offset=-3)  # rows 0-2 sit before every key

    def heads(q, k, v, sinks):
        if name == "scan":
            batch = lambda a: jnp.broadcast_to(jnp.asarray(a), (1,))
            batched = Structure(is_causal=True, q_offset=batch(-3), kv_length=batch(9))
            return kernels.attend_batch(q[None], k[None], v[None], structure=batched, sinks=sinks,
                                        options=mj.Options(implementation="scan"))[0]  # fmt: skip
        return kernels.attend(q, k, v, mask=None, bias=None, structure=rules, sinks=sinks, rng=None,
                              options=mj.Options(implementation=name), return_weights=False)[0]  # fmt: skip

    out = jax.jit(heads)(q, k, v, sinks)
    np.testing.assert_array_equal(out[:3], 0.0)
    assert float(jnp.abs(out[3:]).min()) > 0
    if name != "scan":  # the decode kernel has no VJP of its own (nothing trains through it)
        grads = jax.grad(lambda *a: jnp.sum(heads(*a)[:3] ** 2 + 1.0), argnums=(0, 3))(q, k, v, sinks)
        np.testing.assert_array_equal(grads[0], 0.0)
        np.testing.assert_array_equal(grads[1], 0.0)


@pytest.mark.parametrize("implementation", ["reference", "blockwise", "auto"])
def test_the_layer_with_sinks_equals_the_spec(implementation):
    """`batched_attention` with `params.sinks`: GQA, causal, a window, ragged padding."""
    params = mj.init_params(jax.random.PRNGKey(0), 24, 6, num_kv_heads=2, sinks=True)
    np.testing.assert_array_equal(params.sinks, jnp.zeros(6))  # a sink starts as a key scoring 0
    params = params._replace(sinks=jnp.linspace(-2.0, 3.0, 6), b_k=normal(4, (8,)))
    x = normal(5, (2, 13, 24))
    lengths = jnp.array([13, 7])
    got = mj.batched_attention(params, x, num_heads=6, is_causal=True, window=(4, 0), kv_length=lengths,
                               implementation=implementation)  # fmt: skip
    for b in range(2):
        want, _ = attention_np(params, x[b], num_heads=6, is_causal=True, window=(4, 0), kv_length=lengths[b])
        np.testing.assert_allclose(got[b], want, rtol=2e-5, atol=2e-5)


def test_modules_create_train_and_load_sinks():
    """`sinks=True` on both modules: a `[H]` parameter at 0, the functional call's numbers, a
    gradient; weights move between the NNX module, the linen module and `MHAParams`."""
    x = normal(6, (2, 9, 16))
    layer = mnnx.MultiHeadAttention(16, 4, num_kv_heads=2, sinks=True, rngs=nnx.Rngs(0))
    assert layer.params.sinks.shape == (4,)
    params = layer.params._replace(sinks=jnp.array([-1.0, 0.0, 1.0, 2.5]))
    layer.load_params(params)
    want = mj.batched_attention(params, x, num_heads=4, is_causal=True)
    np.testing.assert_allclose(layer(x, is_causal=True), want, rtol=1e-6, atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(layer)
    assert float(jnp.abs(grads["sinks"][...]).min()) > 0

    module = mlinen.MultiHeadAttention(4, num_kv_heads=2, sinks=True)
    variables = module.init(jax.random.PRNGKey(0), x)
    assert variables["params"]["sinks"].shape == (4,)
    variables = {"params": {k: v for k, v in params._asdict().items() if v is not None}}
    np.testing.assert_allclose(module.apply(variables, x, is_causal=True), want, rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="sinks"):  # a module without sinks cannot take them
        mnnx.MultiHeadAttention(16, 4, num_kv_heads=2, rngs=nnx.Rngs(0)).load_params(params)


def test_the_llama_layout_carries_sinks_and_others_refuse_them():
    params = mj.init_params(jax.random.PRNGKey(1), 16, 4, num_kv_heads=2, sinks=True)
    params = params._replace(sinks=jnp.array([0.5, -0.5, 1.0, 2.0]))
    tensors = export_params("llama", params, num_heads=4)
    np.testing.assert_array_equal(tensors["sinks"], params.sinks)
    back = import_params("llama", tensors, num_heads=4, num_kv_heads=2)
    for name, a, b in zip(params._fields, back, params, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert import_params("llama", {k: v for k, v in tensors.items() if k != "sinks"}, num_heads=4,
                         num_kv_heads=2).sinks is None  # fmt: skip
    with pytest.raises(ValueError, match="params.sinks must be None for layout 'bert'"):
        export_params("bert", params._replace(w_k=params.w_q, b_k=params.b_q, w_v=params.w_q,
                                              b_v=params.b_q), num_heads=4)  # fmt: skip


# ---------------------------------------------------------------------------
# gpt-oss against HF transformers 4.57.1 (a tiny random-weight config built here)

D, H, HKV, DH, WINDOW = 24, 6, 2, 4, 4


def gpt_oss_config():
    config = transformers.GptOssConfig(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV, head_dim=DH, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW, rope_theta=500.0,
        rope_scaling=None, attention_bias=True,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return config


@pytest.mark.parametrize("layer_index", [0, 1], ids=["sliding", "full"])
def test_gpt_oss_attention_layer_matches_transformers(layer_index):
    """Two rows of 11 tokens, the second padded after 7 (`attention_mask` 0): transformers'
    own masks (`create_sliding_window_causal_mask`, `create_causal_mask`), its RoPE (half
    layout), its eager attention with sinks; ours from `Structure` and `params.sinks`."""
    config, length = gpt_oss_config(), 11
    layer = GptOssAttention(config, layer_idx=layer_index)
    generator = torch.Generator().manual_seed(layer_index)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(generator=generator)
        layer.sinks.mul_(3.0)  # sinks comparable to the scores: the mass they take is visible
    layer.eval()
    x = np.random.default_rng(layer_index).standard_normal((2, length, D), dtype=np.float32)
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, 7:] = 0
    make_mask = (masking_utils.create_sliding_window_causal_mask if layer_index == 0
                 else masking_utils.create_causal_mask)  # fmt: skip
    theirs_mask = make_mask(
        config=config, input_embeds=torch.from_numpy(x), attention_mask=padding,
        cache_position=torch.arange(length), past_key_values=None, position_ids=None,
    )  # fmt: skip
    positions = torch.arange(length)[None].expand(2, -1)
    with torch.no_grad():
        cos_sin = GptOssRotaryEmbedding(config)(torch.from_numpy(x), positions)
        theirs = layer(torch.from_numpy(x), cos_sin, theirs_mask)[0].numpy()

    window = (WINDOW - 1, 0) if layer_index == 0 else None  # HF: key j visible when i - j < W
    lengths = jnp.array([length, 7])
    visible = (
        (theirs_mask == 0)[:, 0].numpy() if theirs_mask.dtype != torch.bool else theirs_mask[:, 0].numpy()
    )
    for b in range(2):
        rules = Structure(is_causal=True, window=window, kv_length=lengths[b])
        np.testing.assert_array_equal(visible[b], rules.allows(jnp.arange(length), jnp.arange(length)))
    params = import_params("llama", layer.state_dict(), num_heads=H, num_kv_heads=HKV)
    assert params.sinks is not None
    for implementation in ("reference", "blockwise"):
        ours = mj.batched_attention(params, x, num_heads=H, is_causal=True, window=window, kv_length=lengths,
                                    rope=mj.RoPE(theta=500.0), implementation=implementation)  # fmt: skip
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
