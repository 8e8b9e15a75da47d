"""`flax.linen` wrapper: declares the `MHAParams` arrays with `self.param` and calls the core."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mha_jax import _checks, _module
from mha_jax._validate import merge_options, settle_structure
from mha_jax.decoding.cache import KVCache, init_cache
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.params import (
    build_params,
    default_bias_init,
    default_kernel_init,
    init_param,
    param_shapes,
    resolve_sizes,
)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over `[B, L, D]` (or unbatched `[L, D]`) inputs.

    Input widths are read from the inputs; parameters are `w_q, b_q, ..., w_o,
    b_o` (and `q_norm, k_norm` with `qk_norm=True`, `sinks` with `sinks=True`) with the layout of
    `mha_jax.MHAParams`, in the `params` collection. The settings are `scale,
    dropout_rate, dtype, implementation, rope`, and `options=Options(...)` for all
    of them and the rest (softcap, qk_norm_eps), merged as in the NNX module. Weights
    are sown to
    `intermediates/attention_weights` when `sow_weights`.

    Decoding keeps the KV cache in the `cache` collection, as Flax's own
    attention does: `init(rng, x_full, decode=True)` makes it with room for
    `x_full`'s length (and computes nothing else); `apply(variables, x_new,
    decode=True, mutable=["cache"])` attends against it and updates it. Or pass
    `cache=` and get `(out, cache)` back, keeping the cache yourself.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    qk_norm: bool = False
    sinks: bool = False  # gpt-oss attention sinks: one learned logit per head
    scale: float | None = None
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
    rope: Any = None  # a mha_jax.RoPE
    options: Options | None = None
    sow_weights: bool = False
    kernel_init: Any = default_kernel_init
    bias_init: Any = default_bias_init

    @nn.compact
    def __call__(
        self,
        x_q,
        x_kv=None,
        *,
        mask=None,
        bias=None,
        is_causal: bool | None = None,
        q_offset=0,
        kv_length=None,
        window=None,
        structure: Structure | None = None,
        deterministic: bool | None = None,
        dropout_rng=None,
        return_weights: bool = False,
        decode: bool = False,
        cache: KVCache | None = None,
        lengths=None,
        positions=None,
    ):
        """`mask`, `bias`, `kv_length`, `q_offset`, `structure`: as `mha_jax.batched_attention`;
        decoding (`decode`, `cache`, `lengths`, `positions`, `window`): as the NNX module."""
        x_kv = x_q if x_kv is None else x_kv
        sizes = resolve_sizes(
            x_q.shape[-1], self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            d_kv=x_kv.shape[-1], d_out=self.out_features,
        )  # fmt: skip
        _checks.check_bool_flag("sinks", self.sinks)
        init = functools.partial(
            init_param, dtype=self.param_dtype, kernel_init=self.kernel_init, bias_init=self.bias_init
        )
        params = build_params(
            lambda name, shape: self.param(name, init, name, shape),
            param_shapes(**sizes, use_bias=self.use_bias, qk_norm=self.qk_norm, sinks=self.sinks),
        )
        settings = self.settings()
        if (decode and not self.is_initializing()) or cache is not None:
            _module.check_decoding(
                None if x_kv is x_q else x_kv, mask, bias, is_causal, q_offset, kv_length, structure,
                return_weights,
            )  # fmt: skip
            if cache is not None:
                return _module.decode(self, params, x_q, cache, options=settings, lengths=lengths,
                                      positions=positions, window=window)  # fmt: skip
            variables = [self.get_variable("cache", name) for name in ("cached_key", "cached_value",
                                                                      "cache_length")]  # fmt: skip
            if any(v is None for v in variables):
                raise ValueError(
                    "cache must be made by init(..., decode=True) first; got no 'cache' collection"
                )
            out, new_cache = _module.decode(
                self, params, x_q, KVCache(*variables), options=settings, lengths=lengths,
                positions=positions, window=window,
            )  # fmt: skip
            for name, value in zip(("cached_key", "cached_value", "cache_length"), new_cache, strict=True):
                self.put_variable("cache", name, value)
            return out
        if lengths is not None:  # the new rows to keep of a decoding step: nothing else reads it
            raise _checks.fail("lengths", "be left out unless decoding (decode=True or cache=); "
                               "padding is kv_length=", "an array")  # fmt: skip
        structure = settle_structure(
            structure, is_causal=bool(is_causal), q_offset=q_offset, kv_length=kv_length, window=window
        )
        out, weights = _module.forward(
            self, params, x_q, x_kv, options=settings, mask=mask, bias=bias, structure=structure,
            deterministic=deterministic,
            draw_rng=lambda: self.make_rng("dropout") if dropout_rng is None else dropout_rng,
            return_weights=return_weights, positions=positions,
        )  # fmt: skip
        if decode:  # initializing: make the cache in the computation's dtype, with room for x_q
            empty = init_cache(x_q.shape[0], x_q.shape[1], sizes["num_kv_heads"], sizes["head_dim"],
                               settings.dtype or out.dtype)  # fmt: skip
            for name, value in zip(("cached_key", "cached_value", "cache_length"), empty, strict=True):
                self.put_variable("cache", name, value)
        if self.sow_weights:
            self.sow("intermediates", "attention_weights", weights)
        return (out, weights) if return_weights else out

    def settings(self) -> Options:
        """The module's Options: `options`, or one built from the four setting fields."""
        fields = dict(scale=self.scale, dropout_rate=self.dropout_rate, dtype=self.dtype,
                      implementation=self.implementation, rope=self.rope)  # fmt: skip
        return merge_options(self.options, fields)
