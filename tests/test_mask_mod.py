"""Mask functions (`Structure(mask_mod=fn)`, FlexAttention's `mask_mod`).

`fn(head, q_idx, kv_idx) -> bool`, written for one entry, joins the other rules. Against the
float64 spec of tests/reference.py (which calls the same rule written in Python), forward and
backward, on hypothesis-drawn shapes and rules, per-head rules and rules that close over
per-document data; the block table (empty / partial / full tiles) against one counted by
hand; the public batched call; causal, window, chunked and document masks rewritten as
functions equal the built-in rules; cached decoding. The mesh is in tests/test_parallel.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mha_jax as mj
from mha_jax import kernels
from mha_jax.kernels import blockwise
from mha_jax.masks import Structure
from tests.problems import assert_decoding_equals, assert_same_as_built_in, draw_problem, kernel_call
from tests.reference import attention_np, core_np

DOCUMENTS = np.repeat(np.arange(8), [3, 9, 1, 6, 12, 2, 7, 40])  # ids of positions 0 ... 79


def rule(kind):
    """(the JAX rule, the same rule in Python)."""
    if kind == "documents":  # closes over per-position data
        ids = jnp.asarray(DOCUMENTS)
        return (lambda h, q, k: ids[q] == ids[k]), (lambda h, q, k: DOCUMENTS[q] == DOCUMENTS[k])
    if kind == "per head":  # head h sees keys at most 2 + 3h behind, and none 1 ahead
        return (lambda h, q, k: (q - k <= 2 + 3 * h) & (k - q != 1)), (
            lambda h, q, k: q - k <= 2 + 3 * h and k - q != 1
        )
    return (lambda h, q, k: (q + k) % 3 != 0), (lambda h, q, k: (q + k) % 3 != 0)  # "scattered"


@st.composite
def problems(draw):
    return draw_problem(draw) | dict(kind=draw(st.sampled_from(["documents", "per head", "scattered"])))


def run(p, name, q, k, v):
    fn, _ = rule(p["kind"])
    sinks = None if p["sinks"] is None else jnp.asarray(p["sinks"])
    structure = Structure(mask_mod=fn, **p["rules"])
    return kernel_call(name, q, k, v, structure=structure, options=mj.Options(softcap=p["softcap"]),
                       sinks=sinks, block_sizes=p["blocks"])  # fmt: skip


@settings(max_examples=10, deadline=None)
@given(problems())
def test_kernels_equal_the_float64_spec_forward_and_backward(p):
    _, python_rule = rule(p["kind"])
    want, _ = core_np(p["q"], p["k"], p["v"], softcap=p["softcap"], sinks=p["sinks"], mask_mod=python_rule,
                      **p["rules"])  # fmt: skip
    args = tuple(jnp.asarray(p[n]) for n in ("q", "k", "v"))
    grads = {}
    for name in ("reference", "blockwise"):
        got = jax.jit(lambda *a, name=name: run(p, name, *a))(*args)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        loss = lambda *a, name=name: jnp.sum(run(p, name, *a) * p["cotangent"])
        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    for got, expected in zip(grads["blockwise"], grads["reference"], strict=True):
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


def test_the_block_table_marks_empty_partial_and_full_tiles():
    """Documents of 8, 16 and 8 positions on blocks of 8 (and a causal rule beside them): the
    tiles inside a document are full, across documents empty; known at trace time."""
    ids = np.repeat([0, 1, 2], [8, 16, 16])  # (past 32: the shifted rows' last block)
    documents = Structure(mask_mod=lambda h, q, k: jnp.asarray(ids)[q] == jnp.asarray(ids)[k])
    config = blockwise.Config(8, 8, 32, 32, 1.0)
    tiles = jax.jit(lambda: blockwise.mask_mod_blocks(documents, 2, config))()
    want = np.array([[2, 0, 0, 0], [0, 2, 2, 0], [0, 2, 2, 0], [0, 0, 0, 2]])
    np.testing.assert_array_equal(tiles, want)
    # A document boundary inside a tile makes it partial.
    shifted = Structure(mask_mod=lambda h, q, k: jnp.asarray(ids)[q] == jnp.asarray(ids)[k], q_offset=4)
    config = blockwise.Config(8, 8, 28, 32, 1.0)
    tiles = blockwise.mask_mod_blocks(shifted, 1, config)  # rows at positions 4 ... 35
    np.testing.assert_array_equal(tiles, [[1, 1, 1, 0], [0, 2, 2, 0], [0, 1, 1, 1], [0, 0, 0, 2]])
    traced = {}

    def inside(q):  # the table of a rule on Python-int positions is a constant, not a tracer
        traced["table"] = blockwise.mask_mod_blocks(documents, 1, blockwise.Config(8, 8, 32, 32, 1.0))
        return q

    jax.jit(inside)(jnp.zeros(1))
    assert not isinstance(traced["table"], jax.core.Tracer)


def test_the_public_call_takes_a_mask_mod_with_the_other_rules():
    """batched_attention: a causal, padded batch whose documents are a mask function."""
    num_heads, d_model = 4, 16
    params = mj.init_params(jax.random.PRNGKey(0), d_model, num_heads, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 40, d_model))
    fn, python_rule = rule("documents")
    lengths = jnp.array([40, 29])
    for implementation in ("auto", "blockwise", "reference"):
        options = mj.Options(implementation=implementation)
        structure = Structure(is_causal=True, kv_length=lengths, mask_mod=fn)
        got = mj.batched_attention(params, x, num_heads=num_heads, options=options, structure=structure)
        for b, length in enumerate((40, 29)):
            want, _ = attention_np(params, x[b], num_heads=num_heads, is_causal=True, kv_length=length,
                                   mask_mod=python_rule)  # fmt: skip
            np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5, err_msg=implementation)


def test_xla_takes_it_densely_and_the_fused_library_kernels_refuse_it_by_name():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((12, 4, 8)).astype(np.float32) for _ in range(3))
    fn, python_rule = rule("per head")
    got = kernels.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=None, bias=None,
                         structure=Structure(mask_mod=fn), options=mj.Options(implementation="xla"), rng=None,
                         return_weights=False)[0]  # fmt: skip
    np.testing.assert_allclose(got, core_np(q, k, v, mask_mod=python_rule)[0], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r'implementation="pallas" cannot .*take mask_mod'):
        kernels.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=None, bias=None,
                       structure=Structure(mask_mod=fn), options=mj.Options(implementation="pallas"),
                       rng=None, return_weights=False)  # fmt: skip


@pytest.mark.parametrize("implementation", ["scan", "blockwise", "auto"])
def test_cached_decoding_equals_one_uncached_call(implementation):
    """`cached_attention(mask_mod=...)`: the function sees the cache's slots, a prompt of 5
    then one token a step; per head and with closed-over per-position data."""
    num_heads, d_model = 4, 16
    params = mj.init_params(jax.random.PRNGKey(3), d_model, num_heads, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 11, d_model))
    ids = jnp.asarray(DOCUMENTS)
    fn = lambda h, q, k: (ids[q] == ids[k]) | (q - k <= h)  # documents, and h + 1 keys back for head h
    reference = mj.Options(implementation="reference")
    full = mj.batched_attention(params, x, num_heads=num_heads, options=reference,
                                structure=Structure(is_causal=True, mask_mod=fn))  # fmt: skip
    assert_decoding_equals(full, params, x, num_heads=num_heads, mask_mod=fn, implementation=implementation)


def attend(name, q, k, v, *, structure):
    """Kernel `name` under `structure` (blockwise on blocks of 8: partial and empty tiles)."""
    return kernel_call(name, q, k, v, structure=structure, options=mj.Options(), block_sizes=(8, 8))


IDS = jnp.asarray(DOCUMENTS[:24])


@pytest.mark.parametrize(
    "built_in, fn",
    [
        (Structure(is_causal=True), lambda h, q, k: q >= k),
        (Structure(window=(3, 1)), lambda h, q, k: (q - k <= 3) & (k - q <= 1)),
        (Structure(is_causal=True, chunk=5), lambda h, q, k: (q >= k) & (q // 5 == k // 5)),
        (Structure(segment_ids=IDS), lambda h, q, k: IDS[q] == IDS[k]),
    ],
    ids=["causal", "sliding window", "chunked", "documents"],
)
def test_a_mask_function_equals_the_built_in_rule_it_rewrites(built_in, fn):
    assert_same_as_built_in(attend, dict(structure=built_in), dict(structure=Structure(mask_mod=fn)))
