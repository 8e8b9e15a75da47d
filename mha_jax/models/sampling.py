"""Choosing the next token, and the generation loop every decoder here shares.

    tokens = sample(logits, rng, temperature=0.7, top_p=0.9)         # [B, V] -> [B]
    for tokens in stream(step, caches, ids, lengths, 32): ...          # [B] per new token

`step(caches, ids [B, T], lengths [B]) -> (logits [B, V], caches)` is a model's jitted decode
step with its parameters bound: called once on the whole right-padded prompt batch (the
prefill), then once per new token with T = 1. The models (llama, gemma) differ only in it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mha_jax import _checks


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample(logits, rng, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """The next token [B] from logits [B, V]: argmax when temperature is 0; else a draw from
    softmax(logits / temperature), kept to the top_k likeliest and the smallest set of
    likeliest tokens whose probability reaches top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], likeliest first
        probabilities = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probabilities, axis=-1) - probabilities  # of the likelier tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def stream(
    step: Callable, caches, ids, lengths, max_new_tokens: int, *, stop_ids: Sequence[int] = (), rng=None,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
) -> Iterator[np.ndarray]:  # fmt: skip
    """Continue the right-padded prompts `ids [B, L]` (`lengths [B]`) through `step`: yields
    each step's new tokens [B] (NumPy), `max_new_tokens` times or until every example has
    produced a stop id. The next step is dispatched before the host reads the current token,
    so the device is never idle waiting for Python."""
    _checks.check_positive("max_new_tokens", max_new_tokens)
    batch = ids.shape[0]
    rng = jax.random.PRNGKey(0) if rng is None else rng  # one key per drawn token; greedy draws none
    keys = jax.random.split(rng, max_new_tokens) if temperature > 0 else [rng] * max_new_tokens
    choose = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, caches = step(caches, ids, lengths)  # the prefill
    tokens, ones = choose(logits, keys[0]), jnp.ones((batch,), jnp.int32)
    done = np.zeros(batch, bool)
    for n in range(max_new_tokens):
        if n + 1 < max_new_tokens:  # queue the next step; the host waits only for `tokens`
            logits, caches = step(caches, tokens[:, None], ones)
            following = choose(logits, keys[n + 1])
        current = np.asarray(tokens)
        yield current
        done |= np.isin(current, stop_ids)
        if done.all():
            return
        tokens = following
