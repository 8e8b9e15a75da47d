"""RoPE context extension beyond linear and Llama 3: YaRN and dynamic NTK (`mha_jax.rope`).

Against a float64 NumPy spec written from the methods' definitions (pair by pair: how
often a pair turns over the original context decides whether it keeps its frequency,
is interpolated, or blends; dynamic NTK raises the base with the sequence length),
against transformers 4.57.1's own `ROPE_INIT_FUNCTIONS`, through `scaling_from_hf`, and
in a Qwen3 attention layer of transformers (random weights, QK-norm, GQA, padding) at
positions past the original context: yarn uncached, dynamic uncached and decoding token
by token against HF's cache, whose keys keep the frequencies of the step that wrote them.
The mesh's dynamic case (the whole sequence's length, not a device's) is in
tests/test_parallel.py; bad input in tests/test_errors.py.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

import mha_jax as mj
from mha_jax.decoding import (
    DynamicNTKScaling,
    RoPE,
    YarnScaling,
    apply_rope,
    cached_attention,
    init_cache,
    inverse_frequencies,
    scaling_from_hf,
)
from mha_jax.interop import import_params

# ---------------------------------------------------------------------------
# The spec: float64, one pair of features at a time.


def yarn_np(theta, rotary_dim, s):
    """(inverse frequencies, attention factor). Pair i turns `context · f_i / 2π` times over
    the original context: more than beta_fast turns, it keeps f_i; fewer than beta_slow, it
    takes f_i / factor; between, a straight line in i from the index where it turns
    beta_fast times to the one where it turns beta_slow times (rounded outwards with
    `truncate`)."""
    context = s.original_max_position_embeddings

    def index_turning(turns):  # solve context · theta^(-2i/R) / 2π = turns for i
        return rotary_dim / 2 * math.log(context / (2 * math.pi * turns)) / math.log(theta)

    start, stop = index_turning(s.beta_fast), index_turning(s.beta_slow)
    if s.truncate:
        start, stop = math.floor(start), math.ceil(stop)
    start, stop = max(start, 0), min(stop, rotary_dim - 1)
    if start == stop:  # the definition's guard against a zero-width line (a band of one index)
        stop += 0.001
    freqs = []
    for i in range(rotary_dim // 2):
        freq = theta ** (-2.0 * i / rotary_dim)
        weight = min(max((i - start) / (stop - start), 0.0), 1.0)  # 0: keep, 1: interpolate
        freqs.append((1 - weight) * freq + weight * freq / s.factor)
    if s.attention_factor is not None:
        factor = s.attention_factor
    else:
        mscale = lambda m: 0.1 * m * math.log(s.factor) + 1 if s.factor > 1 else 1.0
        factor = mscale(s.mscale) / mscale(s.mscale_all_dim) if s.mscale and s.mscale_all_dim else mscale(1)
    return np.array(freqs), factor


def dynamic_np(theta, rotary_dim, s, length):
    """NTK-aware: the base grows so the longest wave stretches over `length` positions."""
    grown = max(length, s.original_max_position_embeddings) / s.original_max_position_embeddings
    base = theta * (s.factor * grown - (s.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return np.array([base ** (-2.0 * i / rotary_dim) for i in range(rotary_dim // 2)])


def rope_np(x, positions, freqs, factor=1.0):  # "half" layout; features past 2·len(freqs) pass through
    x = np.asarray(x, np.float64)
    out, half = x.copy(), len(freqs)
    for t, h, i in np.ndindex(x.shape[0], x.shape[1], half):
        angle = positions[t] * freqs[i]
        c, s = factor * math.cos(angle), factor * math.sin(angle)
        out[t, h, i] = x[t, h, i] * c - x[t, h, i + half] * s
        out[t, h, i + half] = x[t, h, i + half] * c + x[t, h, i] * s
    return out


YARNS = {
    "qwen3": YarnScaling(factor=4.0, original_max_position_embeddings=32),
    "deepseek mscale": YarnScaling(
        factor=40.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.707
    ),
    "untruncated, given factor": YarnScaling(
        factor=8.0,
        original_max_position_embeddings=128,
        beta_fast=16.0,
        beta_slow=2.0,
        attention_factor=1.25,
        truncate=False,
    ),  # fmt: skip
    "no blend band": YarnScaling(
        factor=2.0, original_max_position_embeddings=8, beta_fast=4.0, beta_slow=4.0
    ),
}


@pytest.mark.parametrize("name", YARNS)
@pytest.mark.parametrize("theta, rotary_dim", [(1e4, 16), (5e5, 64), (100.0, 6)])
def test_yarn_frequencies_and_factor_equal_the_spec_and_transformers(name, theta, rotary_dim):
    scaling = YARNS[name]
    freqs, factor = yarn_np(theta, rotary_dim, scaling)
    ours = inverse_frequencies(RoPE(theta=theta, scaling=scaling), rotary_dim)
    np.testing.assert_allclose(ours, freqs, rtol=1e-6)  # float64 inside, rounded once
    assert scaling.cos_sin_factor == pytest.approx(factor, rel=1e-12)
    ratio = freqs / (theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim))
    assert np.all((ratio > 1 / scaling.factor - 1e-9) & (ratio < 1 + 1e-9))  # between the two
    if name != "no blend band":  # (a degenerate band: at theta 5e5 every pair keeps its frequency)
        assert ratio.max() == pytest.approx(1.0)  # short waves keep theirs
        assert ratio.min() == pytest.approx(1 / scaling.factor)  # long waves interpolate

    hf = {k: v for k, v in dataclass_items(scaling)}
    config = transformers.Qwen3Config(
        hidden_size=4 * rotary_dim, num_attention_heads=4, head_dim=rotary_dim, rope_theta=theta,
        max_position_embeddings=1000, rope_scaling=dict(rope_type="yarn", **hf),
    )  # fmt: skip
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-6)  # theirs: float32 powers
    assert their_factor == pytest.approx(scaling.cos_sin_factor, rel=1e-7)
    assert scaling_from_hf(config.rope_scaling, config.max_position_embeddings) == scaling


def dataclass_items(scaling):
    return [(k, v) for k, v in vars(scaling).items() if v is not None]


@pytest.mark.parametrize("length", [1, 20, 32, 33, 100, 5000])
@pytest.mark.parametrize("rotary_dim", [4, 16])
def test_dynamic_frequencies_follow_the_length_as_the_spec_and_transformers(length, rotary_dim):
    scaling = DynamicNTKScaling(factor=3.0, original_max_position_embeddings=32)
    rope = RoPE(theta=1e4, scaling=scaling)
    ours = jax.jit(lambda n: inverse_frequencies(rope, rotary_dim, n))(length)  # traced length
    np.testing.assert_allclose(ours, dynamic_np(1e4, rotary_dim, scaling, length), rtol=2e-6)
    if length <= 32:  # within the original context: the plain frequencies
        np.testing.assert_allclose(ours, inverse_frequencies(RoPE(theta=1e4), rotary_dim), rtol=1e-6)
    config = transformers.Qwen3Config(
        hidden_size=4 * rotary_dim, num_attention_heads=4, head_dim=rotary_dim, rope_theta=1e4,
        max_position_embeddings=32, rope_scaling=dict(rope_type="dynamic", factor=3.0),
    )  # fmt: skip
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=torch.tensor(length))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5)
    assert scaling_from_hf(config.rope_scaling, config.max_position_embeddings) == scaling


def test_apply_rope_scales_the_rotated_features_and_reads_the_length():
    rng = np.random.default_rng(0)
    x, positions = rng.standard_normal((9, 2, 12)).astype(np.float32), rng.integers(0, 300, 9)
    yarn = RoPE(theta=1e4, rotary_dim=8, scaling=YARNS["qwen3"])
    freqs, factor = yarn_np(1e4, 8, YARNS["qwen3"])
    got = jax.jit(apply_rope, static_argnames="rope")(x, positions, rope=yarn)
    np.testing.assert_allclose(got, rope_np(x, positions, freqs, factor), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(got[..., 8:], x[..., 8:])  # the unrotated tail: not scaled

    dynamic = RoPE(theta=1e4, scaling=DynamicNTKScaling(2.0, 32))
    own = dynamic_np(1e4, 12, dynamic.scaling, positions.max() + 1)  # default: max(positions) + 1
    np.testing.assert_allclose(apply_rope(x, positions, dynamic), rope_np(x, positions, own), atol=2e-5)
    longer = dynamic_np(1e4, 12, dynamic.scaling, 1000)
    np.testing.assert_allclose(apply_rope(x, positions, dynamic, length=1000), rope_np(x, positions, longer),
                               atol=2e-5)  # fmt: skip


def test_scaling_from_hf_reads_yarn_and_dynamic_configs():
    qwen3 = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}
    assert scaling_from_hf(qwen3) == YarnScaling(4.0, 32768)
    # Without the key, yarn's original context is the config's max_position_embeddings, as in HF.
    assert scaling_from_hf({"rope_type": "yarn", "factor": 2.0}, 4096) == YarnScaling(2.0, 4096)
    deepseek = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                "attention_factor": None}  # fmt: skip
    assert scaling_from_hf(deepseek) == YarnScaling(40.0, 4096, mscale=1.0, mscale_all_dim=1.0)
    assert scaling_from_hf({"rope_type": "dynamic", "factor": 2}, 2048) == DynamicNTKScaling(2.0, 2048)
    for rope_scaling in ({"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 2.0}):
        with pytest.raises(ValueError, match="max_position_embeddings must be given for rope_type"):
            scaling_from_hf(rope_scaling)
    with pytest.raises(ValueError, match=r"have the keys \['factor'"):
        scaling_from_hf({"rope_type": "yarn", "original_max_position_embeddings": 8})


# ---------------------------------------------------------------------------
# A Qwen3 attention layer of transformers 4.57.1

D, H, HKV, DH = 32, 4, 2, 8


def qwen3_layer(rope_scaling, max_positions):
    config = transformers.Qwen3Config(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV, head_dim=DH, num_hidden_layers=1,
        rope_theta=100.0, max_position_embeddings=max_positions, rope_scaling=rope_scaling,
    )  # fmt: skip
    config._attn_implementation = "eager"
    layer = Qwen3Attention(config, layer_idx=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(generator=generator)
    layer.eval()
    state = {k: v for k, v in layer.state_dict().items() if "norm" not in k}
    params = import_params("llama", state, num_heads=H, num_kv_heads=HKV)
    norms = {name: getattr(layer, name).weight.detach().numpy() for name in ("q_norm", "k_norm")}
    params = params._replace(**norms)
    rope = RoPE(theta=100.0, scaling=scaling_from_hf(rope_scaling, max_positions))
    return config, layer, params, mj.Options(rope=rope, qk_norm_eps=config.rms_norm_eps)


def causal_additive(length, lengths):  # HF's eager mask: 0 where visible, the dtype's min elsewhere
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    visible = (j <= i)[None] & (j[None] < np.asarray(lengths)[:, None, None])
    return torch.from_numpy(np.where(visible, 0.0, np.finfo(np.float32).min)[:, None].astype(np.float32))


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 12},
        {"rope_type": "dynamic", "factor": 4.0},
    ],
    ids=["yarn", "dynamic"],
)
def test_qwen3_attention_layer_past_the_original_context_matches_transformers(rope_scaling):
    """Two rows of 40 tokens (the original context: 12), the second padded after 29."""
    config, layer, params, options = qwen3_layer(rope_scaling, max_positions=12)
    length, lengths = 40, [40, 29]
    x = np.random.default_rng(1).standard_normal((2, length, D), dtype=np.float32)
    positions = torch.arange(length)[None].expand(2, -1)
    with torch.no_grad():
        cos_sin = Qwen3RotaryEmbedding(config)(torch.from_numpy(x), positions)
        theirs = layer(torch.from_numpy(x), cos_sin, causal_additive(length, lengths))[0].numpy()
    for implementation in ("reference", "blockwise"):
        ours = np.asarray(mj.batched_attention(
            params, x, num_heads=H, is_causal=True, kv_length=jnp.array(lengths),
            options=dataclasses.replace(options, implementation=implementation),
        ))  # fmt: skip
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
        np.testing.assert_allclose(ours[1, :29], theirs[1, :29], rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    plain_rope = dataclasses.replace(options, rope=RoPE(theta=100.0))
    plain = mj.batched_attention(params, x, num_heads=H, is_causal=True, kv_length=jnp.array(lengths),
                                 options=plain_rope)  # fmt: skip
    assert (
        np.abs(np.asarray(plain)[0] - theirs[0]).max() > 1e-2 * np.abs(theirs).max()
    )  # the scaling mattered


def test_qwen3_dynamic_decoding_token_by_token_matches_transformers_cache():
    """Prefill 6 tokens, then 14 one at a time past the original context of 8: HF's rotary
    embedding grows its frequencies with each step's length and its cache keeps each key as it
    was rotated then; our cache does the same."""
    rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    config, layer, params, options = qwen3_layer(rope_scaling, max_positions=8)
    prefill, total = 6, 20
    x = np.random.default_rng(2).standard_normal((1, total, D), dtype=np.float32)
    rotary, hf_cache = Qwen3RotaryEmbedding(config), transformers.DynamicCache()
    cache = init_cache(1, total, HKV, DH)
    step = jax.jit(lambda x, cache: cached_attention(params, x, cache, num_heads=H, options=options))
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, total)]:
        chunk = torch.from_numpy(x[:, start:stop])
        positions = torch.arange(start, stop)[None]
        with torch.no_grad():
            cos_sin = rotary(chunk, positions)
            visible = np.arange(stop)[None] <= np.arange(start, stop)[:, None]  # [T, stop]
            mask = torch.from_numpy(np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32))
            theirs = layer(chunk, cos_sin, mask[None, None], past_key_values=hf_cache,
                           cache_position=positions[0])[0].numpy()  # fmt: skip
        ours, cache = step(x[:, start:stop], cache)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(), err_msg=start)
