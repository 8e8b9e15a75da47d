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

A model file is untrusted input. `open_gguf` checks the header as llama.cpp's gguf.cpp does
before it trusts any number in it: version 2 or 3; every count (keys, tensors, array items) and
string length within what the bytes left could encode; strings UTF-8; keys and tensor names
unique; known value and ggml types, no arrays of arrays; 1 to 4 dims of at least 1 each, whole
quantisation blocks per row; `general.alignment` a UINT32 power of two; every tensor aligned,
inside the file and overlapping no other. So the header's parse takes time and memory in
proportion to the file's size (Python lists of numbers take ~9 bytes per byte of the file), never
to what it declares. `check_model` then holds the declared sizes (block count, heads, widths,
vocabulary) to the tensors present, names and shapes, before the model builders dequantise or
allocate anything. Every refusal is a `DamagedFileError` (a `ValueError`) naming the file and
the field: "model.gguf: general.alignment must be a power of two; got 7".
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from mha_jax import _checks
from mha_jax.interop.files import DamagedFileError, damaged  # noqa: F401 (gguf.DamagedFileError too)

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
# The fewest bytes one item takes in the file: a string is at least its 8-byte length.
ITEM_BYTES = {kind: struct.calcsize(fmt) for kind, fmt in SCALARS.items()} | {GGUFValueType.STRING: 8}
VALUE_TYPES = {int(kind) for kind in GGUFValueType}
GGML_TYPES = {int(qtype) for qtype in GGML_QUANT_SIZES}  # those with a known block size

VERSIONS = (2, 3)  # llama.cpp reads these (version 1 is no longer read)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME, less the terminating NUL
DEFAULT_ALIGNMENT = 32
# The fewest bytes a key or a tensor entry takes: with them, a declared count is bounded by the
# bytes left before it is looped over. Key: length, value type, a 1-byte value. Tensor: name
# length, n_dims, one dim, type, offset.
MIN_KEY_BYTES = 8 + 4 + 1
MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]  # NumPy order: the file's listed dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file


class GGUFFile(NamedTuple):
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap
    path: str  # for the messages of later checks


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and check the header (see the module's docstring); the tensor data stays on disk,
    memory-mapped. A damaged header raises `DamagedFileError`."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < 4:  # mmap refuses an empty file
            raise damaged(path, "magic", "be b'GGUF' (a GGUF file)", f"a file of {size} bytes")
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    if buffer[:4] != b"GGUF":
        raise damaged(path, "magic", "be b'GGUF' (a GGUF file)", repr(bytes(buffer[:4])))
    cursor = _Cursor(buffer, path, pos=4)
    version = cursor.scalar(GGUFValueType.UINT32, "version")
    if version not in VERSIONS:
        raise damaged(path, "version", "be 2 or 3", version)
    tensor_count = cursor.count(MIN_TENSOR_BYTES, "tensor_count")
    kv_count = cursor.count(MIN_KEY_BYTES, "kv_count")
    metadata, kinds = {}, {}
    for i in range(kv_count):
        key = cursor.string(f"key {i}")
        if key in metadata:
            raise damaged(path, f"key {i}", "be unique", f"a second {key!r}")
        kinds[key] = cursor.kind(f"{key} value type")
        metadata[key] = cursor.value(kinds[key], key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    kind = kinds.get("general.alignment", GGUFValueType.UINT32)
    if kind != GGUFValueType.UINT32:
        raise damaged(path, "general.alignment", "be a UINT32", f"{alignment!r:.40} ({kind.name})")
    if alignment == 0 or alignment & (alignment - 1):
        raise damaged(path, "general.alignment", "be a power of two", alignment)
    listed = {}  # name -> (TensorInfo with the offset from the data section's start, byte size)
    for i in range(tensor_count):
        name, info, nbytes = cursor.tensor_info(i)
        if name in listed:
            raise damaged(path, f"tensor {i} name", "be unique", f"a second {name!r}")
        listed[name] = info, nbytes
    data_start = -(-cursor.pos // alignment) * alignment
    return GGUFFile(metadata, _place(listed, data_start, alignment, size, path), buffer, path)


def _place(
    listed: dict[str, tuple[TensorInfo, int]], data_start: int, alignment: int, size: int, path: str
) -> dict[str, TensorInfo]:
    """Each tensor at its absolute offset, once it is aligned, inside the file, and overlaps no
    other (checked in the order of offsets: each ends before the next begins)."""
    tensors, spans = {}, []
    for name, (info, nbytes) in listed.items():
        if info.offset % alignment:
            aligned = f"be a multiple of general.alignment={alignment}"
            raise damaged(path, f"tensor {name!r} offset", aligned, info.offset)
        start = data_start + info.offset
        if start + nbytes > size:
            room = f"leave room for its {nbytes} bytes in the file's {size} (data from byte {data_start})"
            raise damaged(path, f"tensor {name!r} offset", room, info.offset)
        tensors[name] = info._replace(offset=start)
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (start, end, name), (next_start, _, next_name) in zip(spans, spans[1:], strict=False):
        if next_start < end:
            overlap = f"not overlap tensor {name!r} (data offsets {start - data_start} to {end - data_start})"
            raise damaged(path, f"tensor {next_name!r} offset", overlap, next_start - data_start)
    return tensors


@functools.cache
def dequantisable(qtype: GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` reads this type (it has no I8..I64, F64, Q8_1, Q8_K)."""
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def read_tensor(file: GGUFFile, name: str) -> np.ndarray:
    """One tensor as float32 in its NumPy shape, exactly as stored (no fixes)."""
    if name not in file.tensors:
        raise KeyError(f"name must be a tensor of this file; got {name!r} (e.g. {list(file.tensors)[:3]})")
    info = file.tensors[name]
    if not dequantisable(info.qtype):
        raise damaged(file.path, f"tensor {name!r} type", "be one gguf.quants dequantises", info.qtype.name)
    byte_shape = quant_shape_to_byte_shape(info.shape, info.qtype)  # inside the file: open_gguf checked
    raw = np.frombuffer(file.buffer, np.uint8, math.prod(byte_shape), info.offset).reshape(byte_shape)
    return np.array(dequantize(raw, info.qtype), dtype=np.float32).reshape(info.shape)


def read_tensors(file: GGUFFile, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """`{GGUF name: float32 array as HF loads it}`: the given tensors (all by default),
    dequantised, with the architecture's fixes (`FIXES`) applied."""
    config = model_config(file.metadata)
    fixes = FIXES.get(config["architecture"], ())
    tensors = {}
    for name in file.tensors if names is None else names:
        weights = read_tensor(file, name)
        for suffix, fix in fixes:
            if name.endswith(suffix):
                try:
                    weights = fix(weights, config)
                except ValueError as error:  # e.g. a head count the rows do not divide into
                    raise damaged(file.path, f"tensor {name!r}", "fit the header's sizes", error) from None
        tensors[name] = weights
    return tensors


def read_gguf(
    path: str | os.PathLike, names: Iterable[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`({GGUF name: float32 array as HF loads it}, metadata)`: the given tensors
    (all by default), dequantised, with the architecture's fixes (`FIXES`) applied."""
    file = open_gguf(path)
    return read_tensors(file, names), file.metadata


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
    (`tokenizer.ggml.tokens`, `.merges`, `.scores`, `.token_type`). Nothing is checked
    here: `check_model` holds the sizes to the file's tensors."""
    arch = metadata.get("general.architecture")
    config = {"architecture": arch}
    config.update({name: metadata.get(key.format(arch=arch)) for name, key in CONFIG_KEYS.items()})
    if config["num_kv_heads"] is None:
        config["num_kv_heads"] = config["num_heads"]
    d_model, num_heads = config["d_model"], config["num_heads"]
    if config["head_dim"] is None and _checks.is_int(d_model) and _checks.is_int(num_heads) and num_heads > 0:
        config["head_dim"] = d_model // num_heads
    if config["vocab_size"] is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        config["vocab_size"] = len(tokens) if isinstance(tokens, list) else 0
    return config


# Each tensor's NumPy shape in the legend's sizes (V vocabulary, D width, D_ff MLP width, H, Hkv
# heads of Dh): what `check_model` holds a file's tensors to.
TOP_SHAPES = {
    "token_embd.weight": ("V", "D"),
    "output_norm.weight": ("D",),
}
OPTIONAL_SHAPES = {"output.weight": ("V", "D")}  # an untied output projection
BLOCK_SHAPES = {  # "blk.{i}." + name
    "attn_norm.weight": ("D",),
    "attn_q.weight": ("H·Dh", "D"),
    "attn_k.weight": ("Hkv·Dh", "D"),
    "attn_v.weight": ("Hkv·Dh", "D"),
    "attn_output.weight": ("D", "H·Dh"),
    "ffn_norm.weight": ("D",),
    "ffn_gate.weight": ("D_ff", "D"),
    "ffn_up.weight": ("D_ff", "D"),
    "ffn_down.weight": ("D", "D_ff"),
}
BLOCK_SHAPES_BY_ARCH = {
    "llama": {},
    "gemma3": {
        "attn_q_norm.weight": ("Dh",),
        "attn_k_norm.weight": ("Dh",),
        "post_attention_norm.weight": ("D",),
        "post_ffw_norm.weight": ("D",),
    },
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unknown_token_id")  # tokenizer.ggml.*


def check_model(file: GGUFFile, architecture: str) -> dict[str, Any]:
    """`model_config(file.metadata)`, once the header's sizes agree with the tensors the file
    holds: every size a positive integer (the norm epsilon and RoPE base positive and finite),
    the tokenizer's arrays one entry per token, every tensor one of the architecture's, of the
    shape the sizes give, and every tensor of `block_count` blocks present. Nothing is read or
    allocated, so a header that declares 10**8 blocks is refused at once: the model builders
    call this before they dequantise a tensor. Raises `DamagedFileError`."""
    arch = file.metadata.get("general.architecture")
    if arch != architecture:
        raise damaged(file.path, "general.architecture", f"be {architecture!r}", repr(arch))
    config = model_config(file.metadata)
    _check_sizes(file.metadata, config, file.path)
    _check_vocabulary(file.metadata, config, file.path)
    _check_tensors(file, config)
    return config


def _key(config: dict[str, Any], name: str) -> str:
    """The metadata key of one of `model_config`'s sizes: "num_heads" -> "llama.attention.head_count"."""
    return CONFIG_KEYS[name].format(arch=config["architecture"])


def _got(value) -> str:
    return "no such key" if value is None else f"{value!r:.40}"


def _check_sizes(metadata: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Sizes positive integers (those with a default only when given), H a multiple of Hkv."""
    required = ["num_layers", "d_model", "d_ff", "num_heads", "context_length"]
    defaulted = ["num_kv_heads", "head_dim", "rope_dim"]
    defaulted += ["sliding_window"] if config["architecture"] == "gemma3" else []
    for name in required + defaulted:
        value = metadata.get(_key(config, name))
        if (value is not None or name in required) and not (_checks.is_int(value) and value > 0):
            raise damaged(path, _key(config, name), "be a positive integer", _got(value))
    for name in ("rope_theta", "norm_eps"):
        value = config[name]
        if not (type(value) in (int, float) and math.isfinite(value) and value > 0):
            raise damaged(path, _key(config, name), "be a positive finite number", _got(value))
    heads, kv_heads = config["num_heads"], config["num_kv_heads"]
    if metadata.get(_key(config, "head_dim")) is None and config["d_model"] % heads:  # Dh = D / H
        divisible = f"be divisible by {_key(config, 'num_heads')}={heads}"
        raise damaged(path, _key(config, "d_model"), divisible, config["d_model"])
    if heads % kv_heads:
        divisible = f"be divisible by {_key(config, 'num_kv_heads')}={kv_heads}"
        raise damaged(path, _key(config, "num_heads"), divisible, heads)


def _check_tensors(file: GGUFFile, config: dict[str, Any]) -> None:
    """Every tensor one of the architecture's (`TOP_SHAPES`, `BLOCK_SHAPES`), of the shape the
    sizes give and a type gguf.quants dequantises; every tensor of `block_count` blocks there."""
    head_dim = config["head_dim"]
    sizes = {
        "V": config["vocab_size"], "D": config["d_model"], "D_ff": config["d_ff"], "Dh": head_dim,
        "H·Dh": config["num_heads"] * head_dim, "Hkv·Dh": config["num_kv_heads"] * head_dim,
    }  # fmt: skip
    block_shapes = {**BLOCK_SHAPES, **BLOCK_SHAPES_BY_ARCH[config["architecture"]]}
    blocks = set()
    for name, info in file.tensors.items():
        match = re.fullmatch(r"blk\.(0|[1-9]\d*)\.(.+)", name)
        if match and match[2] in block_shapes:
            blocks.add(int(match[1]))
            legend = block_shapes[match[2]]
        elif name in TOP_SHAPES or name in OPTIONAL_SHAPES:
            legend = {**TOP_SHAPES, **OPTIONAL_SHAPES}[name]
        else:
            model = f"be one of a {config['architecture']} model's tensors"
            raise damaged(file.path, f"tensor {name!r}", model, "an unknown name")
        expected = tuple(sizes[size] for size in legend)
        if info.shape != expected:
            shape = f"have shape [{', '.join(legend)}]={expected} by the header's sizes"
            raise damaged(file.path, f"tensor {name!r}", shape, info.shape)
        if not dequantisable(info.qtype):
            raise damaged(
                file.path, f"tensor {name!r} type", "be one gguf.quants dequantises", info.qtype.name
            )
    # The declared count against the blocks present, before a loop over what it declares (or a
    # set of it: 10**8 blocks).
    num_layers = config["num_layers"]
    if num_layers != len(blocks) or blocks != set(range(len(blocks))):
        held = f"{len(blocks)} blocks" + (f" (blk.{min(blocks)} to blk.{max(blocks)})" if blocks else "")
        count = "be the number of blocks whose tensors the file holds"
        raise damaged(file.path, _key(config, "num_layers"), count, f"{num_layers}; the file holds {held}")
    expected = [*TOP_SHAPES, *(f"blk.{i}.{name}" for i in range(num_layers) for name in block_shapes)]
    missing = [name for name in expected if name not in file.tensors]
    if missing:
        got = f"{len(missing)} of {len(expected)} missing"
        raise damaged(file.path, "the tensors", f"include {missing[0]!r}", got)


def _check_vocabulary(metadata: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """The vocabulary size a positive integer; the tokenizer's arrays (when present) lists of
    the right kind, one entry per token; the special token ids inside the vocabulary."""
    vocab_size = config["vocab_size"]
    if not (_checks.is_int(vocab_size) and vocab_size > 0):
        positive = "be a positive integer (or tokenizer.ggml.tokens be set)"
        raise damaged(path, _key(config, "vocab_size"), positive, _got(vocab_size))
    per_token = f"hold one entry per token (V={vocab_size})"
    for name, kind in {"tokens": str, "token_type": int, "scores": float, "merges": str}.items():
        key, values = f"tokenizer.ggml.{name}", metadata.get(f"tokenizer.ggml.{name}")
        if values is None:
            continue
        if not isinstance(values, list) or (values and type(values[0]) is not kind):  # one type per array
            raise damaged(path, key, f"be an array of {kind.__name__}", _got(values))
        if name != "merges" and len(values) != vocab_size:
            raise damaged(path, key, per_token, f"{len(values)} entries")
    for name in TOKEN_IDS:
        key, value = f"tokenizer.ggml.{name}", metadata.get(f"tokenizer.ggml.{name}")
        if value is not None and not (_checks.is_int(value) and 0 <= value < vocab_size):
            raise damaged(path, key, f"be a token id in [0, {vocab_size})", _got(value))


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
    """Reads GGUF values from a buffer, moving `pos` past each. Every read is checked against
    the file's end and every count against what the bytes left could encode, so a damaged
    header raises `DamagedFileError` (naming `field`) before it costs time or memory."""

    def __init__(self, buffer, path: str, pos: int = 0):
        self.buffer, self.path, self.size, self.pos = buffer, path, len(buffer), pos

    def take(self, nbytes: int, field: str) -> int:
        """The position of the next `nbytes`, which must lie inside the file; moves past them."""
        start = self.pos
        if start + nbytes > self.size:
            raise self.cut_short(field, start, nbytes)
        self.pos = start + nbytes
        return start

    def cut_short(self, field: str, start: int, nbytes: int) -> DamagedFileError:
        cut = f"bytes {start} to {start + nbytes} (the file is cut short or its header damaged)"
        return damaged(self.path, field, f"lie inside the file's {self.size} bytes", cut)

    def scalar(self, kind: GGUFValueType, field: str):
        (value,) = struct.unpack_from(SCALARS[kind], self.buffer, self.take(ITEM_BYTES[kind], field))
        return value

    def count(self, item_bytes: int, field: str) -> int:
        """A declared number of entries of at least `item_bytes` each: at most what is left."""
        count, left = self.scalar(GGUFValueType.UINT64, field), self.size - self.pos
        if count > left // item_bytes:
            most = f"be at most {left // item_bytes} (what the {left} bytes left can hold)"
            raise damaged(self.path, field, most, count)
        return count

    def kind(self, field: str) -> GGUFValueType:
        code = self.scalar(GGUFValueType.UINT32, field)
        if code not in VALUE_TYPES:
            raise damaged(self.path, field, f"be a GGUF value type (0 to {max(VALUE_TYPES)})", code)
        return GGUFValueType(code)

    def string(self, field: str) -> str:
        start = self.take(self.scalar(GGUFValueType.UINT64, f"{field} length"), field)
        return self._decode(start, self.pos, field)

    def _decode(self, start: int, end: int, field: str) -> str:
        try:
            return str(self.buffer[start:end], "utf-8")
        except UnicodeDecodeError as error:
            text = bytes(self.buffer[start : min(end, start + 40)])
            raise damaged(
                self.path, field, "be UTF-8", f"{text!r} ({error.reason} at byte {start + error.start})"
            ) from None

    def strings(self, count: int, field: str) -> list[str]:
        """`count` strings in one loop: a vocabulary holds up to 262144 of them."""
        buffer, pos, size, texts = self.buffer, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise self.cut_short(f"{field}[{len(texts)}] length", pos, 8)
            (length,) = unpack(buffer, pos)
            end = pos + 8 + length
            if end > size:
                raise self.cut_short(f"{field}[{len(texts)}]", pos + 8, length)
            try:
                texts.append(str(buffer[pos + 8 : end], "utf-8"))
            except UnicodeDecodeError:
                self._decode(pos + 8, end, f"{field}[{len(texts)}]")  # raises, saying where
            pos = end
        self.pos = pos
        return texts

    def value(self, kind: GGUFValueType, field: str):
        if kind == GGUFValueType.STRING:
            return self.string(field)
        if kind != GGUFValueType.ARRAY:
            return self.scalar(kind, field)
        item_kind = self.kind(f"{field} item type")
        if item_kind == GGUFValueType.ARRAY:  # llama.cpp reads none; refusing them bounds the recursion
            raise damaged(self.path, f"{field} item type", "not be ARRAY (no arrays of arrays)", "ARRAY")
        count = self.count(ITEM_BYTES[item_kind], f"{field} count")
        if item_kind == GGUFValueType.STRING:
            return self.strings(count, field)
        start = self.take(count * ITEM_BYTES[item_kind], field)  # numbers: one unpack for the whole array
        return list(struct.unpack_from(f"<{count}{SCALARS[item_kind][1]}", self.buffer, start))

    def tensor_info(self, i: int) -> tuple[str, TensorInfo, int]:
        """The `i`-th tensor's name, info (offset from the data section's start) and size in bytes,
        which must fit the file (the dims of no tensor can then overflow a product)."""
        name = self.string(f"tensor {i} name")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise damaged(
                self.path, f"tensor {i} name", f"be at most {MAX_NAME_BYTES} bytes", f"{name!r:.80}"
            )
        field = f"tensor {name!r}"
        n_dims = self.scalar(GGUFValueType.UINT32, f"{field} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise damaged(self.path, f"{field} n_dims", f"be 1 to {MAX_DIMS} (ggml's GGML_MAX_DIMS)", n_dims)
        dims = struct.unpack_from(f"<{n_dims}Q", self.buffer, self.take(8 * n_dims, f"{field} dims"))
        code = self.scalar(GGUFValueType.UINT32, f"{field} type")
        if code not in GGML_TYPES:
            raise damaged(self.path, f"{field} type", "be a ggml type (gguf.GGMLQuantizationType)", code)
        qtype = GGMLQuantizationType(code)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if min(dims) < 1 or dims[0] % block:
            rows = f"be at least 1 each, the first a multiple of {qtype.name}'s block of {block}"
            raise damaged(self.path, f"{field} dims", rows, list(dims))
        nbytes = math.prod(dims) // block * type_size
        if nbytes > self.size:
            fits = f"describe at most the file's {self.size} bytes"
            raise damaged(self.path, f"{field} dims", fits, f"{list(dims)}: {nbytes} bytes of {qtype.name}")
        offset = self.scalar(GGUFValueType.UINT64, f"{field} offset")
        return name, TensorInfo(tuple(reversed(dims)), qtype, offset), nbytes
