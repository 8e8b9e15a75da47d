"""An independent float64 NumPy spec of multi-head attention: explicit loops
over heads and query rows, nothing shared with mha_jax but the conventions."""

from __future__ import annotations

import jax
import numpy as np


def normal(seed, shape, dtype="float32"):
    """Fresh non-zero random inputs (a new seed per test, never zeros)."""
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def attention_np(params, x_q, x_kv=None, *, num_heads, mask=None, bias=None,
                 is_causal=False, q_offset=0, kv_length=None, window=None, scale=None):
    """One example, float64. Returns (out [Lq, D_out], weights [H, Lq, Lk])."""
    f64 = lambda a: None if a is None else np.asarray(a, dtype=np.float64)
    x_q = f64(x_q)
    x_kv = x_q if x_kv is None else f64(x_kv)
    w_q, w_k, w_v, w_o = map(f64, (params.w_q, params.w_k, params.w_v, params.w_o))
    b = lambda v, n: np.zeros(n) if v is None else f64(v)
    head_dim = w_q.shape[1] // num_heads
    num_kv = w_k.shape[1] // head_dim
    group = num_heads // num_kv
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    q = x_q @ w_q + b(params.b_q, w_q.shape[1])
    k = x_kv @ w_k + b(params.b_k, w_k.shape[1])
    v = x_kv @ w_v + b(params.b_v, w_v.shape[1])
    length_q, length_k = x_q.shape[0], x_kv.shape[0]
    if isinstance(window, int):
        window = (window, window)
    heads = np.zeros((length_q, num_heads * head_dim))
    weights = np.zeros((num_heads, length_q, length_k))
    for h in range(num_heads):
        kv_h = h // group
        qh = q[:, h * head_dim:(h + 1) * head_dim]
        kh = k[:, kv_h * head_dim:(kv_h + 1) * head_dim]
        vh = v[:, kv_h * head_dim:(kv_h + 1) * head_dim]
        for i in range(length_q):
            allowed = np.ones(length_k, dtype=bool)
            pos = i + q_offset
            for j in range(length_k):
                if mask is not None:
                    head_mask = np.asarray(mask)[h] if np.ndim(mask) == 3 else np.asarray(mask)
                    allowed[j] &= bool(head_mask[i, j])
                if is_causal and j > pos:
                    allowed[j] = False
                if kv_length is not None and j >= kv_length:
                    allowed[j] = False
                if window is not None and not (pos - window[0] <= j <= pos + window[1]):
                    allowed[j] = False
            if not allowed.any():
                continue  # no visible key: zero weights, zero output
            logits = qh[i] @ kh.T * scale
            if bias is not None:
                head_bias = f64(bias)[h] if np.ndim(bias) == 3 else f64(bias)
                logits = logits + head_bias[i]
            logits = np.where(allowed, logits, -np.inf)
            e = np.exp(logits - logits[allowed].max())
            weights[h, i] = e / e.sum()
            heads[i, h * head_dim:(h + 1) * head_dim] = weights[h, i] @ vh
    out = heads @ w_o + b(params.b_o, w_o.shape[1])
    return out, weights
