"""Rotary position embeddings (RoPE) for one sequence, at explicit positions.

    x [L, H, Dh], positions int [L] --apply_rope--> [L, H, Dh]

Feature pairs `(x1, x2)` of each head turn by the angle `position * inv_freq`,
one inverse frequency per pair (F = R/2 of them, R = `rotary_dim` <= Dh):

    x1' = x1 cos(angle) - x2 sin(angle)        inv_freq[i] = theta ** (-2i / R)
    x2' = x2 cos(angle) + x1 sin(angle)        (then rescaled by `scaling`)

so `apply_rope(q, m) · apply_rope(k, n)` depends on `m - n` only. Which
features pair up is the `layout`:

    "half"         (x[i], x[i + R/2]): HF Llama's `rotate_half`, GPT-NeoX.
    "interleaved"  (x[2i], x[2i + 1]): GPT-J, Meta's original Llama, GGUF/llama.cpp.

The two are one fixed permutation of the features apart (`interleaved_to_half`):
a checkpoint written for one layout runs under the other after permuting the
rows of its Q and K projections. Features from R to Dh pass through unchanged
(partial rotary, e.g. GPT-J, GPT-NeoX, Phi).

Positions are explicit integers per token, so prefill (0..L-1), one decode
step (the cache length) and ragged batches (`jax.vmap` over `[B, L]`) all get
the right angles; negative positions are allowed.

Numerics: `inverse_frequencies` is a constant of the configuration, computed
in float64 NumPy at trace time and rounded once to float32. Angles are
`float32(position) * inv_freq` in float32, as an outer product by broadcasting
(not a matmul, so no reduced-precision matmul pass on TPU); positions are exact
up to |position| <= 2**24. sin, cos and the rotation run in float32 (float64
inputs stay float64) and the result is cast back to x's dtype. HF transformers
instead casts cos/sin to bf16 and rotates in bf16 for a bf16 model; our bf16
result is the float32 one rounded once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike
from jaxtyping import Float, Int

from mha_jax import _checks

LAYOUTS = ("half", "interleaved")


def _check_positive_number(name: str, value: object) -> None:
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise _checks.fail(name, "be a positive finite number", repr(value))


@dataclasses.dataclass(frozen=True)
class LinearScaling:
    """Position interpolation (HF rope_type "linear"): every inverse frequency / factor,
    i.e. positions are squeezed by `factor`."""

    factor: float

    def __post_init__(self):
        _check_positive_number("LinearScaling.factor", self.factor)

    def rescale(self, inv_freq: np.ndarray, **_) -> np.ndarray:
        return inv_freq / self.factor


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's frequency-dependent scaling (HF rope_type "llama3"), exactly
    `transformers.modeling_rope_utils._compute_llama3_parameters`: pairs whose
    wavelength `2π / inv_freq` is below `original_max_position_embeddings /
    high_freq_factor` keep their frequency, those above `... / low_freq_factor`
    are divided by `factor`, and the band between is interpolated smoothly.

    Llama 3.1: factor 8, low 1, high 4, original 8192 (Llama 3.2: factor 32).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        _check_positive_number("Llama3Scaling.factor", self.factor)
        _check_positive_number("Llama3Scaling.low_freq_factor", self.low_freq_factor)
        _check_positive_number("Llama3Scaling.high_freq_factor", self.high_freq_factor)
        _checks.check_positive(
            "Llama3Scaling.original_max_position_embeddings", self.original_max_position_embeddings
        )
        if self.high_freq_factor <= self.low_freq_factor:
            raise _checks.fail(
                "Llama3Scaling.high_freq_factor",
                f"be greater than low_freq_factor={self.low_freq_factor!r}",
                repr(self.high_freq_factor),
            )

    def rescale(self, inv_freq: np.ndarray, **_) -> np.ndarray:
        old_context = self.original_max_position_embeddings
        low_freq_wavelen = old_context / self.low_freq_factor
        high_freq_wavelen = old_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_context / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN (Peng et al., 2023; HF rope_type "yarn"), exactly
    `transformers.modeling_rope_utils._compute_yarn_parameters`: pair i keeps its
    frequency when it turns more than `beta_fast` times over the original context
    (short waves extrapolate), is divided by `factor` when it turns fewer than
    `beta_slow` times (long waves interpolate), and blends linearly in between, by pair
    index; cos and sin are then multiplied by the attention factor (so the scores by its
    square), `0.1 ln(factor) + 1` unless `attention_factor` is given (or `mscale` and
    `mscale_all_dim`, DeepSeek's ratio of two such terms). `truncate` rounds the blend's
    ends outwards to whole pairs, as HF does by default.

    Qwen3 long context: factor 4, original 32768. DeepSeek V3: factor 40, original 4096,
    beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _check_positive_number("YarnScaling.factor", self.factor)
        _checks.check_positive(
            "YarnScaling.original_max_position_embeddings", self.original_max_position_embeddings
        )
        _check_positive_number("YarnScaling.beta_fast", self.beta_fast)
        _check_positive_number("YarnScaling.beta_slow", self.beta_slow)
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _check_positive_number(f"YarnScaling.{name}", getattr(self, name))
        if not isinstance(self.truncate, bool):
            raise TypeError(f"YarnScaling.truncate must be True or False; got {self.truncate!r}")

    @property
    def cos_sin_factor(self) -> float:
        """The attention factor that multiplies cos and sin."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        return mscale(self.factor)

    def rescale(self, inv_freq: np.ndarray, *, theta: float, rotary_dim: int) -> np.ndarray:
        def pair_turning(rotations):  # the (fractional) pair index that turns `rotations` times
            context = self.original_max_position_embeddings
            return rotary_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = pair_turning(self.beta_fast), pair_turning(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        high = high + 0.001 if low == high else high  # HF's guard against 0 / 0
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)  # ramp 0: keep, 1: interpolate


@dataclasses.dataclass(frozen=True)
class DynamicNTKScaling:
    """Dynamic NTK (HF rope_type "dynamic", `_compute_dynamic_ntk_parameters`): up to
    `original_max_position_embeddings` positions nothing changes; a call whose sequence
    reaches S > original positions raises the base to
    `theta · (factor·S/original - (factor - 1)) ** (R / (R - 2))`.

    S is the call's own length: `max(positions) + 1` for `apply_rope`, the larger of the
    query and key positions per row in the layers (each sequence of a batch its own; HF
    takes the whole batch's maximum, the same for right-padded rows), the whole sequence's
    on a mesh. So the frequencies are traced values, and a KV cache holds each key rotated
    at the S of the step that wrote it, as HF's cache does: cached and uncached decoding past
    the original context differ, by design of the method.
    HF reads the original length from `config.max_position_embeddings`.
    """

    factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        _check_positive_number("DynamicNTKScaling.factor", self.factor)
        _checks.check_positive(
            "DynamicNTKScaling.original_max_position_embeddings", self.original_max_position_embeddings
        )

    def at_length(self, inv_freq: Array, *, rotary_dim: int, length: Array) -> Array:
        """float32 inverse frequencies for a sequence of `length` (traced) positions."""
        context = self.original_max_position_embeddings
        length = jnp.maximum(jnp.asarray(length, jnp.float32), context)
        growth = self.factor * length / context - (self.factor - 1)  # 1 at the original length
        # base' ** (-2i/R) = theta ** (-2i/R) · growth ** (-2i / (R - 2))
        exponents = -np.arange(0, rotary_dim, 2, dtype=np.float64) / (rotary_dim - 2)
        return inv_freq * growth ** jnp.asarray(exponents, jnp.float32)


# A scaling maps float64 inverse frequencies to float64 inverse frequencies (`rescale`,
# static) or, for dynamic NTK, to traced ones at the call's length (`at_length`); yarn's
# attention factor multiplies cos and sin in `apply_rope`. A new one is a frozen dataclass
# added here and to `HF_ROPE_TYPES` (its fields are the HF keys).
Scaling = LinearScaling | Llama3Scaling | YarnScaling | DynamicNTKScaling
HF_ROPE_TYPES: dict[str, type[Scaling] | None] = {
    "default": None,
    "linear": LinearScaling,
    "llama3": Llama3Scaling,
    "yarn": YarnScaling,
    "dynamic": DynamicNTKScaling,
}


@dataclasses.dataclass(frozen=True)
class RoPE:
    """How positions rotate q and k: a frozen, hashable value (a static jit argument).

    theta:      base of the inverse frequencies (Llama 2: 1e4, Llama 3: 5e5).
    rotary_dim: R, the leading features that rotate (even, <= Dh); None = all Dh.
    layout:     "half" (HF Llama) or "interleaved" (GPT-J, GGUF): see the module docstring.
    scaling:    None, `LinearScaling`, `Llama3Scaling`, `YarnScaling` or `DynamicNTKScaling`
                (context extension).
    """

    theta: float = 10000.0
    rotary_dim: int | None = None
    layout: str = "half"
    scaling: Scaling | None = None

    def __post_init__(self):
        _check_positive_number("RoPE.theta", self.theta)
        if self.rotary_dim is not None and not (
            isinstance(self.rotary_dim, int | np.integer) and self.rotary_dim > 0 and self.rotary_dim % 2 == 0
        ):
            raise _checks.fail("RoPE.rotary_dim", "be a positive even integer or None", repr(self.rotary_dim))
        _checks.check_choice("RoPE.layout", self.layout, LAYOUTS)
        if self.scaling is not None and not isinstance(self.scaling, Scaling):
            names = ", ".join(kind.__name__ for kind in HF_ROPE_TYPES.values() if kind is not None)
            raise TypeError(f"RoPE.scaling must be None or one of {names}; got {self.scaling!r}")
        if isinstance(self.scaling, DynamicNTKScaling) and self.rotary_dim == 2:
            # its base grows by a power R / (R - 2)
            raise _checks.fail("RoPE.rotary_dim", "be at least 4 for DynamicNTKScaling", self.rotary_dim)


def scaling_from_hf(
    rope_scaling: Mapping[str, object] | None, max_position_embeddings: int | None = None
) -> Scaling | None:
    """Our scaling value for a HF config's `rope_scaling` dict (None: no scaling).

    max_position_embeddings: the config's, which HF reads as the original context of
    "dynamic" (always) and of "yarn" (when `rope_scaling` does not say).
    """
    if rope_scaling is None:
        return None
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))  # "type": HF's old key
    if rope_type not in HF_ROPE_TYPES:
        raise _checks.fail("rope_scaling['rope_type']", f"be one of {list(HF_ROPE_TYPES)}", repr(rope_type))
    scaling = HF_ROPE_TYPES[rope_type]
    if scaling is None:
        return None
    given = {key: value for key, value in rope_scaling.items() if value is not None}
    context = "original_max_position_embeddings"
    if scaling is DynamicNTKScaling or (scaling is YarnScaling and context not in given):
        if max_position_embeddings is None:
            raise _checks.fail(
                "max_position_embeddings",
                f"be given for rope_type {rope_type!r} (HF reads config.max_position_embeddings)",
                None,
            )
        given[context] = max_position_embeddings
    fields = dataclasses.fields(scaling)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in given]
    if missing:
        raise _checks.fail(
            f"rope_scaling for {rope_type!r}", f"have the keys {required}", f"missing {missing}"
        )
    # JSON configs write 8 for 8.0; the field types say which is meant. Other keys
    # (HF's "rope_type", "type") are not fields.
    cast = {"original_max_position_embeddings": int, "truncate": bool}
    return scaling(**{f.name: cast.get(f.name, float)(given[f.name]) for f in fields if f.name in given})


def rotary_size(rope: RoPE, head_dim: int, name: str = "head_dim") -> int:
    """R, the number of rotated features, checked against Dh (`name` says where Dh came from)."""
    _checks.check_positive(name, head_dim)
    if rope.rotary_dim is None:
        if head_dim % 2:
            raise _checks.fail(name, "be even to rotate all of it (rope.rotary_dim=None)", head_dim)
        if isinstance(rope.scaling, DynamicNTKScaling) and head_dim == 2:
            raise _checks.fail(name, "be at least 4 for DynamicNTKScaling", head_dim)
        return head_dim
    if rope.rotary_dim > head_dim:
        raise _checks.fail("rope.rotary_dim", f"be at most Dh={head_dim}", rope.rotary_dim)
    return rope.rotary_dim


def inverse_frequencies(rope: RoPE, head_dim: int, length: ArrayLike | None = None) -> Float[Array, " F"]:
    """float32 `[R/2]`: `theta ** (-2i / R)` for pair i, then `rope.scaling` (float64 inside).

    length: the sequence length S that dynamic NTK scales for (traced is fine); None, or
    any other scaling: the frequencies do not depend on it.
    """
    rotary_dim = rotary_size(rope, head_dim)
    inv_freq = 1.0 / rope.theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if isinstance(rope.scaling, DynamicNTKScaling):
        inv_freq = jnp.asarray(inv_freq, dtype=jnp.float32)
        if length is None:
            return inv_freq
        return rope.scaling.at_length(inv_freq, rotary_dim=rotary_dim, length=length)
    if rope.scaling is not None:
        inv_freq = rope.scaling.rescale(inv_freq, theta=rope.theta, rotary_dim=rotary_dim)
    return jnp.asarray(inv_freq, dtype=jnp.float32)


def cos_sin_factor(rope: RoPE) -> float:
    """What multiplies cos and sin: yarn's attention factor, else 1."""
    return rope.scaling.cos_sin_factor if isinstance(rope.scaling, YarnScaling) else 1.0


def interleaved_to_half(head_dim: int, rotary_dim: int | None = None) -> np.ndarray:
    """The feature order `perm` with `x[..., perm]` in half layout when `x` is interleaved:

        apply_rope(x, p, interleaved) == apply_rope(x[..., perm], p, half)[..., argsort(perm)]

    Pair firsts `0, 2, ..., R-2`, then pair seconds `1, 3, ..., R-1`, then the
    unrotated tail. `w[:, perm]` turns a per-head Q/K projection (columns in
    `[Dh]` order) from interleaved into half; `argsort(perm)` goes back, which is
    the reordering GGUF converters apply to HF Llama's Q/K weights.
    """
    rotary_dim = rotary_size(RoPE(rotary_dim=rotary_dim), head_dim)
    return np.concatenate(
        [np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2), np.arange(rotary_dim, head_dim)]
    )


def rotation_angles(
    positions: Int[Array, " L"], inv_freq: Float[Array, " F"]
) -> tuple[Float[Array, "L F"], Float[Array, "L F"]]:
    """`(cos, sin)` of `position * inv_freq`, all in float32."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [L, F]
    return jnp.cos(angles), jnp.sin(angles)


def rotate(
    x: Float[Array, "L H R"], cos: Float[Array, "L F"], sin: Float[Array, "L F"], layout: str
) -> Float[Array, "L H R"]:
    """Turn each feature pair `(x1, x2)` by its angle, in x's dtype."""
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)  # [L, 1, F]
    length, num_heads, rotary_dim = x.shape
    match layout:
        case "half":
            x1, x2 = x[..., : rotary_dim // 2], x[..., rotary_dim // 2 :]
            return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        case "interleaved":
            pairs = x.reshape(length, num_heads, rotary_dim // 2, 2)  # [L, H, F, 2]
            x1, x2 = pairs[..., 0], pairs[..., 1]
            turned = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
            return turned.reshape(length, num_heads, rotary_dim)
    raise _checks.fail("layout", f"be one of {list(LAYOUTS)}", repr(layout))


def apply_rope(x: ArrayLike, positions: ArrayLike, rope: RoPE, length: ArrayLike | None = None) -> Array:
    """Rotate the first R features of every head of `x [L, H, Dh]` by the angles of
    `positions` (int `[L]`, one per token); returns `[L, H, Dh]` in x's dtype.

    Use on q and k after the head split (and after QK-norm), before the scores.
    The batch comes from `jax.vmap(apply_rope, in_axes=(0, 0, None))`.
    Angles are float32 (`positions` exact up to 2**24) and so is the rotation;
    see the module docstring. length: the sequence length S that `DynamicNTKScaling`
    scales for (an int scalar, traced is fine); None: `max(positions) + 1`. Other
    scalings ignore it.
    """
    x, positions = jnp.asarray(x), jnp.asarray(positions)
    _checks.check_rank("x", x, 3, "[L, H, Dh]")
    _checks.check_floating("x", x)
    length_x, _, head_dim = x.shape
    _checks.check_shape("positions", positions, (length_x,), "[L]")
    _checks.check_integer("positions", positions)
    if length is not None:
        length = jnp.asarray(length)
        if length.shape != () or not jnp.issubdtype(length.dtype, jnp.integer):
            raise _checks.fail("length", "be an integer scalar", f"{length.dtype} of shape {length.shape}")
    if not isinstance(rope, RoPE):
        raise TypeError(f"rope must be a RoPE; got {rope!r}")
    rotary_size(rope, head_dim, name="x.shape[2] (Dh)")
    return apply_rope_unchecked(x, positions, rope, length)


def apply_rope_unchecked(x: Array, positions: Array, rope: RoPE, length: Array | None = None) -> Array:
    """`apply_rope` without its checks, for the data path (the public call checked them once)."""
    head_dim = x.shape[2]
    rotary_dim = head_dim if rope.rotary_dim is None else rope.rotary_dim
    if isinstance(rope.scaling, DynamicNTKScaling) and length is None:
        length = jnp.max(positions) + 1
    cos, sin = rotation_angles(positions, inverse_frequencies(rope, head_dim, length))  # [L, R/2] each
    factor = cos_sin_factor(rope)  # yarn: the scores grow by its square
    cos, sin = (cos, sin) if factor == 1.0 else (cos * factor, sin * factor)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    turned = rotate(x[..., :rotary_dim].astype(compute), cos, sin, rope.layout)  # [L, H, R]
    return jnp.concatenate([turned.astype(x.dtype), x[..., rotary_dim:]], axis=-1)
