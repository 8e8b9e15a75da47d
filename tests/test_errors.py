"""Bad input raises at trace time, naming the argument, the expectation and what came."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mha_jax as mj
import mha_jax.interop
import mha_jax.linen as mlinen
import mha_jax.nnx as mnnx
from mha_jax import decoding

B, Lq, Lk, D, H, Dh = 2, 5, 7, 12, 3, 4
PARAMS = mj.init_params(jax.random.PRNGKey(0), D, H)
# 3 query heads of 4 against 2 kv heads of 4: 3 % 2 != 0
BAD_GROUPS = PARAMS._replace(w_k=jnp.ones((D, 8)), b_k=None, w_v=jnp.ones((D, 8)), b_v=None)
XQ, XKV = jnp.ones((Lq, D)), jnp.ones((Lk, D))
BQ, BKV = jnp.ones((B, Lq, D)), jnp.ones((B, Lk, D))


def one(**kw):
    args = dict(params=PARAMS, x_q=XQ, x_kv=XKV, num_heads=H) | kw
    return lambda: mj.attention(args.pop("params"), args.pop("x_q"), args.pop("x_kv"), **args)


def batched(**kw):
    args = dict(params=PARAMS, x_q=BQ, x_kv=BKV, num_heads=H) | kw
    return lambda: mj.batched_attention(args.pop("params"), args.pop("x_q"), args.pop("x_kv"), **args)


TABLE = [
    # (id, call, exception, message regex)
    (
        "d_model_not_divisible",
        lambda: mj.init_params(jax.random.PRNGKey(0), 10, 3),
        ValueError,
        r"d_model must be divisible by num_heads=3; got 10",
    ),
    (
        "heads_not_divisible_by_kv_heads",
        lambda: mj.init_params(jax.random.PRNGKey(0), 12, 4, num_kv_heads=3),
        ValueError,
        r"num_heads must be divisible by num_kv_heads=3; got 4",
    ),
    (
        "num_heads_disagrees_with_params",
        one(num_heads=5),
        ValueError,
        r"params.w_q.shape\[1\] \(H\*Dh\) must be divisible by num_heads=5; got 12",
    ),
    (
        "num_heads_not_multiple_of_kv_heads",
        one(params=BAD_GROUPS),
        ValueError,
        r"num_heads must be divisible by num_kv_heads=2; got 3",
    ),
    (
        "x_q_width_disagrees_with_w_q",
        one(x_q=jnp.ones((Lq, D + 1))),
        ValueError,
        r"params.w_q must have shape \[D, H\*Dh\]=\(13, \*\); got shape \(12, 12\)",
    ),
    ("x_q_rank", one(x_q=BQ), ValueError, r"x_q must have rank 2 \[Lq, D\]; got shape \(2, 5, 12\)"),
    (
        "x_kv_rank_batched",
        batched(x_kv=XKV),
        ValueError,
        r"x_kv must have rank 3 \[B, Lk, D_kv\]; got shape \(7, 12\)",
    ),
    (
        "x_q_integer",
        one(x_q=jnp.ones((Lq, D), jnp.int32)),
        TypeError,
        r"x_q must have a floating dtype; got int32",
    ),
    (
        "batch_sizes_disagree",
        batched(x_kv=jnp.ones((B + 1, Lk, D))),
        ValueError,
        r"x_kv must have the batch size of x_q \(B=2\); got shape \(3, 7, 12\)",
    ),
    (
        "mask_wrong_shape",
        one(mask=jnp.ones((Lk, Lq), bool)),
        ValueError,
        r"mask must have shape \[Lq, Lk\]=\(5, 7\) or \[H, Lq, Lk\]=\(3, 5, 7\); "
        r"got shape \(7, 5\)",
    ),
    (
        "mask_wrong_rank",
        one(mask=jnp.ones((1, 1, Lq, Lk), bool)),
        ValueError,
        r"mask must have shape \[Lq, Lk\].*got shape \(1, 1, 5, 7\)",
    ),
    (
        "padding_mask_B_Lk_does_not_broadcast",
        batched(mask=jnp.ones((B, Lk), bool)),
        ValueError,
        r"mask must have shape \[B, Lq, Lk\]=\(2, 5, 7\) or .*got shape \(2, 7\)",
    ),
    (
        "mask_not_bool",
        one(mask=jnp.ones((Lq, Lk))),
        TypeError,
        r"mask must have dtype bool \(True = may attend\); got float32",
    ),
    (
        "bias_wrong_shape",
        one(bias=jnp.ones((H, Lk, Lq))),
        ValueError,
        r"bias must have shape \[Lq, Lk\]=\(5, 7\) or \[H, Lq, Lk\]=\(3, 5, 7\)",
    ),
    (
        "bias_not_float",
        one(bias=jnp.ones((Lq, Lk), jnp.int32)),
        TypeError,
        r"bias must have a floating dtype; got int32",
    ),
    (
        "kv_length_wrong_shape",
        batched(kv_length=jnp.array([1, 2, 3])),
        ValueError,
        r"kv_length must have shape \[B\]=\(2,\); got shape \(3,\)",
    ),
    ("kv_length_float", one(kv_length=2.0), TypeError, r"kv_length must have an integer dtype; got float"),
    (
        "q_offset_float",
        one(q_offset=1.5, is_causal=True),
        TypeError,
        r"q_offset must have an integer dtype; got float",
    ),
    (
        "window_negative",
        one(window=(-1, 2)),
        ValueError,
        r"window must be non-negative \(left, right\) sizes; got \(-1, 2\)",
    ),
    (
        "dropout_without_rng",
        one(dropout_rate=0.1, deterministic=False),
        ValueError,
        r"rng must be given when dropout_rate > 0 and deterministic=False; got None",
    ),
    (
        "dropout_rate_out_of_range",
        one(dropout_rate=1.0, deterministic=False, rng=jax.random.PRNGKey(0)),
        ValueError,
        r"dropout_rate must lie in \[0, 1\); got 1.0",
    ),
    (
        "unknown_implementation",
        one(implementation="flash"),
        ValueError,
        r"implementation must be one of \['auto', 'reference', 'blockwise', 'xla', "
        r"'cudnn', 'pallas', 'scan'\]; got 'flash'",
    ),
    (
        "blockwise_cannot_drop_out",
        one(implementation="blockwise", dropout_rate=0.1, deterministic=False, rng=jax.random.PRNGKey(0)),
        ValueError,
        r'implementation="blockwise" cannot apply dropout',
    ),
    (
        "xla_cannot_return_weights",
        one(implementation="xla", return_weights=True),
        ValueError,
        r'implementation="xla" cannot return the attention weights',
    ),
    (
        "cudnn_needs_gpu",
        one(implementation="cudnn"),
        ValueError,
        r"implementation=\"cudnn\" cannot run on backend 'cpu' \(it needs a GPU\); "
        r"cannot compute in float32",
    ),
    (
        "pallas_cannot_take_mask",
        one(implementation="pallas", mask=jnp.ones((Lq, Lk), bool)),
        ValueError,
        r'implementation="pallas" cannot take a mask or bias array',
    ),
    # found by the adversarial run: accepted silently, or refused without the argument's name
    ("num_heads_bool", one(num_heads=True), ValueError, r"num_heads must be a positive integer; got True"),
    ("scale_string", one(scale="0.5"), TypeError, r"scale must be a finite real number or None; got '0.5'"),
    ("scale_nan", one(scale=float("nan")), TypeError, r"scale must be a finite real number or None; got nan"),
    (
        "params_as_dict",
        one(params=PARAMS._asdict()),
        TypeError,
        r"params must be an mha_jax.MHAParams \(e.g. MHAParams\(\*\*weights\) for a dict\); "
        r"got dict",
    ),
    (
        "window_one_element",
        one(window=(1,)),
        ValueError,
        r"window must be an int or a \(left, right\) pair of ints; got \(1,\)",
    ),
    (
        "window_float",
        one(window=(1.5, 2)),
        ValueError,
        r"window must be an int or a \(left, right\) pair of ints; got \(1.5, 2\)",
    ),
    ("dtype_integer", one(dtype=jnp.int32), TypeError, r"dtype must be a floating dtype or None; got int32"),
    (
        "dtype_nonsense",
        one(dtype="float3"),
        TypeError,
        r"dtype must be a floating dtype or None; got 'float3'",
    ),
    ("is_causal_string", one(is_causal="yes"), TypeError, r"is_causal must be a Python bool; got 'yes'"),
    (
        "return_weights_array",
        one(return_weights=jnp.array(True)),
        TypeError,
        r"return_weights must be a Python bool; got",
    ),
    (
        "softcap_zero",
        lambda: mj.Options(softcap=0.0),
        ValueError,
        r"softcap must be a positive finite number or None; got 0.0",
    ),
    (
        "xla_cannot_soft_cap",
        lambda: one(options=mj.Options(implementation="xla", softcap=30.0))(),
        ValueError,
        r'implementation="xla" cannot apply a logit soft-cap',
    ),
    (
        "xla_cannot_add_sinks",
        lambda: one(params=PARAMS._replace(sinks=jnp.zeros(H)), implementation="xla")(),
        ValueError,
        r'implementation="xla" cannot add attention sinks \(params.sinks\)',
    ),
    (
        "xla_cannot_add_alibi",
        lambda: one(options=mj.Options(implementation="xla", alibi=True))(),
        ValueError,
        r'implementation="xla" cannot add ALiBi\'s position bias \(alibi\)',
    ),
    (
        "alibi_string",
        lambda: mj.Options(alibi="bloom"),
        ValueError,
        r"alibi must be True, False or a positive head count; got 'bloom'",
    ),
    (
        "alibi_zero_heads",
        lambda: mj.Options(alibi=0),
        ValueError,
        r"alibi must be True, False or a positive head count; got 0",
    ),
    (
        "platform_cuda",
        lambda: mj.Options(platform="cuda"),
        ValueError,
        r"platform must be one of \['cpu', 'gpu', 'tpu'\]; got 'cuda'",
    ),
    (
        "compute_capability_string",
        lambda: mj.Options(platform="gpu", compute_capability="9.0"),
        ValueError,
        r"compute_capability must be a pair of ints \(major, minor\) or None; got '9.0'",
    ),
    (
        "compute_capability_on_tpu",
        lambda: mj.Options(platform="tpu", compute_capability=(9, 0)),
        ValueError,
        r"compute_capability must be None for platform 'tpu'; got \(9, 0\)",
    ),
    (
        "cudnn_on_cpu",
        lambda: one(options=mj.Options(implementation="cudnn", platform="cpu"))(),
        ValueError,
        r"implementation=\"cudnn\" cannot .*run on backend 'cpu' \(it needs a GPU\)",
    ),
    (
        "xla_cannot_apply_score_mod",
        lambda: one(options=mj.Options(implementation="xla", score_mod=lambda s, h, q, k: s))(),
        ValueError,
        r'implementation="xla" cannot apply a score function \(score_mod\)',
    ),
    (
        "score_mod_not_a_function",
        lambda: mj.Options(score_mod=0.5),
        TypeError,
        r"score_mod must be a function \(score, head, q_idx, kv_idx\) -> score or None; got 0.5",
    ),
    (
        "mask_mod_not_a_function",
        one(structure=mj.Structure(is_causal=True, mask_mod="documents")),
        TypeError,
        r"mask_mod must be a function \(head, q_idx, kv_idx\) -> bool or None; got 'documents'",
    ),
    (
        "sinks_one_per_kv_head",
        one(params=PARAMS._replace(sinks=jnp.zeros(H + 1))),
        ValueError,
        r"params.sinks must have shape \[H\] \(one logit per query head\)=\(3,\); got shape \(4,\)",
    ),
    (
        "sinks_int",
        one(params=PARAMS._replace(sinks=jnp.zeros(H, jnp.int32))),
        TypeError,
        r"params.sinks must have a floating dtype; got int32",
    ),
    (
        "init_params_sinks_string",
        lambda: mj.init_params(jax.random.PRNGKey(0), D, H, sinks="yes"),
        TypeError,
        r"sinks must be a Python bool; got 'yes'",
    ),
    (
        "export_sinks_to_gpt2",
        lambda: mj.interop.export_params("gpt2", PARAMS._replace(sinks=jnp.zeros(H)), num_heads=H),
        ValueError,
        r"params.sinks must be None for layout 'gpt2' \(it has no place for attention sinks",
    ),
    (
        "block_sizes_zero",
        lambda: mj.blockwise_attention(
            jnp.ones((4, 2, 8)), jnp.ones((4, 2, 8)), jnp.ones((4, 2, 8)), block_sizes=(0, 8)
        ),
        ValueError,
        r"block_sizes must be a pair of positive ints \(block_q, block_k\); got \(0, 8\)",
    ),
    (
        "nnx_in_features_not_divisible",
        lambda: mnnx.MultiHeadAttention(10, 3, rngs=nnx.Rngs(0)),
        ValueError,
        r"d_model must be divisible by num_heads=3; got 10",
    ),
    (
        "linen_rank_4_input",
        lambda: mlinen.MultiHeadAttention(H).init(jax.random.PRNGKey(0), jnp.ones((1, B, Lq, D))),
        ValueError,
        r"x_q must have rank 3 \[B, Lq, D\] or rank 2 \[Lq, D\]; got shape",
    ),
    (
        "linen_dropout_without_deterministic",
        lambda: mlinen.MultiHeadAttention(H, dropout_rate=0.1).init(jax.random.PRNGKey(0), BQ),
        ValueError,
        r"deterministic must be given to the constructor or the call",
    ),
]


@pytest.mark.parametrize(
    "call, exception, message", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_bad_input_is_named(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


def test_errors_raise_at_trace_time_under_jit():
    f = jax.jit(lambda mask: mj.attention(PARAMS, XQ, XKV, num_heads=H, mask=mask))
    with pytest.raises(ValueError, match=r"mask must have shape \[Lq, Lk\]"):
        f(jnp.ones((Lq, Lq), bool))


def test_errors_are_ours_not_vmaps():
    # a [B]-shaped argument of the wrong size must not reach vmap's own message
    with pytest.raises(ValueError, match=r"^q_offset must have shape \[B\]"):
        mj.batched_attention(PARAMS, BQ, BKV, num_heads=H, q_offset=jnp.array([1, 2, 3]))


def test_numpy_integer_window_is_an_int():
    """`window=np.int64(2)` (e.g. read from an array) is the int 2, not an error."""
    np.testing.assert_array_equal(
        mj.attention(PARAMS, XQ, XKV, num_heads=H, window=np.int64(2)),
        mj.attention(PARAMS, XQ, XKV, num_heads=H, window=2),
    )


# The hunt: every argument of `attention`, given something of the wrong kind,
# must raise ValueError or TypeError whose message starts with that argument's
# name (or `params.`): never vmap's, jnp's or an AttributeError.
WRONG = {
    "x_q": [None, "text", jnp.ones((Lq,)), jnp.ones((Lq, D), bool)],
    "x_kv": ["text", jnp.ones((Lk, D, 1)), jnp.ones((Lk, D), jnp.int8)],
    "num_heads": [0, -3, 2.0, "3", None, True],
    "mask": [jnp.ones((Lq, Lk), jnp.int32), jnp.ones((Lq,), bool), jnp.ones((2, Lq, Lk), bool)],
    "bias": [jnp.ones((Lq, Lk), bool), jnp.ones((Lk,)), jnp.ones((H + 1, Lq, Lk))],
    "is_causal": ["yes", 1, None],
    "q_offset": [1.5, jnp.ones((2,), jnp.int32), "1"],
    "kv_length": [2.5, jnp.ones((2,), jnp.int32), "3"],
    "window": [(1,), (1, 2, 3), (-1, 0), "2", 2.5, (1.0, 2.0), True],
    "scale": ["0.5", float("inf"), [0.5], True],
    "dropout_rate": [1.0, -0.1],
    "deterministic": ["no", None],
    "return_weights": ["yes", None],
    "dtype": ["float3", jnp.int32, bool],
    "implementation": ["flash", None, 3],
}


@pytest.mark.parametrize(
    "argument, value",
    [(a, v) for a, values in WRONG.items() for v in values],
    ids=[f"{a}-{i}" for a, values in WRONG.items() for i in range(len(values))],
)
def test_every_wrong_argument_is_named(argument, value):
    kwargs = {"params": PARAMS, "x_q": XQ, "x_kv": XKV, "num_heads": H, argument: value}
    if argument in ("dropout_rate", "deterministic"):
        kwargs |= dict(rng=jax.random.PRNGKey(0))
    if argument == "deterministic":
        kwargs["dropout_rate"] = 0.1
    with pytest.raises((ValueError, TypeError)) as raised:
        mj.attention(kwargs.pop("params"), kwargs.pop("x_q"), kwargs.pop("x_kv"), **kwargs)
    assert str(raised.value).startswith((argument, "params.")), str(raised.value)


# The same hunt over the public helpers and the decoding call: a valid call, then each
# argument swapped for something of the wrong kind. The helpers are called unwrapped from
# the test run's jaxtyping hook (`inspect.unwrap`): the checks a user meets are ours.
Q, K, V = jnp.ones((Lq, 4, Dh)), jnp.ones((Lk, 2, Dh)), jnp.ones((Lk, 2, Dh))
SCORES = jnp.ones((4, Lq, Lk))
CACHE = decoding.init_cache(B, 8, H, Dh)
HELPERS = {  # name: (function, valid arguments, {argument: wrong values})
    "project": (mj.project, dict(x=XQ, w=PARAMS.w_q, b=PARAMS.b_q), {
        "x": [jnp.ones((D,)), jnp.ones((Lq, D + 1))], "w": [jnp.ones((D,)), jnp.ones((D - 1, 3))],
        "b": [jnp.ones((D + 1,))]}),
    "split_heads": (mj.split_heads, dict(x=XQ, num_heads=H), {
        "x": [jnp.ones((D,))], "num_heads": [0, 2.0, None]}),
    "merge_heads": (mj.merge_heads, dict(heads=Q), {"heads": [XQ, jnp.ones((1, 2, 3, 4))]}),
    "project_heads": (mj.project_heads, dict(x=XQ, w=PARAMS.w_q, b=PARAMS.b_q, num_heads=H), {
        "x": [jnp.ones((Lq, D + 1))], "num_heads": [0, 5], "b": [jnp.ones((3,))]}),
    "merge_project": (mj.merge_project, dict(heads=jnp.ones((Lq, H, Dh)), w=PARAMS.w_o, b=PARAMS.b_o), {
        "heads": [XQ, jnp.ones((Lq, H, Dh + 1))], "w": [jnp.ones((D, D, 1))], "b": [jnp.ones((1,))]}),
    "attention_scores": (mj.attention_scores, dict(q=Q, k=K), {
        "q": [Q[0], Q.astype(jnp.int32), jnp.ones((Lq, 4, Dh + 1))],
        "k": [K[0], K.astype(bool), jnp.ones((Lk, 3, Dh))], "scale": ["0.5", float("nan")]}),
    "attention_weights": (mj.attention_weights, dict(scores=SCORES), {
        "scores": [SCORES[0], SCORES.astype(jnp.int32)],
        "mask": [jnp.ones((Lq, Lk)), jnp.ones((Lq, Lk + 1), bool), jnp.ones((3, Lq, Lk), bool)]}),
    "dropout_weights": (mj.dropout_weights, dict(weights=SCORES, rate=0.1, rng=jax.random.PRNGKey(0)), {
        "rate": [1.0, -0.5, float("nan"), "0.1"]}),
    "apply_weights": (mj.apply_weights, dict(weights=SCORES, v=V), {
        "weights": [SCORES[0]], "v": [V[0], jnp.ones((Lk + 1, 2, Dh)), jnp.ones((Lk, 3, Dh))]}),
    "blockwise_attention": (mj.blockwise_attention, dict(q=Q, k=K, v=V), {
        "q": [Q[0], Q.astype(jnp.int32)], "k": [jnp.ones((Lk, 3, Dh)), K[..., :2]],
        "v": [V[:-1], V.astype(jnp.int8)], "mask": [jnp.ones((Lq, Lk)), jnp.ones((Lq, Lk - 1), bool)],
        "bias": [jnp.ones((Lq, Lk), bool), jnp.ones((5, Lq, Lk))], "scale": [float("inf"), "1"],
        "softcap": [0.0, -1.0], "structure": [(True, 0), mj.Structure(q_offset=jnp.array(1.5))],
        "block_sizes": [(0, 8), 8], "sinks": [jnp.zeros(Lq), jnp.zeros(3, jnp.int32)]}),
    "causal_mask": (mj.masks.causal_mask, dict(length_q=Lq), {
        "length_q": [-1, 2.5, None], "length_k": [-3]}),
    "local_mask": (mj.masks.local_mask, dict(length_q=Lq, length_k=Lk, window=2), {
        "length_q": [-1], "length_k": [1.5], "window": [-1, (1,)]}),
    "padding_mask": (mj.masks.padding_mask, dict(kv_lengths=3, length_q=Lq, length_k=Lk), {
        "length_q": [-1], "length_k": ["7"]}),
    "init_cache": (decoding.init_cache, dict(batch=B, capacity=8, num_kv_heads=H, head_dim=Dh), {
        "batch": [0], "capacity": [-8, 2.0], "dtype": [jnp.int32, bool, "text"]}),
    "cached_attention": (decoding.cached_attention, dict(params=PARAMS, x=BQ, cache=CACHE, num_heads=H), {
        "x": [XQ, BQ.astype(jnp.int32)], "cache": [CACHE._replace(k=CACHE.k.astype(jnp.int32)),
        CACHE._replace(length=jnp.array([-1, 0])), CACHE._replace(length=jnp.array([9, 0])), (1, 2, 3)],
        "lengths": [jnp.array([Lq + 1, 0]), jnp.array([-1, 0]), jnp.array([1.0, 2.0]), jnp.ones(3, int)],
        "positions": [jnp.zeros((B,), int), jnp.zeros((B, Lq))], "window": [-1, (1, 2, 3)],
        "check_capacity": ["yes"], "num_heads": [0, 5]}),
}  # fmt: skip


@pytest.mark.parametrize(
    "helper, argument, value",
    [(h, a, v) for h, (_, _, wrong) in HELPERS.items() for a, values in wrong.items() for v in values],
    ids=[
        f"{h}-{a}-{i}"
        for h, (_, _, wrong) in HELPERS.items()
        for a, vs in wrong.items()
        for i in range(len(vs))
    ],
)
def test_every_wrong_argument_of_a_public_helper_is_named(helper, argument, value):
    function, valid, _ = HELPERS[helper]
    function = inspect.unwrap(function)
    function(**valid)  # the valid call runs
    with pytest.raises((ValueError, TypeError)) as raised:
        function(**(valid | {argument: value}))
    subject = str(raised.value).split(" must ")[0]  # what the message says must change
    assert argument in subject.replace(".", " ").split() or subject.startswith("params."), str(raised.value)
