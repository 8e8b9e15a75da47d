"""QK-norm (`mha_jax.qk_norm`): RMSNorm over each head's Dh features,
against a float64 NumPy spec, constants pinned from HF transformers' Gemma 3
and Qwen3 norms (Gemma's `1 + w`), its properties, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mha_jax.decoding import qk_norm, rms_norm

L, H, Dh = 5, 3, 8
qk_norm_jit = jax.jit(qk_norm, static_argnames=("eps", "scale_plus_one"))


def rand(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def rms_norm_np(x, scale, eps=1e-6):
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:-1]):  # one feature vector at a time
        mean_square = sum(v * v for v in x[index]) / x.shape[-1]
        out[index] = x[index] / np.sqrt(mean_square + eps) * np.asarray(scale, np.float64)
    return out


# ---------------------------------------------------------------------------
# Pinned from HF transformers. Made by torch 2.13.0+cpu, transformers 4.57.1,
# numpy 2.4.6 (the test needs no torch):
#
#   import numpy as np, torch
#   from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
#   from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
#   rng = np.random.default_rng(1)
#   X = (np.round(rng.normal(size=(2, 3, 8)) * 8) / 8).astype(np.float32)  # exact in bf16
#   W = np.round(rng.normal(size=8) * 0.5, 2).astype(np.float32)
#   with torch.no_grad():
#       gemma, qwen = Gemma3RMSNorm(8, eps=1e-6), Qwen3RMSNorm(8, eps=1e-6)
#       gemma.weight.copy_(torch.tensor(W)); qwen.weight.copy_(torch.tensor(W))
#       GEMMA3_OUT = gemma(torch.tensor(X))  # float32: x * rsqrt(mean(x²) + eps) * (1 + w)
#       QWEN3_OUT = qwen(torch.tensor(X))    # float32: x * rsqrt(mean(x²) + eps) * w
#       GEMMA3_OUT_BF16 = gemma.to(torch.bfloat16)(torch.tensor(X).to(torch.bfloat16)).float()
#
# Arrays are printed as the shortest float32 reprs.

X = np.array(
    [
        [0.375, 0.875, 0.375, -1.25, 0.875, 0.5, -0.5, 0.625],
        [0.375, 0.25, 0.0, 0.5, -0.75, -0.125, -0.5, 0.625],
        [0.0, -0.25, -0.75, -0.25, 0.0, -0.25, 1.25, 1.0],
        [-2.75, -1.875, -0.125, -0.375, 0.25, 0.25, 2.125, -1.125],
        [-0.375, 2.0, 0.625, 0.625, -0.5, -1.625, 0.125, 0.125],
        [-1.25, -0.625, -0.125, -1.0, -0.125, 0.125, 0.0, -0.5],
    ],
    np.float32,
).reshape(2, 3, 8)
W = np.array(
    [
        [0.3, 0.45, 0.16, -0.41, 0.37, -0.25, 0.44, -0.54],
    ],
    np.float32,
).reshape(
    8,
)
GEMMA3_OUT = np.array(
    [
        [0.6676177, 1.737518, 0.5957204, -1.0099859, 1.6416548, 0.51355207, -0.9860201, 0.39372328],
        [1.0663915, 0.7929578, 0.0, 0.6453036, -2.247625, -0.2050753, -1.5749782, 0.6288975],
        [0.0, -0.56334513, -1.3520283, -0.22922319, 0.0, -0.2913854, 2.7972999, 0.71486545],
        [-2.4423485, -1.8573804, -0.09906028, -0.15115234, 0.23398723, 0.1280952, 2.0905137, -0.35354272],
        [-0.49233133, 2.9287405, 0.73218507, 0.37240452, -0.6917887, -1.2308283, 0.18178388, 0.058069848],
        [-2.5495067, -1.4218403, -0.22749443, -0.9256671, -0.26867878, 0.14708692, 0.0, -0.36085322],
    ],
    np.float32,
).reshape(2, 3, 8)
QWEN3_OUT = np.array(
    [
        [0.15406562, 0.5392297, 0.082168326, 0.7018545, 0.44336665, -0.17118403, -0.3012839, -0.46219692],
        [0.24609037, 0.24609034, 0.0, -0.44843128, -0.6070229, 0.06835843, -0.48124334, -0.73827106],
        [0.0, -0.17483123, -0.18648666, 0.15929069, 0.0, 0.097128466, 0.8547305, -0.83919],
        [-0.5636189, -0.57642835, -0.0136634875, 0.10503806, 0.06319363, -0.0426984, 0.638768, 0.41502842],
        [-0.113614924, 0.9089194, 0.10099105, -0.25878957, -0.18683344, 0.41027611, 0.055545077, -0.06816896],
        [-0.58834773, -0.44126076, -0.03137854, 0.6432601, -0.07256288, -0.049028974, 0.0, 0.42361036],
    ],
    np.float32,
).reshape(2, 3, 8)
GEMMA3_OUT_BF16 = np.array(
    [
        [0.66796875, 1.734375, 0.59765625, -1.0078125, 1.640625, 0.51171875, -0.984375, 0.39453125],
        [1.0703125, 0.79296875, 0.0, 0.64453125, -2.25, -0.20507812, -1.578125, 0.62890625],
        [0.0, -0.5625, -1.3515625, -0.22949219, 0.0, -0.29101562, 2.796875, 0.71484375],
        [-2.4375, -1.859375, -0.099121094, -0.15136719, 0.23339844, 0.12792969, 2.09375, -0.35351562],
        [-0.4921875, 2.921875, 0.73046875, 0.37304688, -0.69140625, -1.234375, 0.18164062, 0.05810547],
        [-2.546875, -1.421875, -0.22753906, -0.92578125, -0.26757812, 0.14746094, 0.0, -0.36132812],
    ],
    np.float32,
).reshape(2, 3, 8)


def test_pinned_hf_gemma3_norm_applies_one_plus_w():
    np.testing.assert_allclose(qk_norm_jit(X, W, scale_plus_one=True), GEMMA3_OUT, rtol=1e-6, atol=1e-6)


def test_pinned_hf_gemma3_norm_bfloat16_rounds_once():
    # Gemma3RMSNorm multiplies by (1 + w) in float32 and casts once, as we do:
    # the same bf16 numbers, bit for bit.
    out = qk_norm_jit(jnp.asarray(X, jnp.bfloat16), jnp.asarray(W, jnp.bfloat16), scale_plus_one=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), GEMMA3_OUT_BF16)


def test_pinned_hf_qwen3_norm():
    np.testing.assert_allclose(qk_norm_jit(X, W), QWEN3_OUT, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------


def test_matches_numpy_spec():
    x, scale = rand(0, (L, H, Dh)), rand(1, (Dh,))
    out = qk_norm_jit(x, scale)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(out, rms_norm_np(x, scale), rtol=1e-5, atol=1e-6)


def test_gemma_flag_equals_converted_weights():
    x, w = rand(2, (L, H, Dh)), rand(3, (Dh,))
    np.testing.assert_array_equal(qk_norm_jit(x, w, scale_plus_one=True), qk_norm_jit(x, 1 + w))


def test_each_head_is_normalised_on_its_own():
    x, scale = rand(4, (L, H, Dh)), rand(5, (Dh,))
    x[:, 1] *= 1000.0  # one loud head changes nothing for the others
    out = qk_norm_jit(x, scale)
    np.testing.assert_allclose(out, rms_norm_np(x, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qk_norm_jit(x * 3.0, scale), out, rtol=1e-5, atol=1e-6)  # scale-free
    # OLMo 2's norm instead spans all heads: rms_norm on [L, H*Dh] with a [H*Dh] scale.
    flat = jax.jit(rms_norm)(x.reshape(L, H * Dh), np.tile(scale, H))
    np.testing.assert_allclose(
        flat, rms_norm_np(x.reshape(L, H * Dh), np.tile(scale, H)), rtol=1e-5, atol=1e-6
    )


def test_zero_vector_gives_zeros_and_finite_gradients():
    x, scale = rand(6, (L, H, Dh)), rand(7, (Dh,))
    x[2, 0] = 0.0
    out = qk_norm_jit(x, scale)
    np.testing.assert_array_equal(out[2, 0], 0.0)
    grads = jax.jit(jax.grad(lambda x, s: jnp.sum(qk_norm(x, s) ** 2), argnums=(0, 1)))(x, scale)
    assert all(np.isfinite(g).all() for g in grads)


def test_vmap_over_batch():
    x, scale = rand(8, (2, L, H, Dh)), rand(9, (Dh,))
    out = jax.jit(jax.vmap(qk_norm, in_axes=(0, None)))(x, scale)
    np.testing.assert_allclose(out, rms_norm_np(x, scale), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Bad input: (id, call, exception, message regex)

XS, SCALE = np.ones((L, H, Dh), np.float32), np.ones(Dh, np.float32)

TABLE = [
    (
        "x_rank",
        lambda: qk_norm(XS[:, 0], SCALE),
        ValueError,
        r"x must have rank 3 \[L, H, Dh\]; got shape \(5, 8\)",
    ),
    (
        "scale_shape",
        lambda: qk_norm(XS, np.ones(H * Dh, np.float32)),
        ValueError,
        r"scale must have shape \[Dh\]=\(8,\); got shape \(24,\)",
    ),
    (
        "rms_norm_scale_shape",
        lambda: rms_norm(XS, np.ones(H, np.float32)),
        ValueError,
        r"scale must have shape \[F\] \(x.shape\[-1\]\)=\(8,\); got shape \(3,\)",
    ),
    (
        "x_integer",
        lambda: qk_norm(XS.astype(np.int32), SCALE),
        TypeError,
        r"x must have a floating dtype; got int32",
    ),
    (
        "scale_integer",
        lambda: qk_norm(XS, SCALE.astype(np.int32)),
        TypeError,
        r"scale must have a floating dtype; got int32",
    ),
    (
        "eps_zero",
        lambda: qk_norm(XS, SCALE, eps=0.0),
        ValueError,
        r"eps must be a positive finite number; got 0.0",
    ),
    # Under the test run's jaxtyping hook the `bool` annotation rejects it first (also a
    # TypeError naming the argument); without the hook our own check does.
    (
        "scale_plus_one_not_bool",
        lambda: qk_norm(XS, SCALE, scale_plus_one="yes"),
        TypeError,
        r"scale_plus_one",
    ),
]


@pytest.mark.parametrize(
    "call, exception, message", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_bad_input_raises(call, exception, message):
    with pytest.raises(exception, match=message):
        call()
