"""BERT, the encoder of all-MiniLM-L6-v2, on `mha_jax.nnx.MultiHeadAttention`; sentence embeddings.

    python scripts/embed.py "A sentence." "Another one."        (their cosine similarities)

    model, tokenizer = load()                                    # the installed all-MiniLM-L6-v2
    ids, lengths = tokenize(tokenizer, ["LLM with me.郭同学热爱AI喜欢游戏", "Hi"])   # [B, L], [B]
    embeddings = embed(model, ids, lengths)                      # [B, D], unit length

The data path, post-norm as in BERT (padding is `lengths`: a block's padded keys
are hidden from every query, and the pooling skips padded rows):

    ids [B, L] ─ word + position + token type embeddings ─ LayerNorm ─► x [B, L, D]
    every block:   x = LayerNorm(x + attention(x, kv_length=lengths))
                   x = LayerNorm(x + ff_out(gelu(ff_in(x))))            ff_in: [B, L, D_ff]
    embedding = normalize(mean of x over each sentence's valid tokens)   [B, D]

Weights are HF `BertModel`'s state dict (model.safetensors, read in NumPy,
sizes from config.json beside it): each attention layer through
`mha_jax.interop`'s "bert" layout, the rest through `EMBEDDINGS` and `BLOCK`.
Float32 throughout; tests/test_bert.py holds it to HF transformers + mean pooling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from mha_jax import _checks
from mha_jax.interop import checkpoint_path, export_params, files, import_params
from mha_jax.models import weights
from mha_jax.nnx import MultiHeadAttention

# config.json's "hidden_act" -> gelu's `approximate`: HF's "gelu" is the exact (erf) one.
GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 12
    d_ff: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    gelu_approximate: bool = False  # False: x·Φ(x) with erf, as HF's "gelu"

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        """HF's config.json; refuses what this model does not compute. A file that is not a
        JSON object, or lacks a size, raises `files.DamagedFileError` naming it and the key."""
        hf = read_json(path)
        for key in SIZE_KEYS:
            if not (_checks.is_int(hf.get(key)) and hf[key] > 0):
                got = f"{hf[key]!r:.40}" if key in hf else "no such key"
                raise files.damaged(path, key, "be a positive integer", got)
        eps = hf.get("layer_norm_eps")
        if not (type(eps) in (int, float) and math.isfinite(eps) and eps > 0):
            raise files.damaged(path, "layer_norm_eps", "be a positive finite number", f"{eps!r:.40}")
        _checks.check_choice(f"hidden_act in {path}", hf.get("hidden_act"), list(GELU_APPROXIMATE))
        _checks.check_choice(
            f"position_embedding_type in {path}", hf.get("position_embedding_type"), ["absolute"]
        )
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf["type_vocab_size"],
            layer_norm_eps=eps,
            gelu_approximate=GELU_APPROXIMATE[hf["hidden_act"]],
        )


# config.json's sizes, each a positive integer.
SIZE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size",
)  # fmt: skip


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path` (config.json, sentence_bert_config.json); a missing file stays a
    `FileNotFoundError`, a damaged one is a `files.DamagedFileError` naming it."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise files.damaged(path, "its text", "be JSON", f"{type(error).__name__}: {error}") from None
    if not isinstance(value, dict):
        raise files.damaged(path, "its JSON", "be an object {...}", f"{type(value).__name__}")
    return value


def layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it (Flax's fast E[x²] - E[x]² is the default).
    return nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.word = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.position = nnx.Embed(config.max_positions, config.d_model, rngs=rngs)
        self.token_type = nnx.Embed(config.type_vocab_size, config.d_model, rngs=rngs)
        self.norm = layer_norm(config, rngs)

    def __call__(self, ids, token_types):  # [B, L], [B, L] -> [B, L, D]
        positions = jnp.arange(ids.shape[1])
        return self.norm(self.word(ids) + self.position(positions) + self.token_type(token_types))


class Block(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.attention = MultiHeadAttention(config.d_model, config.num_heads, rngs=rngs)
        self.attention_norm = layer_norm(config, rngs)
        self.ff_in = nnx.Linear(config.d_model, config.d_ff, rngs=rngs)
        self.ff_out = nnx.Linear(config.d_ff, config.d_model, rngs=rngs)
        self.ff_norm = layer_norm(config, rngs)
        self.gelu_approximate = config.gelu_approximate

    def __call__(self, x, lengths):  # [B, L, D], [B] -> [B, L, D]
        x = self.attention_norm(x + self.attention(x, kv_length=lengths))
        hidden = jax.nn.gelu(self.ff_in(x), approximate=self.gelu_approximate)  # [B, L, D_ff]
        return self.ff_norm(x + self.ff_out(hidden))


class Bert(nnx.Module):
    """The encoder: token ids [B, L] and lengths [B] -> hidden states [B, L, D] (no pooler)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(self, ids, lengths, token_types=None):
        check_inputs(self.config, ids, lengths)
        token_types = jnp.zeros_like(ids) if token_types is None else token_types
        x = self.embeddings(ids, token_types)  # [B, L, D]
        for block in self.blocks:
            x = block(x, lengths)
        return x


def check_inputs(config: BertConfig, ids, lengths) -> None:
    _checks.check_rank("ids", ids, 2, "[B, L]")
    _checks.check_integer("ids", ids)
    _checks.check_shape("lengths", lengths, (ids.shape[0],), "[B]")
    if ids.shape[1] > config.max_positions:
        raise _checks.fail("ids", f"have at most max_positions={config.max_positions} tokens", ids.shape[1])


def mean_pool(hidden, lengths):  # [B, L, D], [B] -> [B, D]: the mean over each row's valid tokens
    valid = jnp.arange(hidden.shape[1]) < lengths[:, None]  # [B, L]
    total = jnp.where(valid[..., None], hidden, 0.0).sum(axis=1)
    return total / jnp.maximum(lengths, 1)[:, None]


def normalize(x, eps: float = 1e-12):  # [B, D] -> [B, D], unit L2 norm (torch's F.normalize)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@nnx.jit
def embed(model: Bert, ids, lengths):  # [B, L], [B] -> [B, D]: sentence-transformers' embedding
    return normalize(mean_pool(model(ids, lengths), lengths))


# ---- Tokenizer: tokenizer.json through PyPI `tokenizers` ----


def load_tokenizer(folder: str | os.PathLike, max_length: int | None = None) -> tokenizers.Tokenizer:
    """The folder's tokenizer.json, padding a batch on the right to its longest sentence
    and truncating to `max_length` tokens, [CLS] and [SEP] included (default:
    sentence-transformers' max_seq_length, 256 for MiniLM; else the model's max_positions)."""
    folder = Path(folder)
    if max_length is None:
        st_config = folder / "sentence_bert_config.json"
        max_length = (
            read_json(st_config).get("max_seq_length")
            if st_config.is_file()
            else BertConfig.from_json(folder / "config.json").max_positions
        )
    _checks.check_positive("max_length", max_length)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"folder must hold tokenizer.json; got none in {folder}")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception that does not name the file
        raise files.damaged(path, "its JSON", "describe a tokenizer", error) from None
    padding = tokenizer.padding or {}  # MiniLM's file pads to a fixed 128; we pad to the batch's longest
    tokenizer.enable_padding(
        direction="right", pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]")
    )
    tokenizer.enable_truncation(max_length)
    return tokenizer


def tokenize(tokenizer: tokenizers.Tokenizer, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, L] (int32, right-padded) and lengths [B] (tokens before the padding)."""
    if isinstance(sentences, str) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise _checks.fail("sentences", "be a non-empty list of strings", f"{sentences!r:.80}")
    encodings = tokenizer.encode_batch(list(sentences))
    ids = np.array([encoding.ids for encoding in encodings], np.int32)
    lengths = np.array([sum(encoding.attention_mask) for encoding in encodings], np.int32)
    return ids, lengths


# ---- Weights: HF BertModel's names <-> the model's state ----


def as_is(a):
    return a


def transpose(a):  # nn.Linear's [out, in] <-> our [in, out]
    return a.T


# HF name -> (name in the model's state, transform). Each transform is its own inverse, so
# the tables read both ways. Attention weights go through interop's "bert" layout.
EMBEDDINGS: dict[str, tuple[str, Callable]] = {
    "embeddings.word_embeddings.weight": ("embeddings.word.embedding", as_is),
    "embeddings.position_embeddings.weight": ("embeddings.position.embedding", as_is),
    "embeddings.token_type_embeddings.weight": ("embeddings.token_type.embedding", as_is),
    "embeddings.LayerNorm.weight": ("embeddings.norm.scale", as_is),
    "embeddings.LayerNorm.bias": ("embeddings.norm.bias", as_is),
}
BLOCK: dict[str, tuple[str, Callable]] = {  # "encoder.layer.{i}." + name -> "blocks.{i}." + ours
    "attention.output.LayerNorm.weight": ("attention_norm.scale", as_is),
    "attention.output.LayerNorm.bias": ("attention_norm.bias", as_is),
    "intermediate.dense.weight": ("ff_in.kernel", transpose),
    "intermediate.dense.bias": ("ff_in.bias", as_is),
    "output.dense.weight": ("ff_out.kernel", transpose),
    "output.dense.bias": ("ff_out.bias", as_is),
    "output.LayerNorm.weight": ("ff_norm.scale", as_is),
    "output.LayerNorm.bias": ("ff_norm.bias", as_is),
}
# Not read: "embeddings.position_ids" (a buffer, = arange) and "pooler.*" (sentence
# embeddings mean-pool instead).


def weight_table(config: BertConfig) -> dict[str, tuple[str, Callable]]:
    """Every non-attention HF name of the model -> (name in the model's state, transform)."""
    table = dict(EMBEDDINGS)
    for i in range(config.num_layers):
        for name, (ours, transform) in BLOCK.items():
            table[f"encoder.layer.{i}.{name}"] = (f"blocks.{i}.{ours}", transform)
    return table


def from_state_dict(tensors: Mapping[str, np.ndarray], config: BertConfig) -> Bert:
    """The model holding HF BertModel's `tensors` (NumPy arrays), cast to float32."""
    model = nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0)))  # shapes only: nothing is drawn
    shapes = weights.param_shapes(model)
    ours = {}
    for name, (our_name, transform) in weight_table(config).items():
        if name not in tensors:
            raise _checks.fail(
                "tensors", f"contain {name!r} (HF BertModel's names)", f"{len(tensors)} without it"
            )
        hf_shape = transform(np.broadcast_to(np.float32(0), shapes[our_name])).shape  # ours, as HF stores it
        _checks.check_shape(name, tensors[name], hf_shape, our_name)
        ours[our_name] = transform(np.asarray(tensors[name], np.float32))
    for i in range(config.num_layers):  # sizes already checked against the LayerNorms above
        params = import_params("bert", tensors, num_heads=config.num_heads, prefix=f"encoder.layer.{i}.")
        ours.update(
            {
                f"blocks.{i}.attention.{n}": np.asarray(v, np.float32)
                for n, v in params._asdict().items()
                if v is not None  # BERT has no QK-norm scales
            }
        )
    return weights.load_params(model, ours)


def to_state_dict(model: Bert) -> dict[str, np.ndarray]:
    """The model's weights under HF BertModel's names: `from_state_dict`'s inverse (no pooler)."""
    params = weights.params_as_numpy(model)
    tensors = {
        name: np.ascontiguousarray(transform(params[our_name]))
        for name, (our_name, transform) in weight_table(model.config).items()
    }
    for i, block in enumerate(model.blocks):
        prefix = f"encoder.layer.{i}."
        tensors.update(
            export_params("bert", block.attention.params, num_heads=model.config.num_heads, prefix=prefix)
        )
    return tensors


def from_safetensors(path: str | os.PathLike) -> Bert:
    """The model in an HF model.safetensors, its sizes from the config.json beside it. A damaged
    file, or sizes its tensors contradict, raise `files.DamagedFileError` naming the file."""
    path = Path(path)
    config_path = path.parent / "config.json"
    config = BertConfig.from_json(config_path)
    names = files.tensor_shapes(path)  # the header only: a damaged config costs no read
    layers = {int(m[1]) for name in names if (m := re.match(r"encoder\.layer\.(0|[1-9]\d*)\.", name))}
    if config.num_layers != len(layers) or layers != set(range(len(layers))):  # before a loop over them
        held = f"{len(layers)} layers" + (f" (0 to {max(layers)})" if layers else "")
        raise files.damaged(
            config_path,
            "num_hidden_layers",
            f"be the layers in {path.name}",
            f"{config.num_layers}; it holds {held}",
        )
    try:
        return from_state_dict(files.load_tensors(path), config)
    except ValueError as error:  # a size in config.json that the tensors contradict
        raise files.DamagedFileError(f"{path}: {error} (sizes from {config_path.name})") from None


def load(folder: str | os.PathLike | None = None) -> tuple[Bert, tokenizers.Tokenizer]:
    """The model and tokenizer of an HF folder (default: the installed all-MiniLM-L6-v2)."""
    folder = Path(folder) if folder is not None else checkpoint_path("all-minilm-l6-v2").parent
    tokenizer = load_tokenizer(folder)  # first: it is quick, and a missing file is found at once
    return from_safetensors(folder / "model.safetensors"), tokenizer
