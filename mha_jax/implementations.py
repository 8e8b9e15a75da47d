"""The `implementation=` switch: which kernel computes `softmax(q kᵀ·scale) · v`.

    "reference"  the readable stages (the spec); every option; O(L²) memory
    "blockwise"  online-softmax blocks with a custom VJP; O(L) memory (CPU default
                 for long sequences)
    "xla"        jax.nn.dot_product_attention(implementation="xla")
    "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"), GPU, bf16/fp16
    "pallas"     the flash kernels JAX ships (GPU Triton `mha`, TPU `flash_attention`);
                 on CPU they run in interpret mode (slow; for tests)
    "auto"       picks by backend, dtype, options and size

An implementation that cannot honour a requested option is an error, never a
silent fallback that would change the numbers. Every one returns zeros for a
query row with no visible key, like the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax import _checks, masks
from mha_jax.blockwise import blockwise_attention
from mha_jax.masks import Structure

NAMES = ("auto", "reference", "blockwise", "xla", "cudnn", "pallas")

# Below this many (query, key) pairs per example the materialising path is
# fastest on CPU: one fused pass beats a loop of blocks. From L=512 up the
# blockwise path wins forward (0.73x vs 1.22x flax.linen at B=8, L=512) and
# forward+backward (0.81x vs 0.94x), and more so as L grows (scripts/bench.py).
BLOCKWISE_MIN_PAIRS = 512 * 512


def limitations(
    name: str, *, backend: str, dtype, sizes: dict[str, int], structure: Structure,
    mask, bias, dropout_rate: float, return_weights: bool,
) -> list[str]:  # fmt: skip
    """What `name` cannot do for this call (empty: it can run it exactly)."""
    if name == "reference":
        return []
    reasons = []
    if dropout_rate > 0.0:
        reasons.append("apply dropout (it has no dropout)")
    if return_weights:
        reasons.append("return the attention weights (it never materialises them)")
    if name != "blockwise" and jnp.dtype(dtype) == jnp.float64:
        # jax.nn and the Pallas kernels run the softmax in float32 whatever the
        # input: float64 would silently come back with float32 accuracy.
        reasons.append("compute in float64 (its softmax runs in float32)")
    if name == "xla" and backend == "cpu" and jnp.dtype(dtype) == jnp.float16:
        # jax.nn asks for an F16_F16_F32 dot, which XLA:CPU cannot compile under jit.
        reasons.append("compute in float16 on backend 'cpu' (XLA:CPU has no F16_F16_F32 dot)")
    if name in ("blockwise", "xla"):
        return reasons
    static_zero_offset = isinstance(structure.q_offset, int) and structure.q_offset == 0
    if name == "cudnn":
        if backend != "gpu":
            reasons.append(f"run on backend {backend!r} (it needs a GPU)")
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            reasons.append(f"compute in {jnp.dtype(dtype)} (it needs bfloat16 or float16)")
        if mask is not None:
            reasons.append("take a dense boolean mask (jax#28974); use is_causal/kv_length/window")
        if (structure.is_causal or structure.window) and not static_zero_offset:
            reasons.append("shift the causal mask by q_offset (it aligns top-left only)")
    if name == "pallas":
        if backend not in ("gpu", "tpu", "cpu"):
            reasons.append(f"run on backend {backend!r}")
        if mask is not None or bias is not None:
            reasons.append("take a mask or bias array")
        if structure.kv_length is not None or structure.window is not None:
            reasons.append("take kv_length or window")
        if structure.is_causal and not static_zero_offset:
            reasons.append("shift the causal mask by q_offset")
        block = 128
        for axis in ("length_q", "length_k"):
            if sizes[axis] > block and sizes[axis] % block:
                reasons.append(f"take {axis}={sizes[axis]} (a multiple of {block} is needed)")
    return reasons


def resolve(
    name: object, x_q, sizes, structure, *, mask, bias, dropout_rate, return_weights, dtype
) -> str:
    """Validate an explicit choice, or make one for "auto"."""
    _checks.check_choice("implementation", name, NAMES)
    dtype = jnp.result_type(x_q) if dtype is None else dtype
    context = dict(
        backend=jax.default_backend(), dtype=dtype, sizes=sizes, structure=structure,
        mask=mask, bias=bias, dropout_rate=dropout_rate, return_weights=return_weights,
    )  # fmt: skip
    if name != "auto":
        reasons = limitations(name, **context)
        if reasons:
            raise ValueError(
                f'implementation="{name}" cannot ' + "; cannot ".join(reasons)
                + '. implementation="reference" supports every option.'
            )  # fmt: skip
        return name
    if context["backend"] == "gpu" and not limitations("cudnn", **context):
        return "cudnn"
    if context["backend"] == "tpu" and not limitations("pallas", **context):
        return "pallas"
    if sizes["length_q"] * sizes["length_k"] >= BLOCKWISE_MIN_PAIRS and not limitations(
        "blockwise", **context
    ):
        return "blockwise"
    return "reference"


def run(name: str, q, k, v, *, mask, bias, structure: Structure, scale) -> Array:
    """`[Lq, H, Dh], [Lk, Hkv, Dh] x2 -> [Lq, H, Dh]` with the chosen kernel."""
    if q.shape[0] == 0 or k.shape[0] == 0:  # no query, or nothing to attend to: zeros
        return jnp.zeros_like(q)
    if name == "blockwise":
        return blockwise_attention(q, k, v, mask=mask, bias=bias, structure=structure, scale=scale)
    length_q, length_k = q.shape[0], k.shape[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if name == "xla":
        dense = mask
        if bias is not None:
            # A -inf bias hides its key as a False mask entry does; jax.nn would
            # give NaN for a row of them, or let masked keys back in.
            finite = bias > -jnp.inf
            dense, bias = masks.combine(dense, finite), jnp.where(finite, bias, 0.0)
        if not structure.is_trivial:
            rules = structure.allows(jnp.arange(length_q), jnp.arange(length_k))
            dense = masks.combine(dense, rules)
        heads = _jax_nn(q, k, v, bias=bias, mask=dense, scale=scale, implementation="xla")
        if dense is None:
            return heads
        # jax.nn averages V over a row with no visible key; we return zeros.
        row_visible = dense.reshape(-1, length_q, length_k).any(axis=-1)  # [H or 1, Lq]
        return jnp.where(row_visible.T[:, :, None], heads, 0).astype(heads.dtype)
    if name == "cudnn":
        lengths = None if structure.kv_length is None else jnp.reshape(structure.kv_length, (1,))
        heads = _jax_nn(
            q, k, v, bias=bias, mask=None, scale=scale, implementation="cudnn",
            is_causal=structure.is_causal, key_value_seq_lengths=lengths,
            local_window_size=structure.window,
        )  # fmt: skip
        return jnp.where(structure.query_sees_any(length_q, length_k)[:, None, None], heads, 0)
    if name == "pallas":
        return _pallas(q, k, v, is_causal=structure.is_causal, scale=scale)
    raise AssertionError(f"unreachable: {name}")


def _jax_nn(q, k, v, *, bias, mask, scale, implementation, **options):
    """Per-example call of `jax.nn.dot_product_attention` (it wants a batch axis)."""
    expand = lambda x: None if x is None else x.reshape(-1, *x.shape[-2:])[None]
    out = jax.nn.dot_product_attention(
        q[None], k[None], v[None], bias=expand(bias), mask=expand(mask), scale=scale,
        implementation=implementation, **options,
    )  # fmt: skip
    return out[0]


def _pallas(q, k, v, *, is_causal, scale):
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    # These kernels want equal head counts: expand the kv heads of GQA.
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=1)
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=1)
    if jax.default_backend() == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu

        to_bhld = lambda x: x.transpose(1, 0, 2)[None]
        out = tpu.flash_attention(to_bhld(q), to_bhld(k), to_bhld(v), causal=is_causal,
                                  sm_scale=scale)  # fmt: skip
        return out[0].transpose(1, 0, 2)
    from jax.experimental.pallas.ops.gpu import attention as gpu

    out = gpu.mha(
        q[None], k[None], v[None], segment_ids=None, sm_scale=scale, causal=is_causal,
        interpret=jax.default_backend() == "cpu",
    )  # fmt: skip
    return out[0]
