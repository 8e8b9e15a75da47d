"""User score functions (`Options(score_mod=fn)`, FlexAttention's `score_mod`).

`fn(score, head, q_idx, kv_idx)` is written for one entry. Against the float64 spec of
tests/reference.py (which applies the same modification written in NumPy), forward and
backward, on hypothesis-drawn shapes and rules, with soft-cap, ALiBi and sinks; gradients of
an array the function closes over (a learnable relative-position table) through the
blockwise kernel's own VJP, against autodiff of the reference kernel and central differences
of the spec; a table that trains; ALiBi, soft-capping and a relative bias rewritten as
score functions equal the built-ins; cached decoding; bad input. The mesh is in
tests/test_parallel.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mha_jax as mj
from mha_jax import alibi
from mha_jax.masks import Structure
from tests.problems import assert_decoding_equals, assert_same_as_built_in, draw_problem, kernel_call
from tests.reference import core_np

WIDTH = 4  # the table's relative distances: -4 ... 4 (clipped)


def relative_bias(table):
    """`score + table[head, clip(q - kv)]`: T5-style learned relative positions."""
    return lambda s, h, q, k: s + table[h, jnp.clip(q - k, -WIDTH, WIDTH) + WIDTH]


def relative_bias_np(table):
    return lambda s, h, q, k: s + np.asarray(table, np.float64)[h, np.clip(q - k, -WIDTH, WIDTH) + WIDTH]


def curved(s, h, q, k):  # nonlinear in the score: its derivative matters
    return jnp.tanh(s) * (2.0 + 0.5 * h) + 0.1 * (k % 3) - 0.05 * (q % 2)


def curved_np(s, h, q, k):
    return np.tanh(s) * (2.0 + 0.5 * h) + 0.1 * (k % 3) - 0.05 * (q % 2)


@st.composite
def problems(draw):
    p = draw_problem(draw, max_length=20)
    table = p["rng"].standard_normal((p["q"].shape[1], 2 * WIDTH + 1)).astype(np.float32)
    return p | dict(kind=draw(st.sampled_from(["table", "curved"])), table=table, alibi=draw(st.booleans()))


def spec(p, q=None, table=None):
    table = p["table"] if table is None else table
    fn = relative_bias_np(table) if p["kind"] == "table" else curved_np
    slopes = alibi.slopes(p["q"].shape[1]) if p["alibi"] else None
    q = p["q"] if q is None else q
    return core_np(q, p["k"], p["v"], softcap=p["softcap"], sinks=p["sinks"], alibi=slopes, score_mod=fn,
                   **p["rules"])[0]  # fmt: skip


def run(p, name, q, k, v, table):
    fn = relative_bias(table) if p["kind"] == "table" else curved
    options = mj.Options(score_mod=fn, softcap=p["softcap"], alibi=p["alibi"])
    sinks = None if p["sinks"] is None else jnp.asarray(p["sinks"])
    return kernel_call(name, q, k, v, structure=Structure(**p["rules"]), options=options, sinks=sinks,
                       block_sizes=p["blocks"])  # fmt: skip


@settings(max_examples=8, deadline=None)
@given(problems())
def test_kernels_equal_the_float64_spec_and_the_closure_gets_its_gradient(p):
    args = tuple(jnp.asarray(p[n]) for n in ("q", "k", "v", "table"))
    want = spec(p)
    grads = {}
    for name in ("reference", "blockwise"):
        np.testing.assert_allclose(jax.jit(lambda *a, name=name: run(p, name, *a))(*args), want,
                                   rtol=2e-5, atol=2e-5)  # fmt: skip
        loss = lambda *a, name=name: jnp.sum(run(p, name, *a) * p["cotangent"])
        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    for got, expected in zip(grads["blockwise"], grads["reference"], strict=True):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
    # The table's and q's gradients against central differences of the float64 spec.
    rng = np.random.default_rng(1)
    for index, name in ((3, "table"), (0, "q")):
        u = rng.standard_normal(p[name].shape)
        f = lambda x, name=name: np.sum(spec(p, **{name: x}) * p["cotangent"])
        numeric = (f(p[name] + 1e-6 * u) - f(p[name] - 1e-6 * u)) / 2e-6
        got = np.sum(np.asarray(grads["blockwise"][index], np.float64) * u)
        assert got == pytest.approx(numeric, rel=1e-3, abs=1e-3), name


def test_a_relative_position_table_trains_through_the_layer():
    """Targets made by a hidden table; a zero table learns it (loss falls 20-fold) with the
    blockwise kernel, and its gradient equals the reference kernel's at every step."""
    num_heads, d_model = 2, 16
    params = mj.init_params(jax.random.PRNGKey(0), d_model, num_heads)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 24, d_model))
    hidden = 2.0 * jax.random.normal(jax.random.PRNGKey(2), (num_heads, 2 * WIDTH + 1))

    def layer(table, implementation):
        options = mj.Options(score_mod=relative_bias(table), implementation=implementation)
        return mj.batched_attention(params, x, num_heads=num_heads, is_causal=True, options=options)

    target = layer(hidden, "reference")
    loss = lambda table, name: jnp.mean((layer(table, name) - target) ** 2)
    step_grads = jax.jit(lambda t: (jax.grad(loss)(t, "blockwise"), jax.grad(loss)(t, "reference")))
    optimizer = optax.adam(0.1)
    table = jnp.zeros_like(hidden)
    state = optimizer.init(table)
    first = float(loss(table, "blockwise"))
    for _ in range(60):
        ours, theirs = step_grads(table)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
        updates, state = optimizer.update(ours, state)
        table = optax.apply_updates(table, updates)
    assert float(loss(table, "blockwise")) < first / 20


@pytest.mark.parametrize("implementation", ["scan", "blockwise"])
def test_cached_decoding_equals_one_uncached_call(implementation):
    """The cache's positions reach the function: a prompt of 5, then 6 single tokens."""
    num_heads, d_model, total = 4, 16, 11
    params = mj.init_params(jax.random.PRNGKey(3), d_model, num_heads, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, total, d_model))
    table = jax.random.normal(jax.random.PRNGKey(5), (num_heads, 2 * WIDTH + 1))
    fn = relative_bias(table)
    full = mj.batched_attention(params, x, num_heads=num_heads, is_causal=True,
                                options=mj.Options(score_mod=fn, implementation="reference"))  # fmt: skip
    options = mj.Options(score_mod=fn, implementation=implementation)
    assert_decoding_equals(full, params, x, num_heads=num_heads, options=options)


def attend(name, q, k, v, *, options=None, bias=None):
    """One causal call of kernel `name` (blockwise on blocks of 8, so tiles are partial)."""
    return kernel_call(name, q, k, v, structure=Structure(is_causal=True), options=options or mj.Options(),
                       bias=bias, block_sizes=(8, 8))  # fmt: skip


SLOPES = jnp.asarray(alibi.slopes(4), jnp.float32)
TABLE = jnp.asarray(np.random.default_rng(3).standard_normal((4, 2 * WIDTH + 1)), jnp.float32)
DISTANCE = np.arange(24)[:, None] - np.arange(24)[None]  # q - k


@pytest.mark.parametrize(
    "built_in, rewritten",
    [
        (dict(options=mj.Options(alibi=True)),
         dict(options=mj.Options(score_mod=lambda s, h, q, k: s + SLOPES[h] * (k - q)))),
        (dict(options=mj.Options(softcap=2.0)),
         dict(options=mj.Options(score_mod=lambda s, h, q, k: 2.0 * jnp.tanh(s / 2.0)))),
        (dict(bias=TABLE[:, np.clip(DISTANCE, -WIDTH, WIDTH) + WIDTH]),  # the table as a dense bias
         dict(options=mj.Options(score_mod=relative_bias(TABLE)))),
    ],
    ids=["alibi", "softcap", "relative bias"],
)  # fmt: skip
def test_a_score_function_equals_the_built_in_it_rewrites(built_in, rewritten):
    assert_same_as_built_in(attend, built_in, rewritten)
