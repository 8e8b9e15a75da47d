"""Kernels that call `jax.nn.dot_product_attention`: "xla" (any backend) and
"cudnn" (GPU, bf16/f16). Both fix up what jax.nn does differently from the
reference: a row with no visible key comes back as zeros (jax.nn averages V),
and a -inf bias hides its key like a False mask entry (jax.nn would give NaN).

Limits read from jax 0.10.2 (`jax/_src/nn/functions.py`,
`jax/_src/cudnn/fused_attention_stablehlo.py`):
- jax.nn runs the softmax in float32 whatever the input: no float64.
- "xla" asks for an F16_F16_F32 dot, which XLA:CPU cannot compile under jit.
- cuDNN: bf16/f16 only; head dim a multiple of 8, at most 128 (256 from
  Hopper, compute capability 9.0); a bias needs even Lq and Lk (its backward);
  its window is left-only (`sliding_window_length`): a right side is refused
  unless the mask is causal without padding, so we pass (left, 0) under
  is_causal and refuse a non-causal window with a right side; causal is
  top-left only (no q_offset); no dense mask here (jax#28974).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mha_jax import masks
from mha_jax.kernels.request import Request, float32_softmax_limits, library_kernel_limits, rule_limits


def xla_cannot(request: Request) -> list[str]:
    reasons = library_kernel_limits(request) + float32_softmax_limits(request)
    if request.backend == "cpu" and request.dtype == jnp.float16:
        reasons.append("compute in float16 on backend 'cpu' (XLA:CPU has no F16_F16_F32 dot)")
    return reasons


def xla_run(q, k, v, *, mask, bias, structure, options, rng, sinks=None):
    """`[Lq, H, Dh], [Lk, Hkv, Dh] x2 -> (heads [Lq, H, Dh], None)`."""
    del sinks  # none: `cannot` refuses them (library_kernel_limits)
    length_q, length_k = q.shape[0], k.shape[0]
    dense = mask
    if bias is not None:
        finite = bias > -jnp.inf
        dense, bias = masks.combine(dense, finite), jnp.where(finite, bias, 0.0)
    if not structure.is_trivial:  # [H or 1, Lq, Lk]: a mask function may differ by head
        heads = structure.head_offset + jnp.arange(q.shape[1])
        rules = structure.allows_per_head(jnp.arange(length_q), jnp.arange(length_k), heads)
        dense = masks.combine(dense, rules if structure.mask_mod is not None else rules[0])
    heads = _dot_product_attention(
        q, k, v, bias=bias, mask=dense, scale=_scale(q, options), implementation="xla"
    )
    if dense is None:
        return heads, None
    # jax.nn averages V over a row with no visible key; we return zeros.
    row_visible = dense.reshape(-1, length_q, length_k).any(axis=-1)  # [H or 1, Lq]
    return jnp.where(row_visible.T[:, :, None], heads, 0).astype(heads.dtype), None


def cudnn_cannot(request: Request) -> list[str]:
    reasons = library_kernel_limits(request) + rule_limits(request)
    structure = request.structure
    if request.backend != "gpu":
        reasons.append(f"run on backend {request.backend!r} (it needs a GPU)")
    if request.dtype not in (jnp.bfloat16, jnp.float16):
        reasons.append(f"compute in {request.dtype} (it needs bfloat16 or float16)")
    widest = 256 if request.gpu_capability >= (9, 0) else 128
    if request.head_dim % 8 or request.head_dim > widest:
        reasons.append(f"take head_dim={request.head_dim} (a multiple of 8, at most {widest} here)")
    if request.has_mask:
        reasons.append("take a dense boolean mask (jax#28974); use is_causal/kv_length/window")
    if request.has_bias and (request.length_q % 2 or request.length_k % 2):
        reasons.append("take a bias with odd Lq or Lk (its backward needs both even)")
    if (structure.is_causal or structure.window) and not request.static_zero_offset:
        reasons.append("shift the causal mask by q_offset (it aligns top-left only)")
    if structure.window is not None and structure.window[1] > 0 and not structure.is_causal:
        reasons.append("take a window with a right side without is_causal (its window is left-only)")
    return reasons


def cudnn_run(q, k, v, *, mask, bias, structure, options, rng, sinks=None):
    del sinks  # none: `cannot` refuses them (library_kernel_limits)
    length_q, length_k = q.shape[0], k.shape[0]
    lengths = None if structure.kv_length is None else jnp.reshape(structure.kv_length, (1,))
    lengths = None if lengths is None else lengths.astype(jnp.int32)
    # The query lengths too, computed from the key lengths (`0 · lengths`, not `zeros_like`,
    # which vmap leaves unbatched): under the per-example vmap both are then batched. Left to
    # jax.nn, they are filled unbatched, and cuDNN's batching rule fails at trace time on the
    # first padded batch of two or more (jax 0.10.2).
    q_lengths = None if lengths is None else lengths * 0 + length_q
    # Under is_causal the right side of a window hides nothing; a window (left, 0) is causal.
    window = structure.window
    is_causal = structure.is_causal or (window is not None and window[1] == 0)
    window = None if window is None else (window[0], 0)
    heads = _dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=None,
        scale=_scale(q, options),
        implementation="cudnn",
        is_causal=is_causal,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=lengths,
        local_window_size=window,
    )
    rows = structure.query_sees_any(length_q, length_k)  # [Lq]
    if bias is not None:  # rows whose visible keys all have -inf bias see nothing either
        visible = (bias > -jnp.inf).reshape(-1, length_q, length_k).any(axis=0)
        rows &= (visible & structure.allows(jnp.arange(length_q), jnp.arange(length_k))).any(-1)
    return jnp.where(rows[:, None, None], heads, 0).astype(heads.dtype), None


def _scale(q, options) -> float:
    return q.shape[-1] ** -0.5 if options.scale is None else options.scale


def _dot_product_attention(q, k, v, *, bias, mask, **options):
    """Per-example call of `jax.nn.dot_product_attention` (it wants a batch axis)."""
    expand = lambda x: None if x is None else x.reshape(-1, *x.shape[-2:])[None]
    return jax.nn.dot_product_attention(
        q[None], k[None], v[None], bias=expand(bias), mask=expand(mask), **options
    )[0]
