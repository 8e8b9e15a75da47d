"""GGUF checkpoints (llama.cpp's format) as float32 NumPy arrays laid out as HF transformers loads them.

>>> tensors, metadata = read_gguf(path, names=["blk.0.attn_q.weight", "blk.0.attn_k.weight"])
>>> config = model_config(metadata)            # architecture, heads, rope theta, norm eps, ...
>>> hf = hf_names(tensors, config["architecture"])   # {"model.layers.0.self_attn.q_proj.weight": ...}
>>> params = import_params("llama", hf, num_heads=config["num_heads"],
...                        num_kv_heads=config["num_kv_heads"], prefix="model.layers.0.self_attn.")

What a GGUF file stores, and what `read_gguf` undoes (each checked against
transformers 4.57.1's `load_gguf_checkpoint` on SmolLM2-135M and Gemma-3-270M:
every tensor equal, max |difference| 0):

- Dimensions are listed fastest-first (ggml's `ne`), so the NumPy shape is the
  reverse of the listed one: a Linear weight listed `[in, out]` is `[out, in]`,
  as torch stores it.
- Quantised blocks (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K, ...) are dequantised by the
  `gguf` package's NumPy code, the same code transformers calls.
- llama.cpp's converter permutes the rows of Llama's Q and K projections within
  each head (`permute`), turning HF's rotate-half RoPE layout into the
  interleaved one ggml computes; `unpermute` restores it. Gemma files are not
  permuted.
- Gemma's RMSNorm multiplies by `1 + w`; GGUF stores `1 + w`, HF stores `w`.

The header is parsed here with `struct`: the `gguf` package's `GGUFReader`
builds a NumPy view per token string and took 5.6 s (SmolLM2, 49k tokens) and
25 s (Gemma 3, 262k tokens) to open these files on 2 busy cores, against 0.09 s
and 0.28 s here; the tests check both readers agree. Tensor data is
memory-mapped, so reading a few tensors of a large file is cheap. Metadata values are plain Python
(arrays are lists), keyed by GGUF's names.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from mha_jax import _checks

SCALARS = {  # GGUFValueType -> struct format (little-endian)
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]  # NumPy order: the file's listed dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file


class GGUFFile(NamedTuple):
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header; the tensor data stays on disk, memory-mapped."""
    with open(path, "rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer)
    if buffer[:4] != b"GGUF":
        raise ValueError(f"path must be a GGUF file (magic b'GGUF'); got {bytes(buffer[:4])!r}")
    cursor.pos = 4
    version = cursor.scalar(GGUFValueType.UINT32)
    if version < 2:
        raise ValueError(f"path must be GGUF version 2 or 3; got version {version}")
    tensor_count, kv_count = cursor.scalar(GGUFValueType.UINT64), cursor.scalar(GGUFValueType.UINT64)
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(GGUFValueType(cursor.scalar(GGUFValueType.UINT32)))
    listed = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = [cursor.scalar(GGUFValueType.UINT64) for _ in range(cursor.scalar(GGUFValueType.UINT32))]
        qtype = GGMLQuantizationType(cursor.scalar(GGUFValueType.UINT32))
        listed.append((name, tuple(reversed(dims)), qtype, cursor.scalar(GGUFValueType.UINT64)))
    alignment = metadata.get("general.alignment", 32)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {name: TensorInfo(shape, qtype, data_start + offset) for name, shape, qtype, offset in listed}
    return GGUFFile(metadata, tensors, buffer)


def read_tensor(file: GGUFFile, name: str) -> np.ndarray:
    """One tensor as float32 in its NumPy shape, exactly as stored (no fixes)."""
    if name not in file.tensors:
        raise KeyError(f"name must be a tensor of this file; got {name!r} (e.g. {list(file.tensors)[:3]})")
    info = file.tensors[name]
    byte_shape = quant_shape_to_byte_shape(info.shape, info.qtype)
    raw = np.frombuffer(file.buffer, np.uint8, int(np.prod(byte_shape)), info.offset).reshape(byte_shape)
    return np.array(dequantize(raw, info.qtype), dtype=np.float32).reshape(info.shape)


def read_gguf(
    path: str | os.PathLike, names: Iterable[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`({GGUF name: float32 array as HF loads it}, metadata)`: the given tensors
    (all by default), dequantised, with the architecture's fixes (`FIXES`) applied."""
    file = open_gguf(path)
    config = model_config(file.metadata)
    fixes = FIXES.get(config["architecture"], ())
    tensors = {}
    for name in file.tensors if names is None else names:
        weights = read_tensor(file, name)
        for suffix, fix in fixes:
            if name.endswith(suffix):
                weights = fix(weights, config)
        tensors[name] = weights
    return tensors, file.metadata


def permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `permute` (convert_hf_to_gguf.py, LlamaModel): within each
    head, row `i` of the first half goes to `2i`, row `i` of the second to `2i+1`.
    `weights` is `[heads*Dh, ...]`; pass Hkv for K."""
    half = _half_head(weights, num_heads)
    split = weights.reshape(num_heads, 2, half, *weights.shape[1:])  # [heads, 2, Dh/2, ...]
    return split.swapaxes(1, 2).reshape(weights.shape)


def unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of `permute` (transformers' `_reverse_permute_weights`)."""
    half = _half_head(weights, num_heads)
    pairs = weights.reshape(num_heads, half, 2, *weights.shape[1:])  # [heads, Dh/2, 2, ...]
    return pairs.swapaxes(1, 2).reshape(weights.shape)


def _half_head(weights: np.ndarray, num_heads: int) -> int:
    _checks.check_positive("num_heads", num_heads)
    _checks.check_divides("weights.shape[0] (heads*Dh)", weights.shape[0], "2*num_heads", 2 * num_heads)
    return weights.shape[0] // num_heads // 2


# What transformers' GGUF loader does per architecture (TENSOR_PROCESSORS in
# transformers/modeling_gguf_pytorch_utils.py): (name suffix, fix(weights, config)).
FIXES: dict[str, tuple[tuple[str, Callable[[np.ndarray, dict], np.ndarray]], ...]] = {
    "llama": (
        ("attn_q.weight", lambda w, config: unpermute(w, config["num_heads"])),
        ("attn_k.weight", lambda w, config: unpermute(w, config["num_kv_heads"])),
    ),
    "gemma2": (("norm.weight", lambda w, config: w - 1),),
    "gemma3": (("norm.weight", lambda w, config: w - 1),),
}

# Our name -> GGUF metadata key; "{arch}" is general.architecture.
CONFIG_KEYS = {
    "num_layers": "{arch}.block_count",
    "d_model": "{arch}.embedding_length",
    "d_ff": "{arch}.feed_forward_length",
    "num_heads": "{arch}.attention.head_count",
    "num_kv_heads": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length",
    "rope_theta": "{arch}.rope.freq_base",
    "rope_dim": "{arch}.rope.dimension_count",
    "norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "sliding_window": "{arch}.attention.sliding_window",
    "context_length": "{arch}.context_length",
    "vocab_size": "{arch}.vocab_size",
    "tokenizer": "tokenizer.ggml.model",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def model_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """The model's sizes under our names (`CONFIG_KEYS`); `None` where the file
    has no key, except the defaults llama.cpp assumes: Hkv = H, Dh = D / H,
    vocab size = number of tokens. Tokens and merges stay in `metadata`
    (`tokenizer.ggml.tokens`, `.merges`, `.scores`, `.token_type`)."""
    arch = metadata["general.architecture"]
    config = {"architecture": arch}
    config.update({name: metadata.get(key.format(arch=arch)) for name, key in CONFIG_KEYS.items()})
    if config["num_kv_heads"] is None:
        config["num_kv_heads"] = config["num_heads"]
    if config["head_dim"] is None:
        config["head_dim"] = config["d_model"] // config["num_heads"]
    if config["vocab_size"] is None:
        config["vocab_size"] = len(metadata.get("tokenizer.ggml.tokens", ()))
    return config


# GGUF name -> HF transformers state-dict name (LlamaForCausalLM, Gemma3ForCausalLM).
HF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_BLOCK = {  # "blk.{i}." + key -> "model.layers.{i}." + value
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
HF_BLOCK_BY_ARCH = {
    "llama": {"ffn_norm.weight": "post_attention_layernorm.weight"},
    "gemma3": {
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}


def hf_name(name: str, architecture: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (llama, gemma3)."""
    _checks.check_choice("architecture", architecture, list(HF_BLOCK_BY_ARCH))
    block = {**HF_BLOCK, **HF_BLOCK_BY_ARCH[architecture]}
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match[2] in block:
        return f"model.layers.{match[1]}.{block[match[2]]}"
    if name in HF_TOP:
        return HF_TOP[name]
    raise KeyError(f"name must be a {architecture} GGUF tensor name we map; got {name!r}")


def hf_names(tensors: dict[str, np.ndarray], architecture: str) -> dict[str, np.ndarray]:
    return {hf_name(name, architecture): value for name, value in tensors.items()}


class _Cursor:
    """Reads GGUF values from a buffer, moving `pos` past each."""

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def scalar(self, kind: GGUFValueType):
        fmt = SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar(GGUFValueType.UINT64)
        text = self.buffer[self.pos : self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def strings(self, count: int) -> list[str]:
        """`count` strings in one loop: a vocabulary holds up to 262144 of them."""
        buffer, pos, texts = self.buffer, self.pos, []
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", buffer, pos)
            texts.append(buffer[pos + 8 : pos + 8 + length].decode("utf-8"))
            pos += 8 + length
        self.pos = pos
        return texts

    def value(self, kind: GGUFValueType):
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind != GGUFValueType.ARRAY:
            return self.scalar(kind)
        item_kind = GGUFValueType(self.scalar(GGUFValueType.UINT32))
        count = self.scalar(GGUFValueType.UINT64)
        if item_kind == GGUFValueType.STRING:
            return self.strings(count)
        if item_kind == GGUFValueType.ARRAY:
            return [self.value(item_kind) for _ in range(count)]
        fmt = SCALARS[item_kind]  # numbers: one unpack for the whole array
        values = struct.unpack_from(f"<{count}{fmt[1]}", self.buffer, self.pos)
        self.pos += count * struct.calcsize(fmt)
        return list(values)
