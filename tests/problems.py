"""What the score-option tests share: the hypothesis draw of a problem (shapes, GQA, the
position rules, q, k, v), and decoding checked against one uncached call.

`draw_problem(draw)` gives a dict with q `[Lq, H, Dh]`, k and v `[Lk, Hkv, Dh]` (float32
NumPy), `rules` (keywords of `Structure` and of the spec's `core_np`), a soft-cap or None,
sinks or None, block sizes for the blockwise kernel, a cotangent like q, and the `rng` it
drew them from (for the caller's own arrays).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import mha_jax as mj
from mha_jax import kernels
from mha_jax.decoding import cached_attention, init_cache


def draw_problem(draw, *, max_length=24, groups=(1, 2)):
    length_q, length_k = draw(st.integers(1, max_length)), draw(st.integers(1, max_length))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    num_heads = num_kv_heads * draw(st.sampled_from(groups))
    rules = dict(
        is_causal=draw(st.booleans()),
        q_offset=draw(st.integers(0, 8)),
        kv_length=draw(st.none() | st.integers(1, length_k)),
        window=draw(st.none() | st.tuples(st.integers(0, 6), st.integers(0, 6))),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shapes = ((length_q, num_heads), (length_k, num_kv_heads), (length_k, num_kv_heads))
    q, k, v = (rng.standard_normal((length, heads, 8)).astype(np.float32) for length, heads in shapes)
    return dict(
        q=q, k=k, v=v, rules=rules, rng=rng,
        softcap=draw(st.none() | st.just(3.0)),
        sinks=rng.standard_normal(num_heads).astype(np.float32) if draw(st.booleans()) else None,
        blocks=(draw(st.sampled_from([4, 8])), draw(st.sampled_from([4, 8]))),
        cotangent=rng.standard_normal(q.shape).astype(np.float32),
    )  # fmt: skip


def kernel_call(name, q, k, v, *, structure, options, sinks=None, bias=None, block_sizes=None):
    """One example through kernel `name`: blockwise through its public call (with
    `block_sizes`), the others through `kernels.attend`."""
    options = dataclasses.replace(options, implementation=name)
    if name == "blockwise":
        return mj.blockwise_attention(q, k, v, bias=bias, structure=structure, options=options, sinks=sinks,
                                      block_sizes=block_sizes)  # fmt: skip
    return kernels.attend(q, k, v, mask=None, bias=bias, structure=structure, options=options, rng=None,
                          return_weights=False, sinks=sinks)[0]  # fmt: skip


def assert_decoding_equals(full, params, x, *, num_heads, prompt=5, **settings):
    """`cached_attention(..., **settings)` over `x [B, L, D]`, a prompt of `prompt` rows and
    then one token a step, gives each step the rows `full [B, L, D_out]` (one uncached causal
    call over the whole sequence) holds: the cache's positions reach the rule or function."""
    batch, total = x.shape[:2]
    head_dim = params.w_q.shape[1] // num_heads
    cache = init_cache(batch, 16, params.w_k.shape[1] // head_dim, head_dim)
    step = jax.jit(lambda x, cache: cached_attention(params, x, cache, num_heads=num_heads, **settings))
    out, cache = step(x[:, :prompt], cache)
    np.testing.assert_allclose(out, full[:, :prompt], atol=2e-5)
    for t in range(prompt, total):
        out, cache = step(x[:, t : t + 1], cache)
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=2e-5, err_msg=f"step at row {t}")


def assert_same_as_built_in(run, built_in: dict, rewritten: dict, *, shape=(24, 4, 8), kv_heads=2):
    """`run(name, q, k, v, **settings)` with the built-in settings and with their rewrite as a
    user function give the same outputs ("reference" and "blockwise") and the same
    gradients of q, k and v (blockwise, its own VJP)."""
    length, heads, width = shape
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((length, kv_heads, width)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    for name in ("reference", "blockwise"):
        want = run(name, q, k, v, **built_in)
        np.testing.assert_allclose(run(name, q, k, v, **rewritten), want, rtol=1e-5, atol=1e-5, err_msg=name)
    grad = lambda settings: jax.grad(
        lambda *a: (run("blockwise", *a, **settings) * cotangent).sum(), argnums=(0, 1, 2)
    )(q, k, v)
    for got, want in zip(grad(rewritten), grad(built_in), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
