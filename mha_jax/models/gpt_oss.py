"""gpt-oss, OpenAI's mixture-of-experts decoder, on `mha_jax.nnx.MultiHeadAttention`: learned
attention sinks, sliding and full layers in turn, YaRN RoPE; HF transformers' state dict in.

    config = GptOssConfig.from_hf(hf_config.to_dict())       # or the dict of a config.json
    model = from_state_dict(hf_model.state_dict(), config)   # NumPy or torch tensors, HF's names
    logits = model(ids, lengths)                             # [B, L, V], one causal forward
    for tokens in generate(model, ids, lengths, 32): ...     # [B] per step: prefill, then the caches

The data path, pre-norm (RMSNorm) around both sublayers:

    ids [B, T] ─ embed ─► x [B, T, D]
    every block:  x = x + attention(rms_norm(x))    GQA, biases, RoPE (YaRN), one sink logit per head;
                                                    "sliding_attention" layers see the last
                                                    `sliding_window` positions, the others all
                  x = x + experts(rms_norm(x))      each token's top-k of E experts (the router's
                                                    softmax over the k logits weights them); an
                                                    expert is a clamped SwiGLU, [.., 2·D_ff] -> D
    logits = rms_norm(x) @ lm_head                                                      [B, T, V]

The experts run as grouped matmuls (`jax.lax.ragged_dot`): the (token, expert) pairs sorted by
expert, each expert's rows against its own weights, then back to token order. The decoder
loop, decoding (`decode_step(graphdef)`, one `KVCache` per block) and `generate` are llama.py's;
a sliding layer's cache holds every position and its window hides the old ones.
tests/test_gpt_oss.py holds a tiny random-weight model to transformers' `GptOssForCausalLM`:
logits, and greedy generation cached and uncached. (The released checkpoints store the
experts in MXFP4; a state dict here is what transformers holds after loading them, float32.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mha_jax import _checks
from mha_jax.decoding import KVCache, RoPE
from mha_jax.interop import import_params
from mha_jax.models import weights
from mha_jax.models.llama import Llama, RMSNorm, decode_step, generate, init_caches  # noqa: F401 (shared)
from mha_jax.nnx import MultiHeadAttention
from mha_jax.options import Options
from mha_jax.rope import Scaling, YarnScaling, scaling_from_hf

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """gpt-oss-120b's sizes (transformers 4.57.1's `GptOssConfig` defaults)."""

    vocab_size: int = 201088
    d_model: int = 2880
    num_layers: int = 36
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    d_ff: int = 2880  # one expert's hidden width
    num_experts: int = 128
    experts_per_token: int = 4
    sliding_window: int = 128
    layer_types: tuple[str, ...] = LAYER_TYPES * 18
    rope_theta: float = 150000.0
    rope_scaling: Scaling | None = YarnScaling(
        factor=32.0, original_max_position_embeddings=4096, truncate=False
    )
    use_bias: bool = True  # the q/k/v/o projections'
    norm_eps: float = 1e-5
    max_positions: int = 131072
    swiglu_alpha: float = 1.702  # HF's GptOssExperts constants (not in the config)
    swiglu_limit: float = 7.0
    eos_token_id: int | None = None

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise _checks.fail(
                "layer_types", f"have one entry per layer ({self.num_layers})", len(self.layer_types)
            )
        for kind in self.layer_types:
            _checks.check_choice("layer_types[i]", kind, LAYER_TYPES)
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise _checks.fail(
                "experts_per_token", f"be in 1 ... num_experts={self.num_experts}", self.experts_per_token
            )

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> GptOssConfig:
        """From a HF `GptOssConfig.to_dict()` (or its config.json); refuses what this model
        does not compute."""
        _checks.check_choice("model_type", config.get("model_type"), ["gpt_oss"])
        if config.get("tie_word_embeddings"):
            raise _checks.fail("tie_word_embeddings", "be False (gpt-oss has its own lm_head)", True)
        eos = config.get("eos_token_id")
        return cls(
            vocab_size=config["vocab_size"],
            d_model=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config["num_key_value_heads"],
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            d_ff=config["intermediate_size"],
            num_experts=config["num_local_experts"],
            experts_per_token=config["num_experts_per_tok"],
            sliding_window=config["sliding_window"],
            layer_types=tuple(config["layer_types"]),
            rope_theta=config["rope_theta"],
            rope_scaling=scaling_from_hf(config.get("rope_scaling"), config["max_position_embeddings"]),
            use_bias=config.get("attention_bias", True),
            norm_eps=config["rms_norm_eps"],
            max_positions=config["max_position_embeddings"],
            eos_token_id=eos[0] if isinstance(eos, list | tuple) else eos,
        )


class Experts(nnx.Module):
    """The mixture of experts: a router picks each token's top k, softmax over their k logits."""

    def __init__(self, config: GptOssConfig, *, rngs: nnx.Rngs):
        E, D, F = config.num_experts, config.d_model, config.d_ff
        self.k, self.alpha, self.limit = config.experts_per_token, config.swiglu_alpha, config.swiglu_limit
        init = nnx.initializers.normal(0.02)
        self.router = nnx.Linear(D, E, rngs=rngs)
        self.gate_up = nnx.Param(init(rngs.params(), (E, D, 2 * F)))  # gate and up interleaved, as HF's
        self.gate_up_bias = nnx.Param(jnp.zeros((E, 2 * F)))
        self.down = nnx.Param(init(rngs.params(), (E, F, D)))
        self.down_bias = nnx.Param(jnp.zeros((E, D)))

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        tokens = x.reshape(-1, x.shape[-1])  # [N, D]
        top, chosen = jax.lax.top_k(self.router(tokens), self.k)  # [N, k] logits and expert numbers
        share = jax.nn.softmax(top, axis=-1)  # [N, k]
        # the N·k (token, expert) pairs grouped by expert: ragged_dot multiplies group e by expert e
        expert = chosen.reshape(-1)  # [N·k]
        order = jnp.argsort(expert, stable=True)  # [N·k]
        sizes = jnp.bincount(expert, length=self.gate_up.shape[0])  # [E] rows per expert
        rows = tokens[order // self.k]  # [N·k, D], grouped
        gate_up = jax.lax.ragged_dot(rows, self.gate_up[...], sizes) + self.gate_up_bias[...][expert[order]]
        gate = jnp.minimum(gate_up[:, ::2], self.limit)  # [N·k, F]
        up = jnp.clip(gate_up[:, 1::2], -self.limit, self.limit)
        hidden = (up + 1) * gate * jax.nn.sigmoid(self.alpha * gate)  # HF's clamped SwiGLU
        out = (
            jax.lax.ragged_dot(hidden, self.down[...], sizes) + self.down_bias[...][expert[order]]
        )  # [N·k, D]
        out = jnp.zeros_like(out).at[order].set(out)  # back to (token, slot) order
        mixed = jnp.einsum("nkd,nk->nd", out.reshape(*share.shape, -1), share.astype(out.dtype))
        return mixed.reshape(x.shape)


class Block(nnx.Module):
    def __init__(self, config: GptOssConfig, layer: int, *, rngs: nnx.Rngs):
        rope = RoPE(theta=config.rope_theta, scaling=config.rope_scaling)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = MultiHeadAttention(
            config.d_model, config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            use_bias=config.use_bias, sinks=True, options=Options(rope=rope), rngs=rngs,
        )  # fmt: skip
        # HF's mask keeps key j for query i when i - j < sliding_window: `sliding_window - 1` back.
        sliding = config.layer_types[layer] == "sliding_attention"
        self.window = (config.sliding_window - 1, 0) if sliding else None
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.experts = Experts(config, rngs=rngs)

    def __call__(self, x, lengths, cache: KVCache | None):  # [B, T, D] -> [B, T, D], cache
        h = self.attention_norm(x)
        if cache is None:  # one causal forward; padding keys (from lengths) hidden
            attended = self.attention(h, is_causal=True, window=self.window, kv_length=lengths)
        else:  # against the cache, which takes each example's first lengths[b] keys and values
            attended, cache = self.attention(h, cache=cache, lengths=lengths, window=self.window)
        x = x + attended
        return x + self.experts(self.mlp_norm(x)), cache


class GptOss(Llama):
    """The decoder: token ids [B, T] -> logits. Llama's loop (`model(ids, lengths)` one causal
    forward [B, T, V]; `model.decode(ids, lengths, caches)` the logits of each example's last
    new token [B, V]) over gpt-oss's blocks, with its own output layer (not tied)."""

    def __init__(self, config: GptOssConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, layer, rngs=rngs) for layer in range(config.num_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nnx.Linear(config.d_model, config.vocab_size, use_bias=False, rngs=rngs)

    def logits(self, x):  # [..., D] -> [..., V]
        return self.lm_head(x)


# ---- Weights: HF GptOssForCausalLM's state dict -> the model's state ----


def as_is(a):
    return a


def transpose(a):  # nn.Linear's [out, in] -> our [in, out]
    return a.T


TOP: dict[str, tuple[str, Callable]] = {
    "model.embed_tokens.weight": ("embed.embedding", as_is),  # [V, D]
    "model.norm.weight": ("norm.scale", as_is),
    "lm_head.weight": ("lm_head.kernel", transpose),  # [V, D] -> [D, V]
}
BLOCK: dict[str, tuple[str, Callable]] = {  # "model.layers.{i}." + name -> "blocks.{i}." + ours
    "input_layernorm.weight": ("attention_norm.scale", as_is),
    "post_attention_layernorm.weight": ("mlp_norm.scale", as_is),
    "mlp.router.weight": ("experts.router.kernel", transpose),  # [E, D] -> [D, E]
    "mlp.router.bias": ("experts.router.bias", as_is),
    "mlp.experts.gate_up_proj": ("experts.gate_up", as_is),  # [E, D, 2·D_ff]: HF's are [in, out]
    "mlp.experts.gate_up_proj_bias": ("experts.gate_up_bias", as_is),
    "mlp.experts.down_proj": ("experts.down", as_is),  # [E, D_ff, D]
    "mlp.experts.down_proj_bias": ("experts.down_bias", as_is),
}
ATTENTION = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o", "sinks")


def from_state_dict(tensors: Mapping[str, Any], config: GptOssConfig) -> GptOss:
    """The model holding HF GptOssForCausalLM's `tensors` (NumPy, or torch on the CPU), as
    float32; the q/k/v/o projections and sinks through interop's "llama" layout."""
    tensors = {name: np.asarray(value, np.float32) for name, value in tensors.items()}
    model = nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0)))  # shapes only: nothing drawn
    shapes = weights.param_shapes(model)
    table = dict(TOP)
    for i in range(config.num_layers):
        table.update(
            {f"model.layers.{i}.{name}": (f"blocks.{i}.{ours}", t) for name, (ours, t) in BLOCK.items()}
        )
    ours = {}
    for name, (our_name, transform) in table.items():
        if name not in tensors:
            raise _checks.fail("tensors", f"contain {name!r} (HF GptOssForCausalLM's names)", "none")
        stored_shape = transform(np.broadcast_to(np.float32(0), shapes[our_name])).shape
        _checks.check_shape(name, tensors[name], stored_shape, our_name)
        ours[our_name] = transform(tensors[name])
    for i in range(config.num_layers):
        params = import_params(
            "llama", tensors, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            prefix=f"model.layers.{i}.self_attn.",
        )  # fmt: skip
        for name in ATTENTION if config.use_bias else ATTENTION[:4] + ATTENTION[-1:]:
            if getattr(params, name) is None:
                raise _checks.fail("tensors", f"contain layer {i}'s attention {name} (HF's names)", "none")
            ours[f"blocks.{i}.attention.{name}"] = np.asarray(getattr(params, name), np.float32)
    return weights.load_params(model, ours)
