"""Independent float64 NumPy specs of multi-head attention: written from the
formula, sharing nothing with mha_jax but the conventions.

The conventions, in one place: a key is hidden from a query when the mask
says False, when the structure (causal with its prefix, window, kv_length,
chunk, segment ids) rules it out, or when its additive bias is -inf; a query
row with no key left outputs zero heads (zero weights).
"""

from __future__ import annotations

import jax
import numpy as np


def normal(seed, shape, dtype="float32"):
    """Fresh non-zero random inputs (a new seed per test, never zeros)."""
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def visible_np(
    length_q,
    length_k,
    *,
    num_heads,
    mask=None,
    bias=None,
    is_causal=False,
    q_offset=0,
    kv_length=None,
    window=None,
    segment_ids=None,
    chunk=None,
    prefix=None,
    mask_mod=None,
):
    """`[H, Lq, Lk]` bool: may query i see key j in head h? Loops, not tricks.

    Query i sits at position i + q_offset, key j at j. is_causal: j <= position, or j <
    prefix (a bidirectional prefix); chunk: both in the same block of `chunk` positions
    (position // chunk == j // chunk); segment_ids (one array, or a (queries, keys) pair):
    the same id; mask_mod: `f(h, position, j)` is true."""
    if isinstance(window, int):
        window = (window, window)
    if segment_ids is not None and not isinstance(segment_ids, tuple | list):
        segment_ids = (segment_ids, segment_ids)
    allowed = np.ones((num_heads, length_q, length_k), dtype=bool)
    for i in range(length_q):
        pos = i + int(q_offset)
        for j in range(length_k):
            if is_causal and j > pos and not (prefix is not None and j < int(prefix)):
                allowed[:, i, j] = False
            if kv_length is not None and j >= int(kv_length):
                allowed[:, i, j] = False
            if window is not None and not (pos - window[0] <= j <= pos + window[1]):
                allowed[:, i, j] = False
            if chunk is not None and pos // chunk != j // chunk:
                allowed[:, i, j] = False
            if segment_ids is not None and int(segment_ids[0][i]) != int(segment_ids[1][j]):
                allowed[:, i, j] = False
            if mask_mod is not None:
                for h in range(num_heads):
                    allowed[h, i, j] &= bool(mask_mod(h, pos, j))
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, bool), allowed.shape)
    if bias is not None:
        allowed &= np.broadcast_to(np.asarray(bias, np.float64) > -np.inf, allowed.shape)
    return allowed


def core_np(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    is_causal=False,
    q_offset=0,
    kv_length=None,
    window=None,
    scale=None,
    softcap=None,
    sinks=None,
    alibi=None,
    score_mod=None,
    **rules,
):
    """`[Lq, H, Dh], [Lk, Hkv, Dh] x2 -> (heads [Lq, H, Dh], weights [H, Lq, Lk])` in float64.
    `rules`: segment_ids, chunk, prefix (see `visible_np`). sinks `[H]`: head h's logit
    `sinks[h]` is one more term of every row's softmax denominator, with no value. alibi `[H]`:
    head h's slope, times key position j minus query position i + q_offset, joins its
    logits after the soft-cap. score_mod: `f(logits [Lk], h, i + q_offset, j [Lk])` in NumPy,
    after ALiBi."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    length_q, num_heads, head_dim = q.shape
    length_k, num_kv_heads = k.shape[:2]
    group = num_heads // num_kv_heads
    scale = 1.0 / np.sqrt(head_dim) if scale is None else float(scale)
    allowed = visible_np(
        length_q,
        length_k,
        num_heads=num_heads,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        q_offset=q_offset,
        kv_length=kv_length,
        window=window,
        **rules,
    )
    bias = (
        np.zeros((num_heads, length_q, length_k))
        if bias is None
        else np.broadcast_to(np.asarray(bias, np.float64), (num_heads, length_q, length_k))
    )
    heads = np.zeros((length_q, num_heads, head_dim))
    weights = np.zeros((num_heads, length_q, length_k))
    for h in range(num_heads):
        kh, vh = k[:, h // group], v[:, h // group]  # query head h reads kv head h // G
        for i in range(length_q):
            seen = allowed[h, i]
            if not seen.any():
                continue  # nothing to attend to: zero weights, zero heads
            logits = q[i, h] @ kh.T * scale
            if softcap is not None:  # cap · tanh(logits / cap), before the bias and the mask
                logits = softcap * np.tanh(logits / softcap)
            if alibi is not None:
                logits = logits + float(alibi[h]) * (np.arange(length_k) - (i + q_offset))
            if score_mod is not None:
                logits = np.asarray(score_mod(logits, h, i + q_offset, np.arange(length_k)), np.float64)
            logits = np.where(seen, logits + np.where(seen, bias[h, i], 0), -np.inf)
            top = logits[seen].max()
            sink = 0.0
            if sinks is not None:
                top = max(top, float(sinks[h]))
                sink = np.exp(float(sinks[h]) - top)
            e = np.exp(logits - top)
            weights[h, i] = e / (e.sum() + sink)
            heads[i, h] = weights[h, i] @ vh
    return heads, weights


def attention_np(
    params,
    x_q,
    x_kv=None,
    *,
    num_heads,
    mask=None,
    bias=None,
    is_causal=False,
    q_offset=0,
    kv_length=None,
    window=None,
    scale=None,
    softcap=None,
    alibi=None,
    **rules,
):
    """One example, float64. Returns (out [Lq, D_out], weights [H, Lq, Lk]).
    `rules`: segment_ids, chunk, prefix (see `visible_np`)."""
    f64 = lambda a: None if a is None else np.asarray(a, dtype=np.float64)
    x_q = f64(x_q)
    x_kv = x_q if x_kv is None else f64(x_kv)
    w_q, w_k, w_v, w_o = map(f64, (params.w_q, params.w_k, params.w_v, params.w_o))
    b = lambda v, n: np.zeros(n) if v is None else f64(v)
    head_dim = w_q.shape[1] // num_heads
    num_kv = w_k.shape[1] // head_dim
    split = lambda x, n: x.reshape(x.shape[0], n, head_dim)
    q = split(x_q @ w_q + b(params.b_q, w_q.shape[1]), num_heads)
    k = split(x_kv @ w_k + b(params.b_k, w_k.shape[1]), num_kv)
    v = split(x_kv @ w_v + b(params.b_v, w_v.shape[1]), num_kv)
    heads, weights = core_np(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        q_offset=q_offset,
        kv_length=kv_length,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi=alibi,
        sinks=None if getattr(params, "sinks", None) is None else f64(params.sinks),
        **rules,
    )
    out = heads.reshape(heads.shape[0], -1) @ w_o + b(params.b_o, w_o.shape[1])
    return out, weights
