"""The kernels: which code computes `softmax(q kᵀ · scale + bias, where=visible) · v`.

    name         what                                               memory
    "reference"  the chapter's stages (the spec); every option      O(L²)
    "blockwise"  online softmax over blocks, custom VJP             O(L), fwd and bwd
    "xla"        jax.nn.dot_product_attention(implementation="xla") O(L²)
    "cudnn"      the same with cuDNN (GPU, bf16/f16)                O(L)
    "pallas"     JAX's Pallas flash kernels (GPU Triton, TPU)       O(L)
    "scan"       a batch of a few queries against a long cache:     O(L)
                 one block loop for the whole batch (decoding)
    "auto"       cuDNN, then Pallas (Triton) on GPU and Pallas on TPU when they can
                 honour the call, on the target `Options.platform` resolves to; on
                 CPU the reference below BLOCKWISE_MIN_PAIRS (query, key) pairs,
                 blockwise above, and blockwise for a padded or cached Lk above
                 BLOCKWISE_MIN_CACHE (it skips the empty blocks), or "scan" for a
                 whole batch (`attend_batch`) of at most SCAN_MAX_NEW queries there;
                 the reference whenever dropout or weights are asked

Each kernel is one entry: what it `cannot` do for a `Request` and how it
`run`s. `attend` makes the one call for one example; `attend_batch` for a batch
under rules only (a decode step), where a batched kernel runs the batch at once
and any other runs under `vmap`: one `choose` decides both. An explicit choice that cannot honour an
option is an error naming what it cannot do, never a silent fallback that
would change the numbers; every kernel returns zeros for a row with no
visible key, like the reference.

Keys that the structure hides from every query (the unfilled slots of a KV
cache, slots outside every window) may hold anything, NaN included: `attend`
zeroes them before a kernel reads them, except for a kernel that zeroes the
keys of the blocks it reads itself (`zeroes_unseen_keys`: blockwise, which
never reads the blocks no query sees). Weights of zero cannot stop
`0 · NaN = NaN` in `weights · v` or in the gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from mha_jax.kernels import blockwise, jax_nn, pallas, reference, scan
from mha_jax.kernels.request import Request, pin_platform
from mha_jax.masks import Structure
from mha_jax.options import IMPLEMENTATIONS, Options


class Kernel(NamedTuple):
    name: str
    cannot: Callable[[Request], list[str]]  # [] when it computes the call as the reference would
    run: Callable  # (q, k, v, *, mask, bias, structure, options, rng, sinks) -> (heads, weights or None)
    zeroes_unseen_keys: bool = False  # True: it zeroes the hidden keys of the blocks it reads
    batched: bool = False  # True: run takes a batch ([B, ...] arrays, rules with a leading B)


KERNELS = {
    kernel.name: kernel
    for kernel in (
        Kernel("reference", reference.cannot, reference.run),
        Kernel("blockwise", blockwise.cannot, blockwise.run, zeroes_unseen_keys=True),
        Kernel("xla", jax_nn.xla_cannot, jax_nn.xla_run),
        Kernel("cudnn", jax_nn.cudnn_cannot, jax_nn.cudnn_run),
        Kernel("pallas", pallas.cannot, pallas.run),
        Kernel("scan", scan.cannot, scan.run, zeroes_unseen_keys=True, batched=True),
    )
}
assert tuple(KERNELS) == IMPLEMENTATIONS[1:], "options.IMPLEMENTATIONS names the kernels"

# Below this many (query, key) pairs per example the materialising path is
# fastest on CPU (one fused pass beats a loop of blocks); from L=512 up the
# blockwise path wins forward and backward (docs/bench_time.md).
BLOCKWISE_MIN_PAIRS = 512 * 512
BLOCKWISE_MIN_CACHE = 512
SCAN_MAX_NEW = scan.SCAN_MAX_NEW  # above this many queries, its block-diagonal waste outgrows the gain


# On an accelerator, "auto" tries these first, in order: cuDNN, then Pallas's Triton kernel for
# what cuDNN refuses (float32, its head dims); on TPU the Pallas kernel.
ACCELERATED = {"gpu": ("cudnn", "pallas"), "tpu": ("pallas",)}


def choose(implementation: str, request: Request) -> Kernel:
    """The kernel for `implementation` ("auto": the fastest that can honour the request)."""
    if implementation != "auto":
        reasons = KERNELS[implementation].cannot(request)
        if reasons:
            raise ValueError(
                f'implementation="{implementation}" cannot '
                + "; cannot ".join(reasons)
                + '. implementation="reference" supports every option.'
            )
        return KERNELS[implementation]
    for preferred in ACCELERATED.get(request.backend, ()):
        if not KERNELS[preferred].cannot(request):
            return KERNELS[preferred]
    long = request.length_q * request.length_k >= BLOCKWISE_MIN_PAIRS
    # A KV cache (kv_length over many slots): blockwise visits the filled blocks only.
    cache = request.structure.kv_length is not None and request.length_k > BLOCKWISE_MIN_CACHE
    if (
        cache
        and request.backend == "cpu"
        and request.length_q <= SCAN_MAX_NEW
        and not KERNELS["scan"].cannot(request)
    ):
        return KERNELS["scan"]  # a decode step: one loop for the batch, written for the cache reads
    if (long or cache) and not KERNELS["blockwise"].cannot(request):
        return KERNELS["blockwise"]
    return KERNELS["reference"]


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None,
    bias: Array | None,
    structure: Structure,
    options: Options,
    rng: Array | None,
    return_weights: bool,
    sinks: Array | None = None,
) -> tuple[Array, Array | None]:
    """`[Lq, H, Dh], [Lk, Hkv, Dh] x2 -> (heads [Lq, H, Dh], weights [H, Lq, Lk] or None)`.

    sinks: `[H]` float32 logits that join each row's softmax with no value (gpt-oss); the
    weights returned are the keys' (a row sums to less than 1).

    Unchecked: the public functions validate the call first. `kv_length` is
    clamped to `[0, Lk]` here, once, for every kernel.
    """
    length_q, length_k = q.shape[0], k.shape[0]
    if structure.kv_length is not None:
        structure = structure.replace(kv_length=jnp.clip(structure.kv_length, 0, length_k))
    options = pin_platform(options)  # the kernel's `cannot` and `run` see one target
    request = Request.of(
        q, k, mask=mask, bias=bias, structure=structure, options=options, return_weights=return_weights,
        sinks=sinks,
    )  # fmt: skip
    kernel = choose(options.implementation, request)
    if length_q == 0 or length_k == 0:  # no query, or nothing to attend to: zeros
        weights = jnp.zeros((q.shape[1], length_q, length_k), v.dtype) if return_weights else None
        return jnp.zeros_like(q), weights
    if not kernel.zeroes_unseen_keys:
        k, v = zero_unseen_keys(k, v, structure, length_q)
    heads, weights = kernel.run(
        q, k, v, mask=mask, bias=bias, structure=structure, options=options, rng=rng, sinks=sinks
    )
    return heads, weights if return_weights else None


def attend_batch(
    q: Array, k: Array, v: Array, *, structure: Structure, options: Options, sinks: Array | None = None
) -> Array:
    """`[B, Lq, H, Dh], [B, Lk, Hkv, Dh] x2 -> heads [B, Lq, H, Dh]` under `structure`, every
    array of it with a leading B (no mask, bias, dropout or weights: a decode step's call).

    Unchecked, like `attend`. One choice for the batch: a batched kernel runs it at once,
    any other kernel one example at a time under `vmap`."""
    batch, length_q, length_k = q.shape[0], q.shape[1], k.shape[1]
    if structure.kv_length is not None:
        structure = structure.replace(kv_length=jnp.clip(structure.kv_length, 0, length_k))
    options = pin_platform(options)
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), structure)
    request = Request.of(
        q[0] if batch else jax.ShapeDtypeStruct(q.shape[1:], q.dtype), k[0] if batch else
        jax.ShapeDtypeStruct(k.shape[1:], k.dtype), mask=None, bias=None, structure=example,
        options=options, return_weights=False, sinks=sinks,
    )._replace(batched=True)  # fmt: skip
    kernel = choose(options.implementation, request)
    if not kernel.batched:  # the same kernel for each example, under vmap
        chosen = dataclasses.replace(options, implementation=kernel.name)
        one = lambda q, k, v, rules: attend(q, k, v, mask=None, bias=None, structure=rules, options=chosen,
                                            rng=None, return_weights=False, sinks=sinks)[0]  # fmt: skip
        return jax.vmap(one)(q, k, v, structure)
    if batch == 0 or length_q == 0 or length_k == 0:
        return jnp.zeros_like(q)
    return kernel.run(q, k, v, structure=structure, options=options, sinks=sinks)


def zero_unseen_keys(k: Array, v: Array, structure: Structure, length_q: int) -> tuple[Array, Array]:
    """`[Lk, Hkv, Dh]` keys and values with the ones no query may see (by the structure) zeroed.
    O(Lk) to decide; a no-op for a structure that hides nothing."""
    if structure.is_trivial:
        return k, v
    seen = structure.key_seen_by_any(length_q, k.shape[0])[:, None, None]  # [Lk, 1, 1]
    return jnp.where(seen, k, 0), jnp.where(seen, v, 0)


__all__ = [
    "BLOCKWISE_MIN_PAIRS",
    "KERNELS",
    "SCAN_MAX_NEW",
    "Kernel",
    "Request",
    "attend",
    "attend_batch",
    "choose",
]
