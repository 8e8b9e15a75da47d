"""What one call asks of a kernel: the static facts a kernel's limitations read.

A kernel says what it `cannot` do for a `Request` (an empty list: it computes
this call exactly as the reference would). Choosing a kernel reads nothing
else, so the choice can be tested on a CPU with `backend="gpu"` or `"tpu"`.

The target is resolved once, by `resolve_platform`: `Options.platform` when set, else the
device of the current abstract mesh (part of jit's cache key), else `jax.default_backend()`;
`attend` then pins it into the options the kernel runs with, so `cannot` and `run` read the
same value, and `batched_attention` pins it before its jit, so its compile cache is keyed on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mha_jax.masks import Structure
from mha_jax.options import Options


class Request(NamedTuple):
    backend: str  # "cpu", "gpu" or "tpu"
    dtype: Any  # compute dtype of q, k, v
    length_q: int
    length_k: int
    head_dim: int
    structure: Structure  # q_offset and kv_length may be traced; is_causal and window are not
    has_mask: bool
    has_bias: bool
    dropout_rate: float  # the effective rate (Options carries 0 for a deterministic call)
    return_weights: bool
    softcap: float | None = None
    gpu_capability: tuple[int, int] = (0, 0)  # compute capability of a GPU backend
    batched: bool = False  # the caller hands over a whole batch (`attend_batch`), not one example
    has_sinks: bool = False  # the params hold attention sinks
    alibi: bool | int = False  # Options.alibi
    has_score_mod: bool = False  # Options.score_mod is set

    @classmethod
    def of(cls, q, k, *, mask, bias, structure, options, return_weights, sinks=None) -> Request:
        """The request of `attend(q [Lq, H, Dh], k [Lk, Hkv, Dh], ...)` on the options' target."""
        options = pin_platform(options)
        backend, capability = options.platform, options.compute_capability or (0, 0)
        return cls(
            backend=backend,
            dtype=jnp.dtype(q.dtype),
            length_q=q.shape[0],
            length_k=k.shape[0],
            head_dim=q.shape[2],
            structure=structure,
            has_mask=mask is not None,
            has_bias=bias is not None,
            dropout_rate=options.dropout_rate,
            return_weights=return_weights,
            softcap=options.softcap,
            gpu_capability=capability,
            has_sinks=sinks is not None,
            alibi=options.alibi,
            has_score_mod=options.score_mod is not None,
        )

    @property
    def static_zero_offset(self) -> bool:
        """Queries start at position 0, known at trace time (kernels that align top-left only)."""
        q_offset = self.structure.q_offset
        return isinstance(q_offset, int) and q_offset == 0


DEFAULT_GPU_CAPABILITY = (8, 0)  # Ampere: the target assumed when lowering for a GPU without one


def resolve_platform(options: Options) -> str:
    """ "cpu", "gpu" or "tpu": `options.platform`, else the current mesh's device, else the
    default backend."""
    if options.platform is not None:
        return options.platform
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = getattr(device, "platform", None) or jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def pin_platform(options: Options) -> Options:
    """`options` with the target filled in: the platform, and for a GPU its compute
    capability (the attached device's, else `DEFAULT_GPU_CAPABILITY`)."""
    platform = resolve_platform(options)
    capability = options.compute_capability
    if platform == "gpu" and capability is None:
        capability = DEFAULT_GPU_CAPABILITY
        if jax.default_backend() == "gpu":
            text = getattr(jax.devices()[0], "compute_capability", "8.0")
            capability = tuple(int(part) for part in str(text).split(".")[:2])
    if (platform, capability) == (options.platform, options.compute_capability):
        return options
    return dataclasses.replace(options, platform=platform, compute_capability=capability)


def fused_limits(request: Request) -> list[str]:
    """What every kernel but the reference cannot do: they never hold the weights."""
    reasons = []
    if request.dropout_rate > 0.0:
        reasons.append("apply dropout (it has no dropout)")
    if request.return_weights:
        reasons.append("return the attention weights (it never materialises them)")
    return reasons


def library_kernel_limits(request: Request) -> list[str]:
    """Kernels from other libraries (jax.nn, Pallas): fused, no soft-cap, sinks, ALiBi or score_mod."""
    reasons = fused_limits(request)
    if request.softcap is not None:
        reasons.append("apply a logit soft-cap (softcap)")
    if request.has_sinks:
        reasons.append("add attention sinks (params.sinks)")
    if request.alibi:
        reasons.append("add ALiBi's position bias (alibi)")
    if request.has_score_mod:
        reasons.append("apply a score function (score_mod)")
    return reasons


def float32_softmax_limits(request: Request) -> list[str]:
    """Kernels whose softmax runs in float32 whatever the input."""
    if request.dtype == jnp.float64:
        return ["compute in float64 (its softmax runs in float32)"]
    return []


def rule_limits(request: Request) -> list[str]:
    """For the library kernels, which take none of these rules (a dense form of them would be
    O(L²), which is what they exist to avoid): packed segment ids, chunks, a prefix."""
    structure = request.structure
    given = [
        name
        for name in ("segment_ids", "chunk", "prefix", "mask_mod")
        if getattr(structure, name) is not None
    ]
    return [f"take {', '.join(given)} (use the blockwise kernel)"] if given else []
