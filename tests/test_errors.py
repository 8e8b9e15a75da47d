"""Bad input raises at trace time, naming the argument, the expectation and what came."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mha_jax as mj
import mha_jax.linen as mlinen
import mha_jax.nnx as mnnx

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
    return lambda: mj.batched_attention(args.pop("params"), args.pop("x_q"), args.pop("x_kv"),
                                        **args)


TABLE = [
    # (id, call, exception, message regex)
    ("d_model_not_divisible", lambda: mj.init_params(jax.random.PRNGKey(0), 10, 3),
     ValueError, r"d_model must be divisible by num_heads=3; got 10"),
    ("heads_not_divisible_by_kv_heads",
     lambda: mj.init_params(jax.random.PRNGKey(0), 12, 4, num_kv_heads=3),
     ValueError, r"num_heads must be divisible by num_kv_heads=3; got 4"),
    ("num_heads_disagrees_with_params", one(num_heads=5),
     ValueError, r"params.w_q.shape\[1\] \(H\*Dh\) must be divisible by num_heads=5; got 12"),
    ("num_heads_not_multiple_of_kv_heads", one(params=BAD_GROUPS),
     ValueError, r"num_heads must be divisible by num_kv_heads=2; got 3"),
    ("x_q_width_disagrees_with_w_q", one(x_q=jnp.ones((Lq, D + 1))),
     ValueError, r"params.w_q must have shape \[D, H\*Dh\]=\(13, \*\); got shape \(12, 12\)"),
    ("x_q_rank", one(x_q=BQ),
     ValueError, r"x_q must have rank 2 \[Lq, D\]; got shape \(2, 5, 12\)"),
    ("x_kv_rank_batched", batched(x_kv=XKV),
     ValueError, r"x_kv must have rank 3 \[B, Lk, D_kv\]; got shape \(7, 12\)"),
    ("x_q_integer", one(x_q=jnp.ones((Lq, D), jnp.int32)),
     TypeError, r"x_q must have a floating dtype; got int32"),
    ("batch_sizes_disagree", batched(x_kv=jnp.ones((B + 1, Lk, D))),
     ValueError, r"x_kv must have the batch size of x_q \(B=2\); got shape \(3, 7, 12\)"),
    ("mask_wrong_shape", one(mask=jnp.ones((Lk, Lq), bool)),
     ValueError, r"mask must have shape \[Lq, Lk\]=\(5, 7\) or \[H, Lq, Lk\]=\(3, 5, 7\); "
                 r"got shape \(7, 5\)"),
    ("mask_wrong_rank", one(mask=jnp.ones((1, 1, Lq, Lk), bool)),
     ValueError, r"mask must have shape \[Lq, Lk\].*got shape \(1, 1, 5, 7\)"),
    ("padding_mask_B_Lk_does_not_broadcast", batched(mask=jnp.ones((B, Lk), bool)),
     ValueError, r"mask must have shape \[B, Lq, Lk\]=\(2, 5, 7\) or .*got shape \(2, 7\)"),
    ("mask_not_bool", one(mask=jnp.ones((Lq, Lk))),
     TypeError, r"mask must have dtype bool \(True = may attend\); got float32"),
    ("bias_wrong_shape", one(bias=jnp.ones((H, Lk, Lq))),
     ValueError, r"bias must have shape \[Lq, Lk\]=\(5, 7\) or \[H, Lq, Lk\]=\(3, 5, 7\)"),
    ("bias_not_float", one(bias=jnp.ones((Lq, Lk), jnp.int32)),
     TypeError, r"bias must have a floating dtype; got int32"),
    ("kv_length_wrong_shape", batched(kv_length=jnp.array([1, 2, 3])),
     ValueError, r"kv_length must have shape \[B\]=\(2,\); got shape \(3,\)"),
    ("kv_length_float", one(kv_length=2.0),
     TypeError, r"kv_length must have an integer dtype; got float"),
    ("q_offset_float", one(q_offset=1.5, is_causal=True),
     TypeError, r"q_offset must have an integer dtype; got float"),
    ("window_negative", one(window=(-1, 2)),
     ValueError, r"window must be non-negative \(left, right\) sizes; got \(-1, 2\)"),
    ("dropout_without_rng", one(dropout_rate=0.1, deterministic=False),
     ValueError, r"rng must be given when dropout_rate > 0 and deterministic=False; got None"),
    ("dropout_rate_out_of_range", one(dropout_rate=1.0, deterministic=False,
                                      rng=jax.random.PRNGKey(0)),
     ValueError, r"dropout_rate must lie in \[0, 1\); got 1.0"),
    ("unknown_implementation", one(implementation="flash"),
     ValueError, r"implementation must be one of \['auto', 'reference', 'blockwise', 'xla', "
                 r"'cudnn', 'pallas'\]; got 'flash'"),
    ("blockwise_cannot_drop_out", one(implementation="blockwise", dropout_rate=0.1,
                                      deterministic=False, rng=jax.random.PRNGKey(0)),
     ValueError, r'implementation="blockwise" cannot apply dropout'),
    ("xla_cannot_return_weights", one(implementation="xla", return_weights=True),
     ValueError, r'implementation="xla" cannot return the attention weights'),
    ("cudnn_needs_gpu", one(implementation="cudnn"),
     ValueError, r"implementation=\"cudnn\" cannot run on backend 'cpu' \(it needs a GPU\); "
                 r"cannot compute in float32"),
    ("pallas_cannot_take_mask", one(implementation="pallas", mask=jnp.ones((Lq, Lk), bool)),
     ValueError, r'implementation="pallas" cannot take a mask or bias array'),
    ("nnx_in_features_not_divisible", lambda: mnnx.MultiHeadAttention(10, 3, rngs=nnx.Rngs(0)),
     ValueError, r"d_model must be divisible by num_heads=3; got 10"),
    ("linen_rank_4_input",
     lambda: mlinen.MultiHeadAttention(H).init(jax.random.PRNGKey(0), jnp.ones((1, B, Lq, D))),
     ValueError, r"x_q must have rank 3 \[B, Lq, D\] or rank 2 \[Lq, D\]; got shape"),
    ("linen_dropout_without_deterministic",
     lambda: mlinen.MultiHeadAttention(H, dropout_rate=0.1).init(jax.random.PRNGKey(0), BQ),
     ValueError, r"deterministic must be given to the constructor or the call"),
]


@pytest.mark.parametrize("call, exception, message", [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
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
