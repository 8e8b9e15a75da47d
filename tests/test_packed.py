"""Packed sequences and the mask rules modern models use: segment ids, chunked attention,
prefix-LM, composed with causal, window, kv_length and q_offset.

- Structure's dense form equals the float64 spec's (`tests/reference.py`, written from the
  definitions), and its ranges hold what they promise against brute force: "some" ranges
  contain every visible key or row, "every" ranges only fully visible ones, and one row's
  range is exactly its visible keys (segment ids in order).
- Every kernel that takes the rules equals the spec (forward; blockwise gradients equal the
  reference's), on hypothesis-drawn layouts: empty and one-token segments, segments that
  cross every block boundary, ids out of order, rows that see nothing.
- A packed row equals its documents run separately, RoPE positions restarting per document.
- The blockwise kernel skips what no pair may see: 8 packed documents of 512 cost 8 calls.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import mha_jax as mj
from mha_jax import kernels
from mha_jax.kernels import blockwise
from mha_jax.masks import Structure
from tests.reference import core_np, visible_np
from tests.test_implementations import core

SCALE = float(os.environ.get("MHA_JAX_EXAMPLES", "1"))


@st.composite
def segment_layouts(draw, length: int):
    """`[L]` int segment ids: documents in order (runs of any length, one-token ones, a long
    one), or ids out of order (still runs), or any ids at all."""
    kind = draw(st.sampled_from(["runs", "runs", "out_of_order", "any"]))
    if kind == "any" or length == 0:
        return np.array(draw(st.lists(st.integers(0, 3), min_size=length, max_size=length)), np.int32)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(length - 1, 1)), max_size=6))))
    ids = np.zeros(length, np.int32)
    for number, cut in enumerate(cuts, 1):
        ids[cut:] = number
    if kind == "out_of_order":  # the same runs, renumbered
        ids = np.array(draw(st.permutations(list(range(len(cuts) + 1)))), np.int32)[ids]
    return ids


@st.composite
def structures(draw, length_q: int, length_k: int):
    """Every rule, each maybe absent; segment ids for self-attention-like pairs."""
    is_causal = draw(st.booleans())
    rules = dict(
        is_causal=is_causal,
        q_offset=draw(st.integers(-4, 10)),
        kv_length=draw(st.none() | st.integers(0, length_k)),
        window=draw(st.none() | st.tuples(st.integers(0, 12), st.integers(0, 12))),
        chunk=draw(st.none() | st.integers(1, 9)),
        prefix=draw(st.none() | st.integers(0, length_k)) if is_causal else None,
    )
    if draw(st.booleans()):
        q_seg = draw(segment_layouts(length_q))
        same = length_q == length_k and draw(st.booleans())
        kv_seg = q_seg if same else draw(segment_layouts(length_k))
        rules["segment_ids"] = (q_seg, kv_seg)
    return rules


def spec_mask(rules, length_q, length_k):
    return visible_np(length_q, length_k, num_heads=1, **rules)[0]


def as_structure(rules) -> Structure:
    arrays = {k: v for k, v in rules.items() if k not in ("is_causal", "window", "chunk", "q_offset")}
    if "segment_ids" in arrays:
        arrays["segment_ids"] = tuple(jnp.asarray(a) for a in arrays["segment_ids"])
    return Structure(is_causal=rules["is_causal"], q_offset=rules["q_offset"], window=rules["window"],
                     chunk=rules["chunk"], **{k: v for k, v in arrays.items() if v is not None})  # fmt: skip


def in_order(rules) -> bool:
    """Segment ids absent or non-decreasing on both sides: the ranges are then exact."""
    ids = rules.get("segment_ids")
    return ids is None or all(bool(np.all(np.diff(a) >= 0)) for a in ids)


# ---------------------------------------------------------------------------
# Structure: the dense form and the ranges


@st.composite
def range_problems(draw):
    length_q, length_k = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return length_q, length_k, draw(structures(length_q, length_k)), draw(st.integers(0, 2**16))


@settings(max_examples=int(60 * SCALE))
@given(range_problems())
def test_structure_dense_form_and_ranges_against_brute_force(problem):
    length_q, length_k, rules, seed = problem
    note(rules)
    dense = spec_mask(rules, length_q, length_k)  # [Lq, Lk]
    structure = as_structure(rules)
    np.testing.assert_array_equal(structure.allows(jnp.arange(length_q), jnp.arange(length_k)), dense)

    rng = np.random.default_rng(seed)
    for _ in range(6):  # runs of rows and of keys, of every length
        first, last = sorted(rng.integers(0, length_q, 2))
        rows = dense[first : last + 1]
        lo, hi = map(int, structure.keys_seen(first, last, length_k))
        seen = np.flatnonzero(rows.any(axis=0))
        assert seen.size == 0 or (lo <= seen.min() and seen.max() < hi), (first, last, lo, hi, seen)
        lo, hi = map(int, structure.keys_seen_by_all(first, last, length_k))
        assert rows[:, lo:hi].all(), (first, last, lo, hi)
        first, last = sorted(rng.integers(0, length_k, 2))
        keys = dense[:, first : last + 1]
        lo, hi = map(int, structure.rows_seeing(first, last, length_q))
        seeing = np.flatnonzero(keys.any(axis=1))
        assert seeing.size == 0 or (lo <= seeing.min() and seeing.max() < hi), (first, last, lo, hi)
        lo, hi = map(int, structure.rows_seeing_all(first, last, length_q))
        assert keys[lo:hi].all(), (first, last, lo, hi)
    sees = np.asarray(structure.query_sees_any(length_q, length_k))
    seen = np.asarray(structure.key_seen_by_any(length_q, length_k))
    assert (sees >= dense.any(axis=1)).all() and (seen >= dense.any(axis=0)).all()  # never fewer
    if in_order(rules):  # exact: one row's keys are one interval, and nothing is over-counted
        np.testing.assert_array_equal(sees, dense.any(axis=1))
        np.testing.assert_array_equal(seen, dense.any(axis=0))
        for i in range(length_q):
            lo, hi = map(int, structure.keys_seen(i, i, length_k))
            np.testing.assert_array_equal(np.flatnonzero(dense[i]), np.arange(lo, hi), err_msg=f"row {i}")


# ---------------------------------------------------------------------------
# Every kernel against the spec


@st.composite
def kernel_problems(draw):
    length_q, length_k = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rules = draw(structures(length_q, length_k))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    blocks = (draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16])))
    return length_q, length_k, rules, num_kv_heads, blocks, draw(st.integers(0, 2**16))


@settings(max_examples=int(16 * SCALE))
@given(kernel_problems())
def test_every_kernel_matches_the_spec_with_the_new_rules(problem):
    length_q, length_k, rules, num_kv_heads, blocks, seed = problem
    note(rules)
    rngs = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(rngs[0], (length_q, 2 * num_kv_heads, 8))
    k, v = (jax.random.normal(r, (length_k, num_kv_heads, 8)) for r in rngs[1:3])
    cotangent = jax.random.normal(rngs[3], q.shape)
    expected, _ = core_np(q, k, v, **rules)

    @jax.jit  # one compilation per draw: the three kernels, and two kernels' gradients
    def run(q, k, v, structure):
        call = lambda name: (
            lambda q, k, v: core(
                name, q, k, v, structure=structure, block_sizes=blocks if name == "blockwise" else None
            )
        )
        grad = lambda name: jax.grad(lambda *a: (call(name)(*a) * cotangent).sum(), argnums=(0, 1, 2))(
            q, k, v
        )
        return (
            {n: call(n)(q, k, v) for n in ("reference", "blockwise", "xla")},
            grad("reference"),
            grad("blockwise"),
        )

    outs, reference_grads, blockwise_grads = run(q, k, v, as_structure(rules))
    for name, got in outs.items():
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=name)
    chex.assert_trees_all_close(blockwise_grads, reference_grads, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# A packed row equals its documents run alone


def test_a_packed_row_equals_its_documents_run_alone():
    """Three documents (5, 1 and 10 tokens) and 2 tokens of padding in one row: causal within
    each, RoPE positions restarting at each; forward and gradients, on the default path and
    the blockwise kernel."""
    lengths, d_model, heads = (5, 1, 10), 16, 4
    params = mj.init_params(jax.random.PRNGKey(0), d_model, heads, num_kv_heads=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 18, d_model))
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(2, 9)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(2, int)])[None]
    rope = mj.RoPE(theta=100.0)
    starts = np.cumsum((0,) + lengths)
    for implementation in ("auto", "blockwise", "reference"):
        options = mj.Options(rope=rope, implementation=implementation)

        def packed(params, x, options=options):
            structure = Structure(is_causal=True, segment_ids=jnp.asarray(ids), kv_length=jnp.array([16]))
            return mj.batched_attention(params, x, num_heads=heads, structure=structure, options=options,
                                        positions=jnp.asarray(positions))  # fmt: skip

        def alone(params, x, options=options):
            docs = [mj.batched_attention(params, x[:, a:b], num_heads=heads, is_causal=True, options=options)
                    for a, b in zip(starts[:-1], starts[1:], strict=True)]  # fmt: skip
            return jnp.concatenate(docs, axis=1)

        np.testing.assert_allclose(packed(params, x)[:, :16], alone(params, x), rtol=1e-5, atol=1e-5)
        loss = lambda f: lambda params, x: (f(params, x)[:, :16] ** 2).sum()
        grads = [jax.grad(loss(f), argnums=(0, 1))(params, x) for f in (packed, alone)]
        chex.assert_trees_all_close(*grads, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# The blockwise kernel skips what no pair may see


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_eight_packed_documents_cost_eight_separate_calls(is_causal):
    """A row of 8 documents of 512 at L=4096: the tiles the kernel computes cover the same
    area as 8 separate L=512 calls (where a dense mask would cost the full 4096²)."""
    ids = jnp.repeat(jnp.arange(8), 512)
    packed = Structure(is_causal=is_causal, segment_ids=ids)
    area = lambda structure, length: (
        int(blockwise.visited_blocks(structure, length, length))
        * np.prod(blockwise.default_block_sizes(length, length))
    )
    separate = 8 * area(Structure(is_causal=is_causal), 512)
    assert area(packed, 4096) == separate
    assert area(Structure(is_causal=is_causal), 4096) >= 4 * separate  # what segment ids save


def test_segment_ids_out_of_order_are_still_right_without_the_skip():
    """Ids that are not non-decreasing (documents [2, 0, 1]): the ranges fall back to the
    widest, so the kernel visits every block and the dense mask decides."""
    ids = jnp.repeat(jnp.array([2, 0, 1]), 16)
    structure = Structure(is_causal=True, segment_ids=ids)
    q = jax.random.normal(jax.random.PRNGKey(2), (48, 2, 8))
    expected, _ = core_np(q, q, q, is_causal=True, segment_ids=np.asarray(ids))
    got = mj.blockwise_attention(q, q, q, structure=structure, block_sizes=(8, 8))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    ordered = Structure(is_causal=True, segment_ids=jnp.repeat(jnp.arange(3), 16))
    assert int(blockwise.visited_blocks(structure, 48, 48, (8, 8))) > int(
        blockwise.visited_blocks(ordered, 48, 48, (8, 8))
    )


# ---------------------------------------------------------------------------
# Bad input for every new argument

B, L, D, H = 2, 6, 8, 2
PARAMS = mj.init_params(jax.random.PRNGKey(0), D, H)
X = jnp.ones((B, L, D))
ROPE = mj.Options(rope=mj.RoPE())
BAD = [
    ("segment_ids_float", dict(structure=Structure(segment_ids=jnp.ones((B, L)))), TypeError,
     r"segment_ids must have an integer dtype; got float32"),
    ("segment_ids_length", dict(structure=Structure(segment_ids=jnp.ones((B, L + 1), int))), ValueError,
     r"segment_ids must have shape \[B, Lq\]=\(2, 6\); got shape \(2, 7\)"),
    ("segment_ids_unbatched", dict(structure=Structure(segment_ids=jnp.ones((L,), int))), ValueError,
     r"segment_ids must have shape \[B, Lq\]"),
    ("segment_ids_triple", dict(structure=Structure(segment_ids=(jnp.ones((B, L), int),) * 3)), ValueError,
     r"segment_ids must be one int array, or a pair"),
    ("chunk_zero", dict(structure=Structure(chunk=0)), ValueError, r"chunk must be a positive int"),
    ("chunk_negative", dict(structure=Structure(chunk=-2)), ValueError, r"chunk must be a positive int"),
    ("chunk_float", dict(structure=Structure(chunk=2.0)), ValueError, r"chunk must be a positive int"),
    ("prefix_beyond_l", dict(structure=Structure(is_causal=True, prefix=L + 1)), ValueError,
     r"prefix must lie in \[0, Lk=6\]; got \[7\]"),
    ("prefix_negative", dict(structure=Structure(is_causal=True, prefix=jnp.array([1, -1]))), ValueError,
     r"prefix must lie in \[0, Lk=6\]; got \[-1\]"),
    ("prefix_without_causal", dict(structure=Structure(prefix=2)), ValueError,
     r"prefix must come with is_causal=True"),
    ("prefix_float", dict(structure=Structure(is_causal=True, prefix=jnp.array(1.5))), TypeError,
     r"prefix must have an integer dtype"),
    ("positions_shape", dict(positions=jnp.zeros((B, L + 1), int), options=ROPE), ValueError,
     r"positions must have shape \[B, Lq\]=\(2, 6\) or \[1, Lq\]=\(1, 6\); got shape \(2, 7\)"),
    ("positions_float", dict(positions=jnp.zeros((B, L)), options=ROPE), TypeError,
     r"positions must have an integer dtype"),
    ("positions_without_rope", dict(positions=jnp.zeros((B, L), int)), ValueError,
     r"positions must come with options.rope"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, exception, message", [r[1:] for r in BAD], ids=[r[0] for r in BAD])
def test_bad_new_arguments_are_named(kwargs, exception, message):
    with pytest.raises(exception, match=message):
        mj.batched_attention(PARAMS, X, num_heads=H, **kwargs)


def test_one_segment_array_for_cross_attention_is_refused():
    with pytest.raises(ValueError, match=r"segment_ids must be a pair \(\[Lq\], \[Lk\]\) when Lq != Lk"):
        mj.attention(PARAMS, X[0], X[0, :4], num_heads=H, structure=Structure(segment_ids=jnp.zeros(L, int)))


@pytest.mark.parametrize("rule", [dict(segment_ids=jnp.zeros(1024, int)), dict(chunk=64), dict(prefix=8)])
def test_the_library_kernels_refuse_the_new_rules_and_auto_picks_blockwise(rule):
    """cuDNN and Pallas take none of them (but Pallas's GPU kernel takes one segment_ids array):
    on a GPU or TPU "auto" must not pick a kernel that would drop the rule, and asking for one
    by name says why."""
    from tests.test_implementations import request

    for backend, kernel in (("gpu", "cudnn"), ("tpu", "pallas")):
        asked = request(
            1024, backend=backend, dtype=jnp.bfloat16, structure=Structure(is_causal=True, **rule)
        )
        triton = backend == "gpu" and "segment_ids" in rule  # tests/test_implementations.py checks it
        assert kernels.choose("auto", asked).name == ("pallas" if triton else "blockwise")
        with pytest.raises(ValueError, match=rf'implementation="{kernel}" cannot take {next(iter(rule))}'):
            kernels.choose(kernel, asked)
