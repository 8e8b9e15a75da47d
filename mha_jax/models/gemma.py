"""Gemma 3 270M, a text decoder, on `mha_jax.nnx.MultiHeadAttention`; greedy generation with a KV cache.

    python -c "from mha_jax.models import gemma; print(gemma.generate(*gemma.load(), 'The capital of'))"

    model, tokenizer = load()                                    # the installed gemma-3-270m GGUF
    text = generate(model, tokenizer, "The capital of France is", max_new_tokens=16)
    ids = encode(tokenizer, "The capital of France is")          # [L] int32, <bos> first
    logits = forward(model, ids[None])                           # [B, L, V], one causal pass

The data path, pre- and post-norm around each sublayer (every RMSNorm applies `1 + w`):

    ids [B, L] ─ embed · sqrt(D) ─► x [B, L, D]
    every block:  x = x + norm(attention(norm(x)))    QK-norm, MQA (Hkv = 1), RoPE;
                                                      local layers: a sliding window, RoPE base 1e4;
                                                      every 6th layer global: no window, base 1e6
                  x = x + norm(down(gelu_tanh(gate(norm(x))) · up(norm(x))))    GeGLU, [B, L, D_ff]
    logits = norm(x) @ embedᵀ                                            [B, L, V], tied embeddings

Decoding is the same blocks with one `KVCache` per layer: `step(graphdef, params, caches, ids)`
prefills a prompt in one call, then takes one token at a time; positions are the caches' lengths.
A local layer's cache holds every position (capacity = prompt + new tokens); its window hides
the keys older than `sliding_window`.

Weights and sizes come from the GGUF file through `mha_jax.interop.gguf` (dequantised to float32,
as HF transformers loads them), under HF `Gemma3ForCausalLM`'s names: the q/k/v/o projections
through interop's "llama" layout, the rest through `TOP` and `BLOCK`. The tokenizer is the file's
SentencePiece BPE, rebuilt with PyPI `tokenizers` (`load_tokenizer`). Float32 throughout;
tests/test_gemma.py holds it to transformers' `Gemma3ForCausalLM` on the same file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from mha_jax import _checks
from mha_jax.decoding import KVCache, RoPE, init_cache, rms_norm
from mha_jax.interop import checkpoint_path, export_params, gguf, import_params
from mha_jax.models import sampling, weights
from mha_jax.nnx import MultiHeadAttention
from mha_jax.options import Options


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Gemma 3 270M's sizes (the defaults). `from_gguf` reads what the file holds; the
    fields marked "HF default" are not in the file and come from transformers 4.57.1's
    `Gemma3TextConfig` defaults, which is where `Gemma3ForCausalLM.from_pretrained(gguf_file=)`
    takes them from too."""

    vocab_size: int = 262144
    d_model: int = 640
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    d_ff: int = 2048
    norm_eps: float = 1e-6
    max_positions: int = 32768
    sliding_window: int = 512  # local layers see the last 512 positions, their own included
    global_every: int = 6  # HF default (`sliding_window_pattern`): layers 5, 11, 17 are global
    rope_global_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0  # HF default (`rope_local_base_freq`)
    query_pre_attn_scalar: float = 256.0  # HF default: scores are q·k / sqrt(this)
    final_logit_softcap: float | None = None  # HF default (`final_logit_softcapping`): off
    bos_token_id: int = 2
    eos_token_id: int = 1
    # Also HF defaults: attention soft-capping off, `gelu_pytorch_tanh`, no RoPE scaling.

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> GemmaConfig:
        """The sizes a gemma3 GGUF file's metadata holds, the rest as the class defaults."""
        _checks.check_choice("general.architecture", metadata.get("general.architecture"), ["gemma3"])
        config = gguf.model_config(metadata)
        return cls(
            vocab_size=config["vocab_size"],
            d_model=config["d_model"],
            num_layers=config["num_layers"],
            num_heads=config["num_heads"],
            num_kv_heads=config["num_kv_heads"],
            head_dim=config["head_dim"],
            d_ff=config["d_ff"],
            norm_eps=config["norm_eps"],  # float32's 1e-6 in the file (9.99999997e-07), as HF reads it
            max_positions=config["context_length"],
            sliding_window=config["sliding_window"],
            rope_global_theta=config["rope_theta"],
            bos_token_id=config["bos_token_id"],
            eos_token_id=config["eos_token_id"],
        )


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: `x · rsqrt(mean(x²) + eps) · (1 + w)` in float32; `w` is stored
    as HF stores it (zeros at init)."""

    def __init__(self, features: int, eps: float):
        self.weight = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], eps=self.eps, scale_plus_one=True)


class Block(nnx.Module):
    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
        is_global = config.is_global(layer)
        theta = config.rope_global_theta if is_global else config.rope_local_theta
        options = Options(
            scale=config.query_pre_attn_scalar**-0.5, rope=RoPE(theta=theta), qk_norm_eps=config.norm_eps
        )
        self.attention = MultiHeadAttention(
            config.d_model, config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            use_bias=False, qk_norm=True, options=options, rngs=rngs,
        )  # fmt: skip
        # HF's mask keeps key j for query i when i - j < sliding_window: `sliding_window - 1` back.
        self.window = None if is_global else (config.sliding_window - 1, 0)
        norm = functools.partial(RMSNorm, config.d_model, config.norm_eps)
        self.attention_norm, self.post_attention_norm = norm(), norm()
        self.mlp_norm, self.post_mlp_norm = norm(), norm()
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.gate, self.up = linear(config.d_model, config.d_ff), linear(config.d_model, config.d_ff)
        self.down = linear(config.d_ff, config.d_model)

    def __call__(self, x, cache: KVCache | None, lengths=None):  # [B, T, D] -> ([B, T, D], cache)
        h = self.attention_norm(x)
        if cache is None:  # one causal pass over the whole sequence
            h = self.attention(h, is_causal=True, window=self.window)
        else:  # the new tokens against the cache, which takes each example's first lengths[b]
            h, cache = self.attention(h, cache=cache, lengths=lengths, window=self.window)
        x = x + self.post_attention_norm(h)
        h = self.mlp_norm(x)
        hidden = jax.nn.gelu(self.gate(h), approximate=True) * self.up(h)  # [B, T, D_ff]
        return x + self.post_mlp_norm(self.down(hidden)), cache


class Gemma(nnx.Module):
    """The decoder: token ids [B, T] -> logits [B, T, V]. `hidden(ids, caches)` with one
    `KVCache` per layer continues the cached sequence and returns the updated caches too."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, layer, rngs=rngs) for layer in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)

    def __call__(self, ids):  # [B, T] -> logits [B, T, V]: one causal pass, no cache
        return self.logits(self.hidden(ids)[0])

    def hidden(self, ids, caches=None, lengths=None):  # -> (x [B, T, D], caches or None)
        _checks.check_rank("ids", ids, 2, "[B, T]")
        _checks.check_integer("ids", ids)
        # HF scales in the embedding's dtype: sqrt(640) rounded to float32 (to bfloat16 in bf16).
        x = self.embed(ids) * jnp.float32(math.sqrt(self.config.d_model)).astype(self.embed.embedding.dtype)
        new_caches = []
        for block, cache in zip(self.blocks, caches or (None,) * len(self.blocks), strict=True):
            x, cache = block(x, cache, lengths)  # [B, T, D]
            new_caches.append(cache)
        return self.final_norm(x), None if caches is None else tuple(new_caches)

    def logits(self, x):  # [..., D] -> [..., V]: the tied embedding, soft-capped if configured
        # (not nnx.Embed.attend's x @ embeddingᵀ: XLA's CPU dot copied the [V, D] table first,
        # 671 MB per decode step; see llama.py)
        logits = jnp.einsum("...d,vd->...v", x, self.embed.embedding[...])
        if (cap := self.config.final_logit_softcap) is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits


@nnx.jit
def forward(model: Gemma, ids):  # [B, L] -> logits [B, L, V]
    return model(ids)


# ---- Decoding: a pure step over (params, caches), jitted once per shape, caches donated ----


def init_caches(config: GemmaConfig, batch: int, capacity: int) -> tuple[KVCache, ...]:
    """One empty cache per layer, `capacity` positions each (prompt + new tokens)."""
    if capacity > config.max_positions:
        raise _checks.fail("capacity", f"be at most max_positions={config.max_positions}", capacity)
    return tuple(
        init_cache(batch, capacity, config.num_kv_heads, config.head_dim) for _ in range(config.num_layers)
    )


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def step(graphdef: nnx.GraphDef, params: nnx.State, caches: tuple[KVCache, ...], ids, lengths=None):
    """`ids [B, T]` after the cached positions -> `(logits [B, V] of the last one, caches)`.
    Prefill is a step with the whole prompt, decoding a step with one token (the 262k-word
    output layer runs on the last position only); `graphdef, params = nnx.split(model)`.
    `lengths [B]`, for a right-padded batch: each example's real tokens (default: all T);
    the logits are those of each example's last real token."""
    model = nnx.merge(graphdef, params)
    x, caches = model.hidden(ids, caches, lengths)  # [B, T, D]
    last = x[:, -1] if lengths is None else x[jnp.arange(ids.shape[0]), lengths - 1]  # [B, D]
    return model.logits(last), caches


def generate_ids(model: Gemma, ids, max_new_tokens: int) -> np.ndarray:
    """Greedy continuation of `ids [L]` (int, <bos> first): up to `max_new_tokens` new ids,
    stopping after <eos>, as transformers' `generate(do_sample=False)`."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not ids.size:
        raise _checks.fail("ids", "be one non-empty sequence [L] of token ids", f"shape {ids.shape}")
    _checks.check_integer("ids", ids)
    steps = stream_tokens(model, ids[None], [len(ids)], max_new_tokens, stop_ids=(model.config.eos_token_id,))
    return np.concatenate(list(steps))  # [1] per step


def generate(model: Gemma, tokenizer: tokenizers.Tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of `prompt` as text (the prompt not included)."""
    new = generate_ids(model, encode(tokenizer, prompt), max_new_tokens)
    return tokenizer.decode(new.tolist(), skip_special_tokens=True)


def stream_tokens(
    model: Gemma, ids, lengths, max_new_tokens: int, *, stop_ids: Sequence[int] = (), rng=None,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    capacity: int | None = None,
) -> Iterator[np.ndarray]:  # fmt: skip
    """Continue the right-padded prompts `ids [B, L]` (<bos> first, `lengths [B]`): yields each
    step's new tokens [B], as `llama.generate` does (greedy unless temperature > 0), until
    `max_new_tokens` or every example has produced a stop id. The caches hold `capacity`
    positions (default: the prompt and the new tokens)."""
    ids, lengths = jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32)
    _checks.check_positive("max_new_tokens", max_new_tokens)
    needed = ids.shape[1] + max_new_tokens - 1  # the last token is yielded, never appended
    capacity = needed if capacity is None else capacity
    if needed > capacity:
        raise _checks.fail("capacity", f"hold the prompt and the new tokens ({needed})", capacity)
    graphdef, params = nnx.split(model)
    caches = init_caches(model.config, ids.shape[0], capacity)
    yield from sampling.stream(
        functools.partial(step, graphdef, params), caches, ids, lengths, max_new_tokens,
        stop_ids=stop_ids, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
    )  # fmt: skip


# ---- Tokenizer: the GGUF's SentencePiece BPE, rebuilt with PyPI `tokenizers` ----

# tokenizer.ggml.token_type: llama.cpp's token attributes.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def load_tokenizer(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Gemma's tokenizer from a GGUF's metadata, encoding as llama.cpp does ("llama", i.e.
    SentencePiece BPE): spaces become "▁"; control tokens (<bos>, <start_of_turn>, ...) and
    user-defined ones (runs of spaces, newlines, tabs, HTML tags) are matched in the text first;
    the rest starts as characters, and the adjacent pair that forms the highest-scoring normal
    token merges first (the scores are minus the merge rank); characters not in the vocabulary
    become <0xNN> byte tokens. <bos> goes first. `tokenizers` merges by a ranked list of pairs,
    so every split of a normal token into two tokens is a merge, ranked by that token's score.

    transformers 4.57.1 (`GGUFGemmaConverter`) builds a Unigram model from the same scores
    instead, which segments differently ("▁capital" as "▁c", "ap", "it", "al")."""
    _checks.check_choice("tokenizer.ggml.model", metadata["tokenizer.ggml.model"], ["llama"])
    tokens, scores = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"]
    kinds = metadata["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = []  # (rank, left id, right id, left, right)
    for token, score, kind in zip(tokens, scores, kinds, strict=True):
        if kind == NORMAL:
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in vocab and right in vocab:
                    ranked.append((-score, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = tokens[metadata["tokenizer.ggml.unknown_token_id"]]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token=unk, byte_fallback=True))
    tokenizer.normalizer = tokenizers.normalizers.Replace(" ", "▁")
    tokenizer.decoder = tokenizers.decoders.Sequence(
        [
            tokenizers.decoders.Replace("▁", " "),
            tokenizers.decoders.ByteFallback(),
            tokenizers.decoders.Fuse(),
        ]
    )
    added = lambda kind, special: [
        tokenizers.AddedToken(token, special=special, normalized=False)
        for token, k in zip(tokens, kinds, strict=True)
        if k == kind
    ]
    tokenizer.add_special_tokens(added(CONTROL, True))
    tokenizer.add_tokens(added(USER_DEFINED, False))
    if metadata.get("tokenizer.ggml.add_bos_token", False):
        bos = tokens[metadata["tokenizer.ggml.bos_token_id"]]
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    return tokenizer


def encode(tokenizer: tokenizers.Tokenizer, text: str) -> np.ndarray:
    """`text` -> ids [L] (int32), <bos> first."""
    if not isinstance(text, str) or not text:
        raise _checks.fail("text", "be a non-empty string", f"{text!r:.80}")
    return np.array(tokenizer.encode(text).ids, np.int32)


# ---- Weights: HF Gemma3ForCausalLM's names <-> the model's state ----


def as_is(a):
    return a


def transpose(a):  # nn.Linear's [out, in] <-> our [in, out]
    return a.T


def plus_one(w):  # HF's RMSNorm weight w -> the scale the attention module applies as stored
    return np.float32(1) + w


def minus_one(scale):
    return scale - np.float32(1)


# HF name -> (name in the model's state, HF -> ours, ours -> HF). q/k/v/o go through
# interop's "llama" layout. The attention module applies its QK-norm scales as stored, so they
# hold 1 + w (float32); the block norms keep HF's w and add the 1 when applied, as Gemma3RMSNorm
# does. 1 + w and back is exact for a bfloat16 w (8 significant bits) with 2**-16 <= |w| < 2**23,
# as every Gemma 3 270M weight is (tests/test_gemma.py); an arbitrary float32 w can move by
# float32's spacing at 1 + w (6e-8 for |w| < 1).
TOP: dict[str, tuple[str, Callable, Callable]] = {
    "model.embed_tokens.weight": ("embed.embedding", as_is, as_is),  # also the output layer (tied)
    "model.norm.weight": ("final_norm.weight", as_is, as_is),
}
BLOCK: dict[str, tuple[str, Callable, Callable]] = {  # "model.layers.{i}." + name -> "blocks.{i}." + ours
    "input_layernorm.weight": ("attention_norm.weight", as_is, as_is),
    "self_attn.q_norm.weight": ("attention.q_norm", plus_one, minus_one),
    "self_attn.k_norm.weight": ("attention.k_norm", plus_one, minus_one),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", as_is, as_is),
    "pre_feedforward_layernorm.weight": ("mlp_norm.weight", as_is, as_is),
    "post_feedforward_layernorm.weight": ("post_mlp_norm.weight", as_is, as_is),
    "mlp.gate_proj.weight": ("gate.kernel", transpose, transpose),
    "mlp.up_proj.weight": ("up.kernel", transpose, transpose),
    "mlp.down_proj.weight": ("down.kernel", transpose, transpose),
}


def weight_table(config: GemmaConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """Every HF name of the model but the attention projections -> (our name, to ours, to HF)."""
    table = dict(TOP)
    for i in range(config.num_layers):
        for name, (ours, to_ours, to_hf) in BLOCK.items():
            table[f"model.layers.{i}.{name}"] = (f"blocks.{i}.{ours}", to_ours, to_hf)
    return table


def from_state_dict(tensors: Mapping[str, np.ndarray], config: GemmaConfig) -> Gemma:
    """The model holding HF Gemma3ForCausalLM's `tensors` (NumPy), as float32. `lm_head.weight`,
    when present, is the embedding (tied) and is not read."""
    model = nnx.eval_shape(lambda: Gemma(config, rngs=nnx.Rngs(0)))  # shapes only: nothing is drawn
    shapes = weights.param_shapes(model)
    ours = {}
    for name, (our_name, to_ours, to_hf) in weight_table(config).items():
        if name not in tensors:
            raise _checks.fail("tensors", f"contain {name!r} (HF Gemma3ForCausalLM's names)", "none")
        hf_shape = to_hf(np.broadcast_to(np.float32(0), shapes[our_name])).shape  # ours, as HF stores it
        _checks.check_shape(name, tensors[name], hf_shape, our_name)
        ours[our_name] = to_ours(np.asarray(tensors[name], np.float32))
    for i in range(config.num_layers):
        params = import_params(
            "llama", tensors, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            prefix=f"model.layers.{i}.self_attn.",
        )  # fmt: skip
        for name in ("w_q", "w_k", "w_v", "w_o"):  # no biases; q_norm, k_norm came from BLOCK
            ours[f"blocks.{i}.attention.{name}"] = np.asarray(getattr(params, name), np.float32)
    return weights.load_params(model, ours)


def to_state_dict(model: Gemma) -> dict[str, np.ndarray]:
    """The model's weights under HF's names (no `lm_head.weight`: tied): `from_state_dict`'s inverse."""
    params = weights.params_as_numpy(model)
    tensors = {
        name: np.ascontiguousarray(to_hf(params[our_name]))
        for name, (our_name, _, to_hf) in weight_table(model.config).items()
    }
    for i, block in enumerate(model.blocks):
        projections = block.attention.params._replace(q_norm=None, k_norm=None)  # the norms are in BLOCK
        tensors.update(
            export_params(
                "llama", projections, num_heads=model.config.num_heads, prefix=f"model.layers.{i}.self_attn."
            )
        )
    return tensors


def from_gguf(path: str | os.PathLike) -> tuple[Gemma, tokenizers.Tokenizer]:
    """The model and tokenizer of a gemma3 GGUF file (every tensor dequantised to float32).
    A damaged file raises `gguf.DamagedFileError` naming the file before a tensor is read."""
    file = gguf.open_gguf(path)
    gguf.check_model(file, "gemma3")  # the header's sizes against the tensors present
    config = GemmaConfig.from_gguf(file.metadata)
    tensors = gguf.hf_names(gguf.read_tensors(file), "gemma3")
    return from_state_dict(tensors, config), load_tokenizer(file.metadata)


def load(path: str | os.PathLike | None = None) -> tuple[Gemma, tokenizers.Tokenizer]:
    """The model and tokenizer of a GGUF file (default: the installed gemma-3-270m Q4_K_M)."""
    return from_gguf(Path(path) if path is not None else checkpoint_path("gemma3-270m"))
