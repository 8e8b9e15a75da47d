"""The flash kernels JAX ships as Pallas code: GPU (Triton) `mha` and TPU
`flash_attention`; on CPU the GPU kernel runs in interpret mode (slow; for tests).

Limits read from jax 0.10.2 (`jax/experimental/pallas/ops/{gpu/attention,
tpu/flash_attention}.py`): causal (top-left) or nothing, no mask, bias,
kv_length or window; segment ids on GPU (one array, self-attention);
float32 softmax; GPU blocks of 128 (a length above 128 must be a multiple
of it); TPU blocks of 128 that must fit (lengths are multiples of 128);
equal head counts (GQA is expanded here).
"""

from __future__ import annotations

import jax.numpy as jnp

from mha_jax.kernels.request import Request, float32_softmax_limits, library_kernel_limits, rule_limits

BLOCK = 128


def takes_segment_ids(request: Request) -> bool:
    """The GPU kernel (interpreted on CPU) takes one `segment_ids` array for queries and keys:
    self-attention's form, Lq = Lk. A row then always sees itself, so its large negative mask
    value never meets a row with no visible key (where it would average V, not give zeros)."""
    ids = request.structure.segment_ids
    return (
        request.backend in ("gpu", "cpu") and not isinstance(ids, tuple | list)
        and request.length_q == request.length_k
    )  # fmt: skip


def cannot(request: Request) -> list[str]:
    structure = request.structure
    ruled = request
    if structure.segment_ids is not None and takes_segment_ids(request):
        ruled = request._replace(structure=structure.replace(segment_ids=None))
    reasons = library_kernel_limits(request) + float32_softmax_limits(request) + rule_limits(ruled)
    if request.backend not in ("gpu", "tpu", "cpu"):
        reasons.append(f"run on backend {request.backend!r}")
    if request.has_mask or request.has_bias:
        reasons.append("take a mask or bias array")
    if structure.kv_length is not None or structure.window is not None:
        reasons.append("take kv_length or window")
    if structure.is_causal and not request.static_zero_offset:
        reasons.append("shift the causal mask by q_offset")
    for axis in ("length_q", "length_k"):
        size = getattr(request, axis)
        fits = size % BLOCK == 0 if request.backend == "tpu" else size <= BLOCK or size % BLOCK == 0
        if not fits:
            needed = "a multiple" if request.backend == "tpu" else "at most 128 or a multiple"
            reasons.append(f"take {axis}={size} ({needed} of {BLOCK} is needed)")
    return reasons


def run(q, k, v, *, mask, bias, structure, options, rng, sinks=None):
    del sinks  # none: `cannot` refuses them (library_kernel_limits)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if options.scale is None else options.scale
    # These kernels want equal head counts: expand the kv heads of GQA.
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=1)
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=1)
    if options.platform == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu

        to_bhld = lambda x: x.transpose(1, 0, 2)[None]
        out = tpu.flash_attention(
            to_bhld(q), to_bhld(k), to_bhld(v), causal=structure.is_causal, sm_scale=scale
        )
        return out[0].transpose(1, 0, 2), None
    from jax.experimental.pallas.ops.gpu import attention as gpu

    out = gpu.mha(
        q[None],
        k[None],
        v[None],
        segment_ids=None if structure.segment_ids is None else structure.segment_ids[None].astype(jnp.int32),
        sm_scale=scale,
        causal=structure.is_causal,
        interpret=options.platform == "cpu",
    )
    return out[0], None
