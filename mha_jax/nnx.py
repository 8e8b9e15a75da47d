"""`flax.nnx` wrapper: creates the `MHAParams` arrays as `nnx.Param`s and calls the core."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mha_jax import _module
from mha_jax._validate import settle_structure
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.params import (
    PARAM_NAMES,
    MHAParams,
    build_params,
    default_bias_init,
    default_kernel_init,
    init_param,
    param_shapes,
    resolve_sizes,
)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention over `[B, L, D]` (or unbatched `[L, D]`) inputs.

    Parameters are named `w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o` with the
    layout of `mha_jax.MHAParams`; `module.params` returns them as one.

    >>> layer = MultiHeadAttention(768, 12, rngs=nnx.Rngs(0))
    >>> y = layer(x, is_causal=True)   # x: [B, L, 768] -> y: [B, L, 768]
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        in_kv_features: int | None = None,
        out_features: int | None = None,
        use_bias: bool = True,
        scale: float | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        implementation: str = "auto",
        sow_weights: bool = False,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        rngs: nnx.Rngs,
    ):
        sizes = resolve_sizes(
            in_features,
            num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            d_kv=in_kv_features,
            d_out=out_features,
        )
        params = build_params(
            lambda name, shape: nnx.Param(
                init_param(rngs.params(), name, shape, param_dtype, kernel_init, bias_init)
            ),
            param_shapes(**sizes, use_bias=use_bias),
        )
        for name in PARAM_NAMES:
            setattr(self, name, getattr(params, name))
        self.num_heads, self.deterministic, self.sow_weights = num_heads, deterministic, sow_weights
        self.options = Options(scale, dropout_rate, dtype, implementation)  # checked here, once
        self.rngs = rngs.dropout.fork() if self.options.dropout_rate > 0 else None

    @property
    def params(self) -> MHAParams:
        return MHAParams(*(None if p is None else p[...] for p in map(self.__getattribute__, PARAM_NAMES)))

    def _dropout_stream(self, rngs):
        stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs or self.rngs
        if stream is None:
            raise ValueError("rngs must be given to the call when dropout is on; got None")
        return stream

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
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        return_weights: bool = False,
    ):
        """`mask`, `bias`, `kv_length`, `q_offset`, `structure`: as `mha_jax.batched_attention`."""
        structure = settle_structure(
            structure, is_causal=is_causal, q_offset=q_offset, kv_length=kv_length, window=window
        )
        out, weights = _module.forward(
            self,
            self.params,
            x_q,
            x_kv,
            options=self.options,
            mask=mask,
            bias=bias,
            structure=structure,
            deterministic=deterministic,
            draw_rng=lambda: self._dropout_stream(rngs)(),
            return_weights=return_weights,
        )
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        return (out, weights) if return_weights else out
