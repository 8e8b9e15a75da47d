"""Llama, the decoder of SmolLM2-135M-Instruct, on `mha_jax.nnx.MultiHeadAttention`; its GGUF and tokenizer.

    python scripts/generate.py --prompt "LLM with me." --max-new-tokens 64   (streams the continuation)

    model, tokenizer = load()                                # the installed SmolLM2-135M-Instruct GGUF
    ids, lengths = tokenize(tokenizer, ["LLM with me.", "Hi"])    # [B, L] right-padded, [B]
    logits = model(ids, lengths)                             # [B, L, V], one causal forward
    for tokens in generate(model, ids, lengths, 32): ...     # [B] per step: prefill once, then the KV cache

The data path, pre-norm (RMSNorm), GQA with RoPE inside the attention module, SwiGLU MLP,
the output projection tied to the embedding:

    ids [B, T] ─ embed ─► x [B, T, D]
    every block:   x = x + attention(rms_norm(x))      causal; q [.., H, Dh], k and v [.., Hkv, Dh]
                   x = x + down(silu(gate(h)) · up(h)),  h = rms_norm(x)        gate, up: [B, T, D_ff]
    logits = rms_norm(x) @ embedᵀ                                               [B, T, V]

Decoding is one pure jitted step, `step = decode_step(graphdef)`, `step(params, caches, ids,
lengths) -> (logits [B, V], caches)`, with one `KVCache` per block, donated: called once on the
whole (right-padded) prompt batch, then once per new token.

Weights are read from the GGUF file (dequantised to float32 by `mha_jax.interop.gguf`, sizes
from its metadata) through the table `TOP` + `BLOCK`. llama.cpp stores the rows of Q and K
permuted for interleaved RoPE; `rope_layout="half"` undoes that (HF's order), "interleaved"
keeps the file's order and pairs features as ggml does: the same logits either way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jinja2
import jinja2.sandbox
import numpy as np
import tokenizers
from flax import nnx

from mha_jax import _checks
from mha_jax.decoding import KVCache, RoPE, init_cache, rms_norm
from mha_jax.interop import checkpoint_path, gguf
from mha_jax.models import sampling, weights
from mha_jax.nnx import MultiHeadAttention
from mha_jax.options import Options


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    d_model: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    d_ff: int = 1536
    rope_theta: float = 100000.0
    rope_layout: str = "half"  # "interleaved": Q and K rows in the GGUF file's order
    norm_eps: float = 1e-5
    max_positions: int = 8192
    eos_token_id: int = 2  # SmolLM2-Instruct: <|im_end|>

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], rope_layout: str = "half") -> LlamaConfig:
        """Sizes from a GGUF file's metadata; refuses what this model does not compute."""
        _checks.check_choice("general.architecture", metadata.get("general.architecture"), ["llama"])
        config = gguf.model_config(metadata)
        if config["rope_dim"] not in (None, config["head_dim"]):  # partial rotary is not Llama
            raise _checks.fail(
                "llama.rope.dimension_count", f"equal Dh={config['head_dim']}", config["rope_dim"]
            )
        if metadata.get("llama.rope.scaling.type", "none") != "none":
            raise _checks.fail("llama.rope.scaling.type", "be 'none'", metadata["llama.rope.scaling.type"])
        return cls(
            vocab_size=config["vocab_size"],
            d_model=config["d_model"],
            num_layers=config["num_layers"],
            num_heads=config["num_heads"],
            num_kv_heads=config["num_kv_heads"],
            head_dim=config["head_dim"],
            d_ff=config["d_ff"],
            rope_theta=config["rope_theta"],
            rope_layout=rope_layout,
            norm_eps=config["norm_eps"],
            max_positions=config["context_length"],
            eos_token_id=config["eos_token_id"],
        )


class RMSNorm(nnx.Module):
    def __init__(self, width: int, eps: float):
        self.scale, self.eps = nnx.Param(jnp.ones((width,))), eps

    def __call__(self, x):  # [..., D] -> [..., D]
        return rms_norm(x, self.scale[...], eps=self.eps)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.gate = linear(config.d_model, config.d_ff)
        self.up = linear(config.d_model, config.d_ff)
        self.down = linear(config.d_ff, config.d_model)

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))  # hidden [B, T, D_ff]


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        rope = RoPE(theta=config.rope_theta, layout=config.rope_layout)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = MultiHeadAttention(
            config.d_model, config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            use_bias=False, options=Options(rope=rope), rngs=rngs,
        )  # fmt: skip
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, lengths, cache: KVCache | None):  # [B, T, D] -> [B, T, D], cache
        h = self.attention_norm(x)
        if cache is None:  # one causal forward; padding keys (from lengths) hidden
            attended = self.attention(h, is_causal=True, kv_length=lengths)
        else:  # against the cache, which takes each example's first lengths[b] keys and values
            attended, cache = self.attention(h, cache=cache, lengths=lengths)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
    """The decoder: token ids [B, T] -> logits. Uncached, `model(ids, lengths)` is one causal
    forward ([B, T, V]); `model.decode(ids, lengths, caches)` continues the caches and gives
    the logits of each example's last new token ([B, V])."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)

    def __call__(self, ids, lengths=None):  # [B, T], [B] -> [B, T, V]
        x, _ = self.hidden(ids, lengths, None)
        return self.logits(x)

    def decode(self, ids, lengths, caches: Sequence[KVCache]):  # -> [B, V], caches
        x, caches = self.hidden(ids, lengths, caches)
        last = x[jnp.arange(ids.shape[0]), lengths - 1]  # [B, D]: each example's last new token
        return self.logits(last), caches

    def logits(self, x):  # [..., D] -> [..., V]; tied: the output projection is the embedding
        # (not nnx.Embed.attend's x @ embeddingᵀ: XLA's CPU dot copied the transposed [V, D] first)
        return jnp.einsum("...d,vd->...v", x, self.embed.embedding[...])

    def hidden(self, ids, lengths, caches):  # -> the final normalised x [B, T, D], caches
        check_inputs(self.config, ids, lengths, caches)
        x = self.embed(ids)  # [B, T, D]
        new_caches = []
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks), strict=True):
            x, cache = block(x, lengths, cache)
            new_caches.append(cache)
        return self.norm(x), new_caches


def check_inputs(config: LlamaConfig, ids, lengths, caches) -> None:
    _checks.check_rank("ids", ids, 2, "[B, T]")
    _checks.check_integer("ids", ids)
    if lengths is not None:
        _checks.check_shape("lengths", lengths, (ids.shape[0],), "[B]")
    if caches is not None and len(caches) != config.num_layers:
        raise _checks.fail("caches", f"hold one KVCache per block ({config.num_layers})", len(caches))
    if ids.shape[1] > config.max_positions:
        raise _checks.fail("ids", f"have at most max_positions={config.max_positions} tokens", ids.shape[1])


def init_caches(config: LlamaConfig, batch: int, capacity: int, dtype=jnp.float32) -> list[KVCache]:
    """One empty cache per block, `capacity` positions for each of `batch` examples."""
    if capacity > config.max_positions:
        raise _checks.fail("capacity", f"be at most max_positions={config.max_positions}", capacity)
    sizes = (batch, capacity, config.num_kv_heads, config.head_dim)
    return [init_cache(*sizes, dtype) for _ in range(config.num_layers)]  # distinct: each is donated


@functools.cache  # one jitted step per model graph; hashing a graphdef costs ~3 ms, so not per call
def decode_step(graphdef: nnx.GraphDef) -> Callable:
    """The pure decoding step of models with this graph, jitted, donating the caches:

        step(params, caches, ids [B, T], lengths [B]) -> (logits [B, V], caches)

    `graphdef, params = nnx.split(model)`. `ids` are a whole (right-padded) prompt batch or
    one new token per example (T=1); `lengths` the real tokens of each row; the logits are
    those of each example's last real token."""

    def step(params: nnx.State, caches: list[KVCache], ids, lengths):
        return nnx.merge(graphdef, params).decode(ids, lengths, caches)

    return jax.jit(step, donate_argnums=1)


# ---- Generation: prefill once, then one token per step ----


def cache_capacity(positions: int, multiple: int = 64) -> int:
    """Room for `positions`, rounded up: prompts of similar lengths share one compiled step."""
    return -(-positions // multiple) * multiple


def generate(
    model: Llama, ids, lengths, max_new_tokens: int, *, stop_ids: Sequence[int] = (), rng=None,
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    capacity: int | None = None,
) -> Iterator[np.ndarray]:  # fmt: skip
    """Continue the right-padded prompts `ids [B, L]` (`lengths [B]`): yields each step's new
    tokens [B] (NumPy), `max_new_tokens` times or until every example has produced a stop id.

    The first token comes from one prefill call over the whole batch; each later one from
    a step of T=1 (`sampling.stream`; `sampling.sample` draws with the settings given).
    The caches (in the weights' dtype) hold `capacity` positions (default: `cache_capacity`)."""
    ids, lengths = jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32)
    _checks.check_positive("max_new_tokens", max_new_tokens)
    graphdef, params = nnx.split(model)
    batch, prompt = ids.shape
    needed = prompt + max_new_tokens - 1  # the last token is yielded, never appended
    if capacity is None:
        capacity = min(cache_capacity(needed), model.config.max_positions)
    if needed > capacity:
        raise _checks.fail("capacity", f"hold the prompt and the new tokens ({needed})", capacity)
    caches = init_caches(model.config, batch, capacity, model.embed.embedding[...].dtype)
    step = functools.partial(decode_step(graphdef), params)
    yield from sampling.stream(
        step, caches, ids, lengths, max_new_tokens, stop_ids=stop_ids, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )  # fmt: skip


# ---- Weights: the GGUF file's tensors <-> the model's state ----


def as_is(a):
    return a


def transpose(a):  # GGUF (like nn.Linear) stores [out, in]; we store [in, out]
    return a.T


# GGUF name -> (name in the model's state, transform); each transform is its own inverse.
TOP: dict[str, tuple[str, Callable]] = {
    "token_embd.weight": ("embed.embedding", as_is),  # [V, D], also the output projection
    "output_norm.weight": ("norm.scale", as_is),
}
BLOCK: dict[str, tuple[str, Callable]] = {  # "blk.{i}." + name -> "blocks.{i}." + ours
    "attn_norm.weight": ("attention_norm.scale", as_is),
    "attn_q.weight": ("attention.w_q", transpose),  # [H·Dh, D] -> [D, H·Dh]
    "attn_k.weight": ("attention.w_k", transpose),  # [Hkv·Dh, D]
    "attn_v.weight": ("attention.w_v", transpose),
    "attn_output.weight": ("attention.w_o", transpose),  # [D, H·Dh] -> [H·Dh, D]
    "ffn_norm.weight": ("mlp_norm.scale", as_is),
    "ffn_gate.weight": ("mlp.gate.kernel", transpose),  # [D_ff, D] -> [D, D_ff]
    "ffn_up.weight": ("mlp.up.kernel", transpose),
    "ffn_down.weight": ("mlp.down.kernel", transpose),
}


def weight_table(config: LlamaConfig) -> dict[str, tuple[str, Callable]]:
    """Every GGUF tensor name of the model -> (name in the model's state, transform)."""
    table = dict(TOP)
    for i in range(config.num_layers):
        table.update({f"blk.{i}.{name}": (f"blocks.{i}.{ours}", t) for name, (ours, t) in BLOCK.items()})
    return table


def rope_order(tensors: dict[str, np.ndarray], config: LlamaConfig, reorder: Callable) -> dict:
    """Q and K rows from the file's interleaved order to `config.rope_layout` (`reorder` =
    `gguf.unpermute`), or back (`gguf.permute`); "interleaved" keeps the file's order."""
    if config.rope_layout == "interleaved":
        return tensors
    heads = {"attn_q.weight": config.num_heads, "attn_k.weight": config.num_kv_heads}
    suffix = lambda name: name.split(".", 2)[-1]  # "blk.3.attn_q.weight" -> "attn_q.weight"
    return {
        name: reorder(value, heads[suffix(name)]) if suffix(name) in heads else value
        for name, value in tensors.items()
    }


def check_names(names: Collection[str], config: LlamaConfig) -> None:
    """`names` (GGUF's) are exactly the tensors of the model `config` describes."""
    table = weight_table(config)
    extra, missing = sorted(set(names) - set(table)), [name for name in table if name not in names]
    if extra:  # e.g. "output.weight": an untied output projection
        raise _checks.fail("tensors", "hold only the tensors of a tied-embedding Llama", f"also {extra[:4]}")
    if missing:
        raise _checks.fail("tensors", f"contain {missing[0]!r} (GGUF names)", f"{len(names)} without it")


def from_tensors(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> Llama:
    """The model holding a GGUF file's `tensors` (float32, as stored: Q and K rows interleaved)."""
    check_names(tensors, config)
    table = weight_table(config)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))  # shapes only: nothing drawn
    shapes = weights.param_shapes(model)
    tensors = rope_order(dict(tensors), config, gguf.unpermute)
    ours = {}
    for name, (our_name, transform) in table.items():
        stored_shape = transform(np.broadcast_to(np.float32(0), shapes[our_name])).shape
        _checks.check_shape(name, tensors[name], stored_shape, our_name)
        ours[our_name] = transform(np.asarray(tensors[name], np.float32))
    return weights.load_params(model, ours)


def to_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The model's weights under GGUF's names, Q and K in the file's order: `from_tensors`' inverse."""
    params = weights.params_as_numpy(model)
    tensors = {
        name: np.ascontiguousarray(transform(params[our_name]))
        for name, (our_name, transform) in weight_table(model.config).items()
    }
    return rope_order(tensors, model.config, gguf.permute)


def from_gguf(path: str | os.PathLike | None = None, *, rope_layout: str = "half") -> Llama:
    """The model in a Llama GGUF file (default: the installed SmolLM2-135M-Instruct), float32.
    A damaged file, or one this model does not compute, raises `gguf.DamagedFileError` naming
    the file before a tensor is read."""
    file = gguf.open_gguf(checkpoint_path("smollm2-135m-instruct") if path is None else path)
    gguf.check_model(file, "llama")  # the header's sizes against the tensors present
    try:  # what the file holds and this model does not compute (partial RoPE, an untied output)
        config = LlamaConfig.from_gguf(file.metadata, rope_layout)
        check_names(file.tensors, config)
    except ValueError as error:
        raise gguf.DamagedFileError(f"{file.path}: {error}") from None
    return from_tensors({name: gguf.read_tensor(file, name) for name in file.tensors}, config)


def load(path=None, *, rope_layout: str = "half") -> tuple[Llama, tokenizers.Tokenizer]:
    """The model and tokenizer of a Llama GGUF file (default: the installed SmolLM2-135M-Instruct)."""
    path = checkpoint_path("smollm2-135m-instruct") if path is None else path
    return from_gguf(path, rope_layout=rope_layout), tokenizer_from_gguf(gguf.open_gguf(path).metadata)


# ---- Tokenizer and chat template, from the GGUF metadata ----


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2-style byte-level BPE from `tokenizer.ggml.tokens` and `.merges`; the control tokens
    (`token_type` 3: <|im_start|>, ...) are special. `tokenizer.ggml.pre` "smollm" splits
    digits one by one before the byte-level split, as llama.cpp does for it. (transformers'
    GGUF converter leaves that out; SmolLM2's vocabulary has no multi-digit token, so the ids
    agree.)"""
    _checks.check_choice("tokenizer.ggml.model", metadata["tokenizer.ggml.model"], ["gpt2"])
    vocabulary = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = tokenizers.Tokenizer(
        tokenizers.models.BPE({token: i for i, token in enumerate(vocabulary)}, merges)
    )
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = [tokenizers.pre_tokenizers.Digits(individual_digits=True)]
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        (digits if metadata.get("tokenizer.ggml.pre") == "smollm" else []) + [byte_level]
    )
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    control = [
        token
        for token, kind in zip(vocabulary, metadata["tokenizer.ggml.token_type"], strict=True)
        if kind == 3
    ]
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
    return tokenizer


def tokenize(
    tokenizer: tokenizers.Tokenizer, texts: Sequence[str], pad_id: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, L] (int32, right-padded with `pad_id`) and lengths [B]; special tokens in the
    text (<|im_start|>) are recognised; no BOS is added (SmolLM2 adds none)."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise _checks.fail("texts", "be a non-empty list of strings", f"{texts!r:.80}")
    encoded = [encoding.ids for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    if lengths.min() == 0:
        raise _checks.fail("texts", "each give at least one token", f"an empty text at {lengths.argmin()}")
    ids = np.full((len(texts), lengths.max()), pad_id, np.int32)
    for row, tokens in zip(ids, encoded, strict=True):
        row[: len(tokens)] = tokens
    return ids, lengths


def chat_prompt(template: str, messages: Sequence[Mapping[str, str]], **variables) -> str:
    """Render a GGUF's `tokenizer.chat_template` as transformers' `apply_chat_template` does
    (sandboxed jinja2, trim_blocks, lstrip_blocks), ready for the assistant's reply."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(
        messages=list(messages), add_generation_prompt=True, **variables
    )
