"""RoPE (`mha_jax.rope`): against a float64 NumPy loop written from the
formulas, against constants pinned from HF transformers, and by its properties
(scores depend on m - n only, the two layouts are one permutation apart,
partial rotary, bf16, gradients = the transposed rotation, bad input)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mha_jax.decoding import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    RoPE,
    YarnScaling,
    apply_rope,
    interleaved_to_half,
    inverse_frequencies,
    scaling_from_hf,
)

L, H, Dh, R = 7, 3, 16, 10  # every axis its own size; R = partial rotary_dim (F = 5 pairs)
LLAMA31 = Llama3Scaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
SCALINGS = {"none": None, "linear": LinearScaling(4.0), "llama3": LLAMA31}
# One compiled program per configuration (RoPE is hashable, so a static argument):
# much faster here than op-by-op dispatch.
rope_jit = jax.jit(apply_rope, static_argnames="rope")


def rand(seed, shape):  # fresh non-zero float32 inputs, made without compiling anything
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------
# The spec: float64 NumPy, one pair of features at a time.


def inverse_frequencies_np(theta, rotary_dim, scaling):
    """Pair i turns at theta^(-2i/R) radians per position, then the scaling's rule."""
    freqs = []
    for i in range(rotary_dim // 2):
        freq = theta ** (-2.0 * i / rotary_dim)
        if isinstance(scaling, LinearScaling):
            freq = freq / scaling.factor
        elif isinstance(scaling, Llama3Scaling):  # Llama 3.1's rule, band by band
            wavelength = 2 * math.pi / freq
            context = scaling.original_max_position_embeddings
            if wavelength > context / scaling.low_freq_factor:  # long waves: interpolate
                freq = freq / scaling.factor
            elif wavelength >= context / scaling.high_freq_factor:  # between: blend
                smooth = (context / wavelength - scaling.low_freq_factor) / (
                    scaling.high_freq_factor - scaling.low_freq_factor
                )
                freq = (1 - smooth) * freq / scaling.factor + smooth * freq
        freqs.append(freq)  # short waves: unchanged
    return np.array(freqs)


def rope_np(x, positions, theta=10000.0, rotary_dim=None, layout="half", scaling=None):
    x = np.asarray(x, np.float64)
    length, num_heads, head_dim = x.shape
    rotary_dim = rotary_dim or head_dim
    freqs = inverse_frequencies_np(theta, rotary_dim, scaling)
    out = x.copy()  # features from rotary_dim on stay as they are
    for t in range(length):
        for h in range(num_heads):
            for i, freq in enumerate(freqs):
                a, b = (i, i + rotary_dim // 2) if layout == "half" else (2 * i, 2 * i + 1)
                angle = positions[t] * freq
                out[t, h, a] = x[t, h, a] * math.cos(angle) - x[t, h, b] * math.sin(angle)
                out[t, h, b] = x[t, h, b] * math.cos(angle) + x[t, h, a] * math.sin(angle)
    return out


# ---------------------------------------------------------------------------
# Against the spec


@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
def test_inverse_frequencies_match_the_formula(scaling):
    for theta, rotary_dim in [(10000.0, 16), (500000.0, 128), (1000000.0, 10)]:
        got = inverse_frequencies(RoPE(theta=theta, scaling=SCALINGS[scaling]), rotary_dim)
        assert got.dtype == jnp.float32 and got.shape == (rotary_dim // 2,)
        np.testing.assert_allclose(
            got, inverse_frequencies_np(theta, rotary_dim, SCALINGS[scaling]), rtol=1e-7
        )


def test_llama3_scaling_touches_all_three_bands():
    # theta 1e4, Dh 16: wavelengths 6 ... 19869; Llama 3.1 keeps those < 2048, divides those > 8192.
    ratio = inverse_frequencies(RoPE(scaling=LLAMA31), Dh) / inverse_frequencies(RoPE(), Dh)
    np.testing.assert_allclose(ratio[:6], 1.0)
    assert 1 / 8 < ratio[6] < 1.0
    np.testing.assert_allclose(ratio[7], 1 / 8)


@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
@pytest.mark.parametrize("rotary_dim", [None, R], ids=["full", "partial"])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_matches_numpy_spec(layout, rotary_dim, scaling):
    x = rand(0, (L, H, Dh))
    positions = np.array([0, 1, 5, -3, 64, 17, 2])  # explicit, unordered, one negative
    rope = RoPE(rotary_dim=rotary_dim, layout=layout, scaling=SCALINGS[scaling])
    out = rope_jit(x, positions, rope=rope)
    assert out.shape == x.shape and out.dtype == x.dtype
    # float32 angles: |error| <= |position| * 2^-24 relative, so ~1e-5 at position 64
    np.testing.assert_allclose(
        out, rope_np(x, positions, 10000.0, rotary_dim, layout, SCALINGS[scaling]), rtol=1e-5, atol=2e-5
    )


# ---------------------------------------------------------------------------
# Pinned from HF transformers. Made by torch 2.13.0+cpu, transformers 4.57.1,
# numpy 2.4.6 with the script below (kept here so the test needs no torch):
#
#   import numpy as np, torch
#   from transformers import LlamaConfig
#   from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
#   from transformers.models.gptj import modeling_gptj
#   from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
#   rng = np.random.default_rng(0)
#   r2 = lambda *shape: np.round(rng.normal(size=shape), 2).astype(np.float32)
#   # HALF: transformers.models.llama.modeling_llama.apply_rotary_pos_emb (rotate_half), theta 1e4
#   q, k, pos = r2(3, 2, 8), r2(3, 1, 8), [-3, 7, 1000]
#   cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, head_dim=8, rope_theta=10000.0)
#   cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.tensor([pos]))
#   q_out, k_out = apply_rotary_pos_emb(torch.tensor(q)[None].transpose(1, 2),
#                                       torch.tensor(k)[None].transpose(1, 2), cos, sin)
#   HALF_Q_OUT, HALF_K_OUT = q_out.transpose(1, 2)[0], k_out.transpose(1, 2)[0]
#   # LLAMA3: ROPE_INIT_FUNCTIONS["llama3"] (_compute_llama3_parameters) with Llama 3.1's factors
#   cfg = LlamaConfig(hidden_size=16, num_attention_heads=1, head_dim=16, rope_theta=500000.0,
#                     max_position_embeddings=131072, rope_scaling={"rope_type": "llama3",
#                     "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
#                     "original_max_position_embeddings": 8192})
#   LLAMA3_INV_FREQ, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
#   x, pos = r2(2, 1, 16), [1, 4099]
#   cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.tensor([pos]))
#   out, _ = apply_rotary_pos_emb(*[torch.tensor(x)[None].transpose(1, 2)] * 2, cos, sin)
#   LLAMA3_OUT = out.transpose(1, 2)[0]
#   # GPTJ: transformers.models.gptj.modeling_gptj (rotate_every_two, interleaved), rotary_dim 4 of 8
#   x, pos, rotary_dim = r2(3, 2, 8), [0, 3, 17], 4
#   table = modeling_gptj.create_sinusoidal_positions(32, rotary_dim)
#   sin, cos = torch.split(table[torch.tensor([pos])], rotary_dim // 2, dim=-1)
#   xt = torch.tensor(x)[None]  # GPT-J's [B, L, H, Dh]
#   GPTJ_OUT = torch.cat([modeling_gptj.apply_rotary_pos_emb(xt[..., :rotary_dim], sin, cos),
#                         xt[..., rotary_dim:]], -1)[0]
#
# Arrays are printed as the shortest float32 reprs, 8 features per line.

HALF_Q = np.array(
    [
        [0.13, -0.13, 0.64, 0.1, -0.54, 0.36, 1.3, 0.95],
        [-0.7, -1.27, -0.62, 0.04, -2.33, -0.22, -1.25, -0.73],
        [-0.54, -0.32, 0.41, 1.04, -0.13, 1.37, -0.67, 0.35],
        [0.9, 0.09, -0.74, -0.92, -0.46, 0.22, -1.01, -0.21],
        [-0.16, 0.54, 0.21, 0.36, -0.65, -0.13, 0.78, 1.49],
        [-1.26, 1.51, 1.35, 0.78, 0.26, -0.31, 1.46, 1.96],
    ],
    np.float32,
).reshape(3, 2, 8)
HALF_K = np.array(
    [
        [1.8, 1.32, 0.36, -1.21, -0.0, 0.66, -1.29, 0.4],
        [0.43, 0.7, -1.18, -0.66, -0.44, -1.17, 1.74, -0.5],
        [0.33, -0.26, 1.58, 1.32, 0.63, -2.2, 0.05, 0.68],
    ],
    np.float32,
).reshape(3, 1, 8)
HALF_POSITIONS = np.array([-3, 7, 1000])
HALF_Q_OUT = np.array(
    [
        [-0.20490383, -0.017806463, 0.67870617, 0.10284955, 0.5162504, 0.3823388, 1.2802179, 0.94969577],
        [0.36418512, -1.2782918, -0.6572154, 0.037809823, 2.4054663, 0.16513664, -1.2308403, -0.7301167],
        [-0.32169896, -1.1273277, 0.45585763, 1.0375245, -0.45278007, 0.84168416, -0.63968265, 0.35727134],
        [0.9807259, -0.07289208, -0.6675455, -0.9185075, 0.24449286, 0.22624487, -1.0592842, -0.2164348],
        [0.44749105, 0.39982468, 0.24813145, -1.0592828, -0.49784708, -0.38553894, -0.76872015, 1.10798],
        [-0.92358625, 1.1451281, -0.3384757, -1.2278472, -0.8956497, -1.0319309, -1.959473, 1.7153399],
    ],
    np.float32,
).reshape(3, 2, 8)
HALF_K_OUT = np.array(
    [
        [-1.7819865, 1.4560876, 0.32114384, -1.2087947, -0.25401598, 0.24043542, -1.3002179, 0.4036282],
        [0.61325204, 1.2891243, -1.2988107, -0.6564839, -0.049212754, -0.44391298, 1.6532062, -0.50460774],
        [-0.33534902, -1.3382074, -1.298532, 0.1409989, 0.6271691, -1.7654464, -0.90150696, 1.4781473],
    ],
    np.float32,
).reshape(3, 1, 8)
LLAMA3_INV_FREQ = np.array(
    [
        [1.0, 0.19392276, 0.03760603, 0.007292665, 0.000524846, 3.4281024e-05, 6.6478697e-06, 1.2891732e-06],
    ],
    np.float32,
).reshape(
    8,
)
LLAMA3_X = np.array(
    [
        [1.0, -0.62, 1.82, -1.32, -0.66, 0.94, 0.05, 2.0],
        [0.19, -0.63, -0.38, -1.09, -1.28, 0.63, 0.58, 1.29],
        [-0.75, 1.69, -0.29, 1.57, -0.43, -0.74, 0.25, 1.03],
        [0.16, -0.59, -1.34, -1.4, 0.5, 0.99, -0.16, -1.07],
    ],
    np.float32,
).reshape(2, 1, 16)
LLAMA3_POSITIONS = np.array([1, 4099])
LLAMA3_OUT = np.array(
    [
        [0.38042286, -0.48697156, 1.8330002, -1.312016, -0.65932816, 0.9399784, 0.049996145, 1.9999983],
        [0.9441284, -0.73767114, -0.31130448, -1.0995973, -1.2803463, 0.63003224, 0.58000034, 1.2900026],
        [0.4216776, -1.7254531, 0.005546868, -1.3238686, -0.18223406, -0.8713616, 0.2542666, 1.0356398],
        [-0.6405373, 0.47645763, 1.3710103, -1.6347085, -0.6337908, 0.8766008, -0.15312903, -1.0645423],
    ],
    np.float32,
).reshape(2, 1, 16)
GPTJ_X = np.array(
    [
        [0.87, -1.28, -0.71, 0.62, -2.25, 0.39, -0.58, 0.11],
        [-0.08, 0.2, 0.69, -0.76, 1.42, 0.73, 0.84, 1.16],
        [0.79, 0.84, 0.08, -1.43, -0.14, -0.77, -1.42, 0.26],
        [-0.57, -1.03, -1.04, 0.27, 0.36, 1.32, -0.01, 1.04],
        [1.4, 1.15, -2.37, 1.23, 0.34, 0.42, 0.37, 0.38],
        [0.32, -0.36, -1.9, -0.11, -0.8, 1.08, -0.29, 0.08],
    ],
    np.float32,
).reshape(3, 2, 8)
GPTJ_POSITIONS = np.array([0, 3, 17])
GPTJ_OUT = np.array(
    [
        [0.87, -1.28, -0.71, 0.62, -2.25, 0.39, -0.58, 0.11],
        [-0.08, 0.2, 0.69, -0.76, 1.42, 0.73, 0.84, 1.16],
        [-0.90063494, -0.72010887, 0.12285757, -1.4269568, -0.14, -0.77, -1.42, 0.26],
        [0.7096493, 0.9392539, -1.0476309, 0.23868322, 0.36, 1.32, -0.01, 1.04],
        [0.72037834, -1.6623943, -2.5439303, 0.8113072, 0.34, 0.42, 0.37, 0.38],
        [-0.43415537, -0.20858836, -1.854001, -0.42986077, -0.8, 1.08, -0.29, 0.08],
    ],
    np.float32,
).reshape(3, 2, 8)


def test_pinned_hf_llama_half_layout():
    rope = RoPE(theta=10000.0, layout="half")
    np.testing.assert_allclose(rope_jit(HALF_Q, HALF_POSITIONS, rope=rope), HALF_Q_OUT, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rope_jit(HALF_K, HALF_POSITIONS, rope=rope), HALF_K_OUT, rtol=1e-5, atol=1e-5)


def test_pinned_hf_llama3_scaling():
    rope = RoPE(theta=500000.0, scaling=LLAMA31)
    np.testing.assert_allclose(inverse_frequencies(rope, 16), LLAMA3_INV_FREQ, rtol=1e-6)  # <= 2 ulp
    out = rope_jit(LLAMA3_X, LLAMA3_POSITIONS, rope=rope)
    np.testing.assert_allclose(out[0], LLAMA3_OUT[0], rtol=1e-5, atol=1e-5)  # position 1
    # Position 4099: HF's float32 `base ** (2i/R)` puts inv_freq[1] one ulp (1.5e-8) from
    # ours (float64, rounded once), which turns the angle by 4099 * 1.5e-8 = 6e-5 rad.
    np.testing.assert_allclose(out[1], LLAMA3_OUT[1], rtol=0, atol=2e-4)
    exact = rope_np(LLAMA3_X, LLAMA3_POSITIONS, 500000.0, None, "half", LLAMA31)
    assert np.abs(out - exact).max() < np.abs(LLAMA3_OUT - exact).max()  # and we are nearer


def test_pinned_hf_gptj_interleaved_partial():
    rope = RoPE(theta=10000.0, rotary_dim=4, layout="interleaved")
    np.testing.assert_allclose(rope_jit(GPTJ_X, GPTJ_POSITIONS, rope=rope), GPTJ_OUT, rtol=1e-6, atol=1e-6)


def test_scaling_from_hf_config():
    llama31 = {
        "rope_type": "llama3",
        "factor": 8,
        "low_freq_factor": 1,
        "high_freq_factor": 4,
        "original_max_position_embeddings": 8192,
    }
    assert scaling_from_hf(llama31) == LLAMA31
    assert scaling_from_hf({"type": "linear", "factor": 8.0}) == LinearScaling(8.0)  # HF's old key
    assert scaling_from_hf({"rope_type": "default"}) is None
    assert scaling_from_hf(None) is None


# ---------------------------------------------------------------------------
# Properties


def scores_np(q, k):  # [H, Lq, Lk] in float64
    return np.einsum("qhd,khd->hqk", np.float64(q), np.float64(k))


@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_scores_depend_only_on_relative_position(layout, scaling):
    rope = RoPE(layout=layout, scaling=SCALINGS[scaling])
    q, k = rand(1, (L, H, Dh)), rand(2, (L + 2, H, Dh))
    m, n = np.random.default_rng(3).integers(0, 100, L), np.random.default_rng(4).integers(0, 100, L + 2)
    shifts = np.array([0, 1, 37, -50, 1000])

    @jax.jit
    def shifted_scores(shifts):  # [shifts, H, Lq, Lk]
        def one(shift):
            q_rot, k_rot = apply_rope(q, m + shift, rope), apply_rope(k, n + shift, rope)
            return jnp.einsum("qhd,khd->hqk", q_rot, k_rot, precision="highest")

        return jax.vmap(one)(shifts)

    all_scores = np.asarray(shifted_scores(shifts))
    norms = np.einsum("qh,kh->hqk", np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1))
    # relative to |q||k|, at float32's resolution of angles up to ~1100 rad
    np.testing.assert_array_less(np.abs(all_scores - all_scores[0]) / norms, 1e-5)
    assert not np.allclose(all_scores[0], scores_np(q, k), atol=1e-2)  # it did rotate


def test_layouts_are_one_permutation_apart():
    x, positions = rand(5, (L, H, Dh)), np.arange(L) * 3 - 4
    for rotary_dim in [None, R]:
        perm = interleaved_to_half(Dh, rotary_dim)
        back = np.argsort(perm)
        half = RoPE(rotary_dim=rotary_dim, layout="half")
        interleaved = RoPE(rotary_dim=rotary_dim, layout="interleaved")
        np.testing.assert_allclose(
            rope_jit(x, positions, rope=interleaved),
            rope_jit(x[..., perm], positions, rope=half)[..., back],
            rtol=0,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            rope_jit(x, positions, rope=half),
            rope_jit(x[..., back], positions, rope=interleaved)[..., perm],
            rtol=0,
            atol=1e-6,
        )
    np.testing.assert_array_equal(interleaved_to_half(8), [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(interleaved_to_half(8, 4), [0, 2, 1, 3, 4, 5, 6, 7])


def test_permuted_qk_weights_give_the_same_scores():
    # What a GGUF loader relies on: Q/K weights written for the interleaved layout,
    # with each head's output features permuted, give the same scores under "half".
    D, Hkv = 12, 1
    x, positions = rand(6, (L, D)), np.arange(L) + 20
    w_q, w_k = rand(7, (D, H, Dh)), rand(8, (D, Hkv, Dh))
    perm = interleaved_to_half(Dh)

    def rope_scores(w_q, w_k, layout):
        q = rope_jit(np.einsum("ld,dhe->lhe", x, w_q), positions, rope=RoPE(layout=layout))
        k = rope_jit(np.einsum("ld,dhe->lhe", x, w_k), positions, rope=RoPE(layout=layout))
        return scores_np(q, np.broadcast_to(k, (L, H, Dh)))

    np.testing.assert_allclose(
        rope_scores(w_q[..., perm], w_k[..., perm], "half"),
        rope_scores(w_q, w_k, "interleaved"),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_partial_rotary_leaves_the_tail_untouched(layout):
    x = rand(9, (L, H, Dh))
    out = rope_jit(x, np.arange(L) + 100, rope=RoPE(rotary_dim=R, layout=layout))
    np.testing.assert_array_equal(out[..., R:], x[..., R:])
    assert not np.allclose(out[..., :R], x[..., :R])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_bfloat16_in_bfloat16_out(layout):
    rope = RoPE(rotary_dim=R, layout=layout)
    x, positions = rand(10, (L, H, Dh)), np.array([0, 1, 2, 3, 500, 501, 8191])
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    out = rope_jit(x_bf16, positions, rope=rope)
    assert out.dtype == jnp.bfloat16
    # the rotation runs in float32 and rounds once, at the end
    rounded_once = rope_jit(x_bf16.astype(jnp.float32), positions, rope=rope).astype(jnp.bfloat16)
    np.testing.assert_array_equal(out.astype(np.float32), rounded_once.astype(np.float32))
    np.testing.assert_allclose(
        out.astype(np.float32), rope_jit(x, positions, rope=rope), rtol=2e-2, atol=2e-2
    )
    np.testing.assert_array_equal(out[..., R:], x_bf16[..., R:])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gradient_is_the_transposed_rotation(layout):
    rope = RoPE(rotary_dim=R, layout=layout, scaling=LLAMA31)
    x, cotangent, positions = rand(11, (L, H, Dh)), rand(12, (L, H, Dh)), np.arange(L) * 7 - 10
    grad = jax.jit(jax.grad(lambda x: jnp.sum(apply_rope(x, positions, rope) * cotangent)))(x)
    assert np.isfinite(grad).all()
    # A rotation's transpose is the rotation by minus the angle (the tail: identity).
    np.testing.assert_allclose(grad, rope_jit(cotangent, -positions, rope=rope), rtol=1e-6, atol=1e-6)


def test_vmap_over_ragged_positions_and_no_retrace():
    B = 2
    rope = RoPE(theta=500000.0, scaling=LLAMA31)
    x = rand(13, (B, L, H, Dh))
    positions = np.stack([np.arange(L), np.arange(L) + 40])  # [B, L]: the second sequence is offset
    traces = []

    @functools.partial(jax.jit, static_argnames="rope")
    def batched(x, positions, rope):
        traces.append(rope)
        return jax.vmap(apply_rope, in_axes=(0, 0, None))(x, positions, rope)

    out = batched(x, positions, rope=rope)
    batched(x, positions, rope=RoPE(theta=5e5, scaling=Llama3Scaling(8.0, 1.0, 4.0, 8192)))
    assert len(traces) == 1  # an equal RoPE is the same static argument
    for b in range(B):
        np.testing.assert_allclose(
            out[b], rope_np(x[b], positions[b], 500000.0, None, "half", LLAMA31), rtol=1e-5, atol=1e-5
        )


def test_decode_one_token_at_a_time_equals_prefill():
    rope = RoPE(layout="interleaved")
    x = rand(14, (L, H, Dh))
    prefill = rope_jit(x, np.arange(L), rope=rope)
    for t in range(L):  # same shapes each step: one compile
        np.testing.assert_allclose(
            rope_jit(x[t : t + 1], np.array([t]), rope=rope), prefill[t : t + 1], rtol=1e-6, atol=1e-6
        )


def test_eager_matches_jit():
    x, positions = rand(15, (L, H, Dh)), np.arange(L) - 2
    rope = RoPE(rotary_dim=R, layout="interleaved", scaling=LinearScaling(2.0))
    np.testing.assert_allclose(
        apply_rope(x, positions, rope), rope_jit(x, positions, rope=rope), rtol=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------------
# Bad input: (id, call, exception, message regex)

X = np.ones((5, H, 8), np.float32)
POS = np.arange(5)

TABLE = [
    (
        "rotary_dim_odd",
        lambda: RoPE(rotary_dim=7),
        ValueError,
        r"RoPE.rotary_dim must be a positive even integer or None; got 7",
    ),
    (
        "rotary_dim_zero",
        lambda: RoPE(rotary_dim=0),
        ValueError,
        r"RoPE.rotary_dim must be a positive even integer or None; got 0",
    ),
    (
        "rotary_dim_above_Dh",
        lambda: apply_rope(X, POS, RoPE(rotary_dim=10)),
        ValueError,
        r"rope.rotary_dim must be at most Dh=8; got 10",
    ),
    (
        "rotary_dim_above_head_dim",
        lambda: inverse_frequencies(RoPE(rotary_dim=10), 8),
        ValueError,
        r"rope.rotary_dim must be at most Dh=8; got 10",
    ),
    (
        "Dh_odd",
        lambda: apply_rope(np.ones((5, H, 7), np.float32), POS, RoPE()),
        ValueError,
        r"x.shape\[2\] \(Dh\) must be even to rotate all of it \(rope.rotary_dim=None\); got 7",
    ),
    (
        "positions_wrong_shape",
        lambda: apply_rope(X, POS[None], RoPE()),
        ValueError,
        r"positions must have shape \[L\]=\(5,\); got shape \(1, 5\)",
    ),
    (
        "positions_wrong_length",
        lambda: apply_rope(X, np.arange(4), RoPE()),
        ValueError,
        r"positions must have shape \[L\]=\(5,\); got shape \(4,\)",
    ),
    (
        "positions_float",
        lambda: apply_rope(X, POS.astype(np.float32), RoPE()),
        TypeError,
        r"positions must have an integer dtype; got float32",
    ),
    (
        "x_rank",
        lambda: apply_rope(X[:, 0], POS, RoPE()),
        ValueError,
        r"x must have rank 3 \[L, H, Dh\]; got shape \(5, 8\)",
    ),
    (
        "x_integer",
        lambda: apply_rope(X.astype(np.int32), POS, RoPE()),
        TypeError,
        r"x must have a floating dtype; got int32",
    ),
    (
        "layout_unknown",
        lambda: RoPE(layout="neox"),
        ValueError,
        r"RoPE.layout must be one of \['half', 'interleaved'\]; got 'neox'",
    ),
    (
        "theta_zero",
        lambda: RoPE(theta=0.0),
        ValueError,
        r"RoPE.theta must be a positive finite number; got 0.0",
    ),
    (
        "theta_negative",
        lambda: RoPE(theta=-10000.0),
        ValueError,
        r"RoPE.theta must be a positive finite number; got -10000.0",
    ),
    (
        "linear_factor_zero",
        lambda: LinearScaling(0.0),
        ValueError,
        r"LinearScaling.factor must be a positive finite number; got 0.0",
    ),
    (
        "llama3_factor_negative",
        lambda: Llama3Scaling(-8.0, 1.0, 4.0, 8192),
        ValueError,
        r"Llama3Scaling.factor must be a positive finite number; got -8.0",
    ),
    (
        "llama3_low_freq_factor_zero",
        lambda: Llama3Scaling(8.0, 0.0, 4.0, 8192),
        ValueError,
        r"Llama3Scaling.low_freq_factor must be a positive finite number; got 0.0",
    ),
    (
        "llama3_high_not_above_low",
        lambda: Llama3Scaling(8.0, 4.0, 4.0, 8192),
        ValueError,
        r"Llama3Scaling.high_freq_factor must be greater than low_freq_factor=4.0; got 4.0",
    ),
    (
        "llama3_original_context_zero",
        lambda: Llama3Scaling(8.0, 1.0, 4.0, 0),
        ValueError,
        r"Llama3Scaling.original_max_position_embeddings must be a positive integer; got 0",
    ),
    (
        "scaling_unknown_hf_type",
        lambda: scaling_from_hf({"rope_type": "longrope", "factor": 4.0}),
        ValueError,
        r"rope_scaling\['rope_type'\] must be one of \['default', 'linear', 'llama3', 'yarn', "
        r"'dynamic'\]; got 'longrope'",
    ),
    (
        "scaling_hf_dynamic_without_context",
        lambda: scaling_from_hf({"rope_type": "dynamic", "factor": 2.0}),
        ValueError,
        r"max_position_embeddings must be given for rope_type 'dynamic'",
    ),
    (
        "yarn_factor_zero",
        lambda: YarnScaling(0.0, 4096),
        ValueError,
        r"YarnScaling.factor must be a positive finite number; got 0.0",
    ),
    (
        "yarn_beta_fast_negative",
        lambda: YarnScaling(4.0, 4096, beta_fast=-32.0),
        ValueError,
        r"YarnScaling.beta_fast must be a positive finite number; got -32.0",
    ),
    (
        "yarn_attention_factor_nan",
        lambda: YarnScaling(4.0, 4096, attention_factor=float("nan")),
        ValueError,
        r"YarnScaling.attention_factor must be a positive finite number; got nan",
    ),
    (
        "yarn_truncate_string",
        lambda: YarnScaling(4.0, 4096, truncate="yes"),
        TypeError,  # from the jaxtyping hook under the tests, else ours: "must be True or False"
        r"truncate",
    ),
    (
        "yarn_original_context_zero",
        lambda: YarnScaling(4.0, 0),
        ValueError,
        r"YarnScaling.original_max_position_embeddings must be a positive integer; got 0",
    ),
    (
        "dynamic_factor_negative",
        lambda: DynamicNTKScaling(-2.0, 2048),
        ValueError,
        r"DynamicNTKScaling.factor must be a positive finite number; got -2.0",
    ),
    (
        "dynamic_two_rotary_features",
        lambda: RoPE(rotary_dim=2, scaling=DynamicNTKScaling(2.0, 2048)),
        ValueError,
        r"RoPE.rotary_dim must be at least 4 for DynamicNTKScaling; got 2",
    ),
    (
        "dynamic_two_head_features",
        lambda: apply_rope(X[..., :2], POS, RoPE(scaling=DynamicNTKScaling(2.0, 2048))),
        ValueError,
        r"x.shape\[2\] \(Dh\) must be at least 4 for DynamicNTKScaling; got 2",
    ),
    (
        "length_not_scalar",
        lambda: apply_rope(X, POS, RoPE(scaling=DynamicNTKScaling(2.0, 2048)), length=np.array([5, 6])),
        ValueError,
        r"length must be an integer scalar; got int\d+ of shape \(2,\)",
    ),
    (
        "length_float",
        lambda: apply_rope(X, POS, RoPE(scaling=DynamicNTKScaling(2.0, 2048)), length=5.0),
        ValueError,
        r"length must be an integer scalar; got float32 of shape \(\)",
    ),
    (
        "scaling_hf_missing_key",
        lambda: scaling_from_hf({"rope_type": "llama3", "factor": 8.0}),
        ValueError,
        r"rope_scaling for 'llama3' must have the keys \['factor', 'low_freq_factor', "
        r"'high_freq_factor', 'original_max_position_embeddings'\]; got missing",
    ),
    # Under the test run's jaxtyping hook the annotation rejects it first (also a TypeError
    # naming `scaling`); without the hook RoPE's own check does.
    ("scaling_not_a_scaling", lambda: RoPE(scaling="llama3"), TypeError, r"scaling"),
]


@pytest.mark.parametrize(
    "call, exception, message", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_bad_input_raises(call, exception, message):
    with pytest.raises(exception, match=message):
        call()
