"""`flax.linen` wrapper: declares the `MHAParams` arrays with `self.param` and calls the core."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mha_jax import _module
from mha_jax._validate import settle_structure
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
    b_o` with the layout of `mha_jax.MHAParams`, in the `params` collection.
    Weights are sown to `intermediates/attention_weights` when `sow_weights`.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    scale: float | None = None
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
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
        is_causal: bool = False,
        q_offset=0,
        kv_length=None,
        window=None,
        structure: Structure | None = None,
        deterministic: bool | None = None,
        dropout_rng=None,
        return_weights: bool = False,
    ):
        """`mask`, `bias`, `kv_length`, `q_offset`, `structure`: as `mha_jax.batched_attention`."""
        x_kv = x_q if x_kv is None else x_kv
        sizes = resolve_sizes(
            x_q.shape[-1],
            self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            d_kv=x_kv.shape[-1],
            d_out=self.out_features,
        )
        init = functools.partial(
            init_param, dtype=self.param_dtype, kernel_init=self.kernel_init, bias_init=self.bias_init
        )
        params = build_params(
            lambda name, shape: self.param(name, init, name, shape),
            param_shapes(**sizes, use_bias=self.use_bias),
        )
        structure = settle_structure(
            structure, is_causal=is_causal, q_offset=q_offset, kv_length=kv_length, window=window
        )
        out, weights = _module.forward(
            self,
            params,
            x_q,
            x_kv,
            options=self.options,
            mask=mask,
            bias=bias,
            structure=structure,
            deterministic=deterministic,
            draw_rng=lambda: self.make_rng("dropout") if dropout_rng is None else dropout_rng,
            return_weights=return_weights,
        )
        if self.sow_weights:
            self.sow("intermediates", "attention_weights", weights)
        return (out, weights) if return_weights else out

    @property
    def options(self) -> Options:
        return Options(self.scale, self.dropout_rate, self.dtype, self.implementation)
