"""`flax.nnx` wrapper: creates the `MHAParams` arrays as `nnx.Param`s and calls the core.

Decoding keeps its KV cache as Flax state, the way Flax users expect:
`init_cache(batch, capacity)` makes three `nnx.Cache` variables (`cached_key`,
`cached_value`, `cache_length`) and `module(x, decode=True)` attends `x`
against them and updates them. Users who keep the cache outside the module
pass it instead: `out, cache = module(x, cache=cache)`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mha_jax import _checks, _module
from mha_jax._validate import merge_options, settle_structure
from mha_jax.decoding.cache import KVCache, init_cache
from mha_jax.masks import Structure
from mha_jax.options import Options
from mha_jax.parallel.sharding import mesh_partition_names
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
from mha_jax.rope import RoPE


class MultiHeadAttention(nnx.Module):
    """Multi-head attention over `[B, L, D]` (or unbatched `[L, D]`) inputs.

    Parameters are named `w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o` (and `q_norm,
    k_norm` with `qk_norm=True`, `sinks` with `sinks=True`) with the layout of `mha_jax.MHAParams`;
    `module.params` gets them as one, `module.load_params(params)` sets them. The settings are
    `scale, dropout_rate, dtype, implementation, rope`, and `options=Options(...)` for
    all of them and the rest (softcap, qk_norm_eps): a keyword fills what the options
    leave at its default. Built inside
    `with jax.set_mesh(mesh):` with `heads_axis="heads"`, the weights are
    created split by heads over that mesh axis (`mha_jax.parallel.sharding`).

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
        qk_norm: bool = False,
        sinks: bool = False,
        scale: float | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        implementation: str = "auto",
        rope: RoPE | None = None,
        options: Options | None = None,
        heads_axis: str | None = None,
        sow_weights: bool = False,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        rngs: nnx.Rngs,
    ):
        settings = dict(scale=scale, dropout_rate=dropout_rate, dtype=dtype, implementation=implementation,
                        rope=rope)  # fmt: skip
        self.options = merge_options(options, settings)  # checked here, once
        sizes = resolve_sizes(
            in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, d_kv=in_kv_features,
            d_out=out_features,
        )  # fmt: skip
        # Head parallelism: each parameter's mesh axes (mha_jax.parallel.sharding), from the
        # mesh set around this constructor; nnx then creates it sharded.
        _checks.check_bool_flag("sinks", sinks)
        partition = mesh_partition_names(num_heads, sizes["num_kv_heads"], heads_axis)
        params = build_params(
            lambda name, shape: nnx.Param(
                init_param(rngs.params(), name, shape, param_dtype, kernel_init, bias_init),
                **({"out_sharding": partition[name]} if partition else {}),
            ),
            param_shapes(**sizes, use_bias=use_bias, qk_norm=qk_norm, sinks=sinks),
        )
        for name in PARAM_NAMES:
            setattr(self, name, getattr(params, name))
        self.num_heads, self.deterministic, self.sow_weights = num_heads, deterministic, sow_weights
        self.rngs = rngs.dropout.fork() if self.options.dropout_rate > 0 else None
        self.num_kv_heads, self.head_dim = sizes["num_kv_heads"], sizes["head_dim"]

    @property
    def params(self) -> MHAParams:
        return MHAParams(*(None if p is None else p[...] for p in map(self.__getattribute__, PARAM_NAMES)))

    def load_params(self, params: MHAParams) -> None:
        """Load weights (e.g. from `mha_jax.interop.import_params`): every array the
        module holds must come, in its shape; absent ones must stay absent."""
        _module.check_loaded(self.params, params)
        for name in PARAM_NAMES:
            if getattr(params, name) is not None:
                getattr(self, name)[...] = jnp.asarray(getattr(params, name), getattr(self, name)[...].dtype)

    def init_cache(self, batch: int, capacity: int, dtype=None) -> None:
        """Make (or reset) the decoding cache: `capacity` slots for `batch` examples, in `dtype`
        (default: the computation's, `options.dtype`, else the parameters' dtype)."""
        if dtype is None:
            dtype = self.options.dtype or self.w_q[...].dtype
        cache = init_cache(batch, capacity, self.num_kv_heads, self.head_dim, dtype)
        self.cached_key, self.cached_value = nnx.Cache(cache.k), nnx.Cache(cache.v)
        self.cache_length = nnx.Cache(cache.length)

    @property
    def cache(self) -> KVCache:
        if not hasattr(self, "cached_key"):
            raise ValueError("cache must be made with module.init_cache(batch, capacity) first; got none")
        return KVCache(self.cached_key[...], self.cached_value[...], self.cache_length[...])

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
        is_causal: bool | None = None,
        q_offset=0,
        kv_length=None,
        window=None,
        structure: Structure | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        return_weights: bool = False,
        decode: bool = False,
        cache: KVCache | None = None,
        lengths=None,
        positions=None,
    ):
        """`mask`, `bias`, `kv_length`, `q_offset`, `structure`, `positions`: as
        `mha_jax.batched_attention`; a Flax mask (any dtype, nonzero = may attend; `[B, 1, Lq,
        Lk]` as `nnx.make_causal_mask` gives, or `[B, H, Lq, Lk]`) is taken as Flax means it.

        Decoding (`x_q` [B, T, D], self-attention): `decode=True` attends against the
        module's cache and updates it; `cache=` attends against that cache and returns
        `(out, cache)`. `lengths` [B] and `positions` [B, T], `window`: as
        `mha_jax.decoding.cached_attention`.
        """
        if decode or cache is not None:
            _module.check_decoding(
                x_kv, mask, bias, is_causal, q_offset, kv_length, structure, return_weights
            )
            out, new_cache = _module.decode(
                self, self.params, x_q, self.cache if cache is None else cache, options=self.options,
                lengths=lengths, positions=positions, window=window,
            )  # fmt: skip
            if cache is not None:
                return out, new_cache
            self.cached_key[...], self.cached_value[...] = new_cache.k, new_cache.v
            self.cache_length[...] = new_cache.length
            return out
        if lengths is not None:  # the new rows to keep of a decoding step: nothing else reads it
            raise _checks.fail("lengths", "be left out unless decoding (decode=True or cache=); "
                               "padding is kv_length=", "an array")  # fmt: skip
        structure = settle_structure(
            structure, is_causal=bool(is_causal), q_offset=q_offset, kv_length=kv_length, window=window
        )
        out, weights = _module.forward(
            self, self.params, x_q, x_kv, options=self.options, mask=mask, bias=bias,
            structure=structure, deterministic=deterministic,
            draw_rng=lambda: self._dropout_stream(rngs)(), return_weights=return_weights,
            positions=positions,
        )  # fmt: skip
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        return (out, weights) if return_weights else out
