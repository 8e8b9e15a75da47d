"""Hostile model files: damaged copies of the real checkpoints are refused with one
`DamagedFileError` (a ValueError) that names the file and the field, in under 2 s (a BERT folder,
whose tokenizer is built first: 20 s) and in memory bounded by the file, never with a
UnicodeDecodeError, OverflowError, ZeroDivisionError, MemoryError, IndexError, struct.error...
The first tests are one per finding of issue 15; each failed before the reader checked headers.

The GGUF files are small valid models cut from the installed ones (the real header's metadata
with 1 block and the first 64 tokens; the real Q8_0 rows of 64 tokens' embeddings and block 0's
real Q4_1 / Q5_0 / Q4_K tensors), written here with the header's layout recorded, so that a
damage can name the field it hits. The safetensors files are real MiniLM tensors.

What counts as refused: `DamagedFileError`, or (for a random flip or an extreme value that still
makes a well-formed file: a changed character of a string, a float, a type of the same size) a
read that agrees with the gguf package's own `GGUFReader` on the same bytes and whose model
check refuses it or whose tensors read. GGUF has no checksum: a flip inside a value's bytes that
keeps the file well formed is, by design, read as written (llama.cpp reads it too).

Memory is what tracemalloc sees (Python objects and NumPy buffers; the memory-mapped file is
not allocation): the regression cases must stay within 10 times the header's size plus 1 MiB,
however much the header declares; random damage within 10 times the file's size plus 2 MiB (a
header may hold a real array of numbers, read into a Python list of ~36 bytes per 4-byte number).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import hypothesis
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from hypothesis import strategies as st

from mha_jax.interop import checkpoint_path, files
from mha_jax.interop import gguf as mgguf
from mha_jax.interop.files import DamagedFileError
from mha_jax.models import bert, gemma, llama

VOCAB = 64  # tokens kept from the real vocabularies
SECONDS = 2.0  # each hostile load, on a busy CPU with tracemalloc on
MiB = 2**20


# ---- Running a hostile load: its outcome, under a deadline and a memory bound ----


class Overtime(BaseException):
    """The deadline's alarm; a BaseException, so that no `except Exception` in the code swallows it."""


def bounded(call, *, max_bytes: int, seconds: float = SECONDS):
    """`(result, None)` or `(None, the DamagedFileError)` of `call()`, which must return within
    `seconds` and allocate at most `max_bytes` at its peak; any other exception fails the test."""

    def alarm(signum, frame):
        raise Overtime(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return call(), None
    except DamagedFileError as error:
        return None, error
    finally:
        elapsed = time.perf_counter() - start
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < seconds, f"took {elapsed:.2f} s"
        assert peak <= max_bytes, (
            f"allocated {peak / MiB:.1f} MiB at its peak; the bound is {max_bytes / MiB:.1f}"
        )


def refused(call, path, pattern: str, *, max_bytes: int, seconds: float = SECONDS) -> DamagedFileError:
    """`call()` raises a DamagedFileError that names `path` first and matches `pattern`."""
    result, error = bounded(call, max_bytes=max_bytes, seconds=seconds)
    assert error is not None, f"read without complaint: {type(result).__name__}"
    assert str(error).startswith(f"{path}: "), str(error)
    assert re.search(pattern, str(error)), str(error)
    return error


# ---- GGUF files, written with the header's layout recorded ----


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def encode(kind: GGUFValueType, value) -> bytes:
    """One scalar or string value."""
    if kind == GGUFValueType.STRING:
        return u64(len(value.encode())) + value.encode()
    return struct.pack(mgguf.SCALARS[kind], value)


def kind_of(value):
    """The type each real file stores a value as (ids and sizes UINT32, token types INT32)."""
    items = {str: GGUFValueType.STRING, int: GGUFValueType.INT32, float: GGUFValueType.FLOAT32}
    if isinstance(value, list):
        return (GGUFValueType.ARRAY, items[type(value[0])] if value else GGUFValueType.STRING)
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    return {int: GGUFValueType.UINT32, float: GGUFValueType.FLOAT32, str: GGUFValueType.STRING}[type(value)]


def write_gguf(path: Path, entries, tensors, *, version: int = 3, alignment: int = 32) -> dict:
    """Write a GGUF file: `entries` [(key, kind, value)], `tensors` [(name, NumPy shape, qtype,
    raw bytes)], the data laid out as llama.cpp lays it out. Returns where each header field
    lies, `{field: (start, size)}`: "version", "kv_count", "key:K", "value:K", "tensor:N:dims"..."""
    out, where = bytearray(), {}

    def put(field: str, data: bytes) -> None:
        where[field] = (len(out), len(data))
        out.extend(data)

    put("magic", b"GGUF")
    put("version", u32(version))
    put("tensor_count", u64(len(tensors)))
    put("kv_count", u64(len(entries)))
    for key, kind, value in entries:
        put(f"key_length:{key}", u64(len(key.encode())))
        put(f"key:{key}", key.encode())
        if isinstance(kind, tuple):  # an array: its item type and count, then the items
            put(f"type:{key}", u32(GGUFValueType.ARRAY))
            put(f"item_type:{key}", u32(kind[1]))
            put(f"count:{key}", u64(len(value)))
            put(f"value:{key}", b"".join(encode(kind[1], item) for item in value))
        else:
            put(f"type:{key}", u32(kind))
            put(f"value:{key}", encode(kind, value))
    offset = 0
    for name, shape, qtype, raw in tensors:
        put(f"tensor:{name}:name_length", u64(len(name.encode())))
        put(f"tensor:{name}:name", name.encode())
        put(f"tensor:{name}:n_dims", u32(len(shape)))
        put(f"tensor:{name}:dims", struct.pack(f"<{len(shape)}Q", *reversed(shape)))
        put(f"tensor:{name}:type", u32(qtype))
        put(f"tensor:{name}:offset", u64(offset))
        offset += -(-len(raw) // alignment) * alignment
    where["header"] = (0, len(out))
    for _, _, _, raw in tensors:
        out.extend(bytes(-len(out) % alignment))
        out.extend(raw)
    path.write_bytes(out)
    return where


def real_tensor(file: mgguf.GGUFFile, name: str, rows: int | None = None):
    """(name, shape, qtype, raw bytes) of a real tensor, or of its first `rows` rows."""
    info = file.tensors[name]
    shape = info.shape if rows is None else (rows, *info.shape[1:])
    nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(shape, info.qtype))
    return name, shape, info.qtype, bytes(file.buffer[info.offset : info.offset + nbytes])


def small_model(checkpoint: str) -> dict:
    """The spec of a 1-block model of `VOCAB` tokens cut from a real checkpoint: its metadata
    (general.alignment added, for the cases that damage it) and its real tensors."""
    file = mgguf.open_gguf(checkpoint_path(checkpoint))
    arch = file.metadata["general.architecture"]
    metadata = {"general.architecture": arch, "general.alignment": 32}
    for key, value in file.metadata.items():
        if isinstance(value, list) and key.startswith("tokenizer.ggml."):
            value = [] if key.endswith("merges") else value[:VOCAB]  # no merge of the first 64 tokens
        metadata[key] = value
    metadata[f"{arch}.block_count"] = 1
    if f"{arch}.vocab_size" in metadata:
        metadata[f"{arch}.vocab_size"] = VOCAB
    tensors = [
        real_tensor(file, name, VOCAB if name == "token_embd.weight" else None)
        for name in file.tensors
        if not name.startswith("blk.") or name.startswith("blk.0.")
    ]
    return {
        "entries": [(key, kind_of(value), value) for key, value in metadata.items()],
        "tensors": tensors,
    }


@pytest.fixture(scope="module")
def smollm2():
    return small_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma3():
    return small_model("gemma3-270m")


def with_entry(spec: dict, key: str, value) -> dict:
    """The spec with metadata `key` set to `value` (added last if new)."""
    entries = [entry for entry in spec["entries"] if entry[0] != key]
    position = next((i for i, entry in enumerate(spec["entries"]) if entry[0] == key), len(entries))
    entries.insert(position, (key, kind_of(value), value))
    return {**spec, "entries": entries}


def without_entry(spec: dict, key: str) -> dict:
    return {**spec, "entries": [entry for entry in spec["entries"] if entry[0] != key]}


def renamed(spec: dict, old: str, new: str) -> dict:
    return {**spec, "tensors": [(new if t[0] == old else t[0], *t[1:]) for t in spec["tensors"]]}


def patched(path: Path, where: dict, field: str, data: bytes, at: int = 0) -> None:
    """Overwrite the bytes of header `field` (from byte `at` of it) with `data`, in place."""
    start, size = where[field]
    assert at + len(data) <= size, (field, size)
    raw = bytearray(path.read_bytes())
    raw[start + at : start + at + len(data)] = data
    path.write_bytes(raw)


def cut(path: Path, length: int) -> None:
    path.write_bytes(path.read_bytes()[:length])


def header_bound(where: dict) -> int:
    """The memory a header's parse may take: a few times its bytes, never its declared sizes."""
    return 10 * where["header"][1] + MiB


def file_bound(path: Path) -> int:
    return 10 * path.stat().st_size + 2 * MiB


# ---- One regression test per finding of issue 15 ----


def _open_and_read(name: str):
    return lambda path: mgguf.read_tensor(mgguf.open_gguf(path), name)


def _patch(field: str, data: bytes, at: int = 0):
    return lambda spec, path: patched(path, write_gguf(path, **spec), field, data, at)


def _rewrite(change):
    return lambda spec, path: write_gguf(path, **change(spec))


def point_at(path: Path, where: dict, name: str, other: str) -> None:
    """Tensor `name`'s offset made `other`'s."""
    start, size = where[f"tensor:{other}:offset"]
    patched(path, where, f"tensor:{name}:offset", path.read_bytes()[start : start + size])


def flip_key_bits(path: Path, where: dict, rng: np.random.Generator, flips: int) -> None:
    raw = bytearray(path.read_bytes())
    key_bytes = [
        start + i for field, (start, size) in where.items() if field.startswith("key:") for i in range(size)
    ]
    for position in rng.choice(key_bytes, flips, replace=False):
        raw[position] ^= 0x80
    path.write_bytes(raw)


# finding -> (how the small SmolLM2 file is damaged, what reads it, the message)
GGUF_FINDINGS = {
    "alignment_7": (
        _patch("value:general.alignment", u32(7)),
        mgguf.open_gguf,
        r"general\.alignment must be a power of two; got 7$",
    ),
    "offset_into_another_tensor": (  # attn_k's offset: attn_q's data (both aligned, inside the file)
        lambda spec, path: point_at(
            path, write_gguf(path, **spec), "blk.0.attn_k.weight", "blk.0.attn_q.weight"
        ),
        _open_and_read("blk.0.attn_k.weight"),
        r"tensor 'blk\.0\.attn_[qk]\.weight' offset must not overlap tensor 'blk\.0\.attn_[qk]\.weight'",
    ),
    "duplicate_name": (  # the later entry won, with the other's shape
        _rewrite(lambda spec: renamed(spec, "blk.0.attn_k.weight", "blk.0.attn_q.weight")),
        _open_and_read("blk.0.attn_q.weight"),
        r"tensor \d+ name must be unique; got a second 'blk\.0\.attn_q\.weight'",
    ),
    "version_99": (_patch("version", u32(99)), mgguf.open_gguf, r"version must be 2 or 3; got 99$"),
    "n_dims_2_32_minus_1": (  # read the rest of the file into a list of dims
        _patch("tensor:token_embd.weight:n_dims", u32(2**32 - 1)),
        mgguf.open_gguf,
        r"tensor 'token_embd\.weight' n_dims must be 1 to 4 \(ggml's GGML_MAX_DIMS\); got 4294967295",
    ),
    "key_count_2_64_minus_1": (
        _patch("kv_count", u64(2**64 - 1)),
        mgguf.open_gguf,
        r"kv_count must be at most \d+ \(what the \d+ bytes left can hold\); got 18446744073709551615",
    ),
    "invalid_utf8_key": (
        _patch("key:general.architecture", b"\xff"),
        mgguf.open_gguf,
        r"key 0 must be UTF-8; got b'\\xffeneral\.architecture' \(invalid start byte at byte 32\)",
    ),
    "eight_bit_flips": (  # the high bit of 8 bytes of the keys: the old reader's UnicodeDecodeError
        lambda spec, path: flip_key_bits(path, write_gguf(path, **spec), np.random.default_rng(15), 8),
        mgguf.open_gguf,
        r"key \d+ must be UTF-8; got b'",
    ),
    "offset_2_63": (  # OverflowError in np.frombuffer
        _patch("tensor:output_norm.weight:offset", u64(2**63)),
        _open_and_read("output_norm.weight"),
        rf"tensor 'output_norm\.weight' offset must leave room for its 2304 bytes .*; got {2**63}$",
    ),
    "alignment_0": (  # ZeroDivisionError
        _patch("value:general.alignment", u32(0)),
        mgguf.open_gguf,
        r"general\.alignment must be a power of two; got 0$",
    ),
    "dims_2_40_by_2_40": (  # a reshape error
        _patch("tensor:blk.0.attn_q.weight:dims", struct.pack("<QQ", 2**40, 2**40)),
        _open_and_read("blk.0.attn_q.weight"),
        r"tensor 'blk\.0\.attn_q\.weight' dims must describe at most the file's \d+ bytes; "
        r"got \[1099511627776, 1099511627776\]: \d+ bytes of Q4_1",
    ),
}


@pytest.mark.parametrize("finding", list(GGUF_FINDINGS))
def test_gguf_finding_is_refused(smollm2, tmp_path, finding):
    damage, read, pattern = GGUF_FINDINGS[finding]
    path = tmp_path / "model.gguf"
    damage(smollm2, path)
    where = write_gguf(tmp_path / "intact.gguf", **smollm2)
    refused(lambda: read(path), path, pattern, max_bytes=header_bound(where))


def test_block_count_of_10_8_is_refused_before_a_tensor_is_read(smollm2, tmp_path, monkeypatch):
    """The old loader dequantised every tensor, then built the weight table of 10**8 blocks
    (MemoryError after ~35 s under a 4 GiB cap)."""
    path = tmp_path / "model.gguf"
    where = write_gguf(path, **with_entry(smollm2, "llama.block_count", 10**8))
    reads = []
    monkeypatch.setattr(mgguf, "read_tensor", lambda file, name: reads.append(name))
    pattern = r"llama\.block_count must be the number of blocks .*; got 100000000; the file holds 1 blocks"
    refused(lambda: llama.from_gguf(path), path, pattern, max_bytes=header_bound(where))
    assert reads == []


def test_safetensors_header_that_is_not_utf8_is_refused(minilm_small, tmp_path):
    path = tmp_path / "model.safetensors"
    raw = bytearray(minilm_small.read_bytes())
    raw[raw.index(b'"embeddings.') + 1] = 0xFF  # a tensor name's first byte
    path.write_bytes(raw)
    pattern = r"the safetensors header must describe the file; got .*invalid UTF-8 in header"
    refused(lambda: files.load_tensors(path), path, pattern, max_bytes=file_bound(path))


def test_truncated_real_minilm_is_refused(minilm_folder):
    path = minilm_folder / "model.safetensors"
    real = checkpoint_path("all-minilm-l6-v2")
    path.unlink()
    with real.open("rb") as source:  # the real file's first 64 KiB: its header and a little data
        path.write_bytes(source.read(64 * 1024))
    pattern = (
        r"the safetensors header must describe the file; got .*incomplete metadata, file not fully covered"
    )
    refused(lambda: bert.from_safetensors(path), path, pattern, max_bytes=2 * MiB)
    refused(lambda: bert.load(minilm_folder), path, pattern, max_bytes=2 * MiB)


# ---- The intact small files, and the real ones, pass every check ----


def test_real_checkpoints_pass_the_checks():
    for name, architecture in (("smollm2-135m-instruct", "llama"), ("gemma3-270m", "gemma3")):
        file = mgguf.open_gguf(checkpoint_path(name))
        assert mgguf.check_model(file, architecture)["architecture"] == architecture
    shapes = files.tensor_shapes(checkpoint_path("all-minilm-l6-v2"))
    assert shapes["embeddings.word_embeddings.weight"] == (30522, 384)


def test_small_llama_loads_with_the_real_weights(smollm2, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, **smollm2)
    model = llama.from_gguf(path)
    assert (model.config.num_layers, model.config.vocab_size) == (1, VOCAB)
    real = mgguf.open_gguf(checkpoint_path("smollm2-135m-instruct"))
    np.testing.assert_array_equal(
        model.blocks[0].mlp.down.kernel[...], mgguf.read_tensor(real, "blk.0.ffn_down.weight").T
    )
    np.testing.assert_array_equal(
        model.embed.embedding[...], mgguf.read_tensor(real, "token_embd.weight")[:VOCAB]
    )


def test_small_gemma_passes_the_checks_and_reads(gemma3, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, **gemma3)
    file = mgguf.open_gguf(path)
    assert mgguf.check_model(file, "gemma3")["num_layers"] == 1
    real = mgguf.open_gguf(checkpoint_path("gemma3-270m"))
    for name in ("blk.0.ffn_gate.weight", "blk.0.attn_q_norm.weight"):
        np.testing.assert_array_equal(mgguf.read_tensor(file, name), mgguf.read_tensor(real, name))


# ---- More damage, each refused with its own message ----


def _set(key, value):
    return _rewrite(lambda spec: with_entry(spec, key, value))


GGUF_DAMAGE = {
    "empty_file": (
        lambda spec, path: path.write_bytes(b""),
        r"magic must be b'GGUF' .*; got a file of 0 bytes",
    ),
    "bad_magic": (_patch("magic", b"GGML"), r"magic must be b'GGUF' \(a GGUF file\); got b'GGML'"),
    "version_1": (_patch("version", u32(1)), r"version must be 2 or 3; got 1$"),
    "cut_in_the_header": (
        lambda spec, path: cut(path, write_gguf(path, **spec)["value:tokenizer.chat_template"][0] + 20),
        r"tokenizer\.chat_template must lie inside the file's \d+ bytes; got bytes \d+ to \d+ "
        r"\(the file is cut short",
    ),
    "cut_in_the_data": (
        lambda spec, path: write_gguf(path, **spec) and cut(path, path.stat().st_size - 100),
        r"tensor 'output_norm\.weight' offset must leave room for its 2304 bytes",
    ),
    "tensor_count_too_large": (_patch("tensor_count", u64(2**40)), r"tensor_count must be at most \d+"),
    "string_length_past_the_end": (
        _patch("key_length:general.name", u64(2**62)),
        r"key \d+ must lie inside the file's \d+ bytes; got bytes \d+ to 4611686018427\d+",
    ),
    "unknown_value_type": (
        _patch("type:general.name", u32(13)),
        r"general\.name value type must be a GGUF value type \(0 to 12\); got 13",
    ),
    "array_of_arrays": (
        _patch("item_type:tokenizer.ggml.tokens", u32(GGUFValueType.ARRAY)),
        r"tokenizer\.ggml\.tokens item type must not be ARRAY",
    ),
    "array_count_too_large": (
        _patch("count:tokenizer.ggml.token_type", u64(2**50)),
        r"tokenizer\.ggml\.token_type count must be at most \d+",
    ),
    "token_not_utf8": (
        _patch("value:tokenizer.ggml.tokens", b"\xc3\x28", at=8),  # after the first token's length
        r"tokenizer\.ggml\.tokens\[0\] must be UTF-8; got b'\\xc3\(",
    ),
    "duplicate_key": (
        _rewrite(lambda spec: {**spec, "entries": [*spec["entries"], spec["entries"][2]]}),
        r"key \d+ must be unique; got a second 'general\.",
    ),
    "alignment_a_float": (
        _rewrite(
            lambda spec: {
                **spec,
                "entries": [
                    e if e[0] != "general.alignment" else (e[0], GGUFValueType.FLOAT32, 32.0)
                    for e in spec["entries"]
                ],
            }
        ),
        r"general\.alignment must be a UINT32; got 32\.0 \(FLOAT32\)",
    ),
    "n_dims_0": (_patch("tensor:output_norm.weight:n_dims", u32(0)), r"n_dims must be 1 to 4"),
    "a_dim_of_0": (
        _patch("tensor:output_norm.weight:dims", u64(0)),
        r"output_norm\.weight' dims must be at least 1 each",
    ),
    "unknown_ggml_type": (
        _patch("tensor:output_norm.weight:type", u32(4)),
        r"type must be a ggml type .*; got 4$",
    ),
    "rows_of_partial_blocks": (
        _patch("tensor:blk.0.attn_q.weight:dims", u64(575)),
        r"dims must be at least 1 each, the first a multiple of Q4_1's block of 32; got \[575, 576\]",
    ),
    "unaligned_offset": (
        _patch("tensor:output_norm.weight:offset", u64(8)),
        r"offset must be a multiple of general\.alignment=32; got 8$",
    ),
    "name_too_long": (
        _rewrite(lambda spec: renamed(spec, "output_norm.weight", "o" * 64)),
        r"tensor \d+ name must be at most 63 bytes",
    ),
}


@pytest.mark.parametrize("case", list(GGUF_DAMAGE))
def test_damaged_gguf_is_refused(smollm2, tmp_path, case):
    damage, pattern = GGUF_DAMAGE[case]
    path = tmp_path / "model.gguf"
    damage(smollm2, path)
    refused(lambda: mgguf.open_gguf(path), path, pattern, max_bytes=file_bound(path))


def test_a_type_gguf_cannot_dequantise_is_refused_on_read(smollm2, tmp_path):
    path = tmp_path / "model.gguf"
    where = write_gguf(path, **smollm2)
    patched(path, where, "tensor:output_norm.weight:type", u32(GGMLQuantizationType.I32))  # F32's size
    file = mgguf.open_gguf(path)
    pattern = r"tensor 'output_norm\.weight' type must be one gguf\.quants dequantises; got I32"
    refused(lambda: mgguf.read_tensor(file, "output_norm.weight"), path, pattern, max_bytes=MiB)
    refused(lambda: mgguf.check_model(file, "llama"), path, pattern, max_bytes=MiB)


# The header's sizes against the tensors: (change to the small SmolLM2, the message), each through
# llama.from_gguf, refused before a tensor is read.
MODEL_DAMAGE = {
    "heads_kv_do_not_divide": (
        _set("llama.attention.head_count", 8),
        r"head_count must be divisible by llama\.attention\.head_count_kv=3; got 8",
    ),
    "kv_heads": (
        _set("llama.attention.head_count_kv", 1),
        r"tensor 'blk\.0\.attn_[kv]\.weight' must have shape \[Hkv·Dh, D\]=\(64, 576\) .*; got \(192, 576\)",
    ),
    "width": (
        _set("llama.embedding_length", 575),
        r"llama\.embedding_length must be divisible by llama\.attention\.head_count=9; got 575",
    ),
    "mlp_width": (
        _set("llama.feed_forward_length", 1535),
        r"tensor 'blk\.0\.ffn_\w+\.weight' must have shape .*1535",
    ),
    "vocab_size": (
        _set("llama.vocab_size", VOCAB + 1),
        r"tokenizer\.ggml\.tokens must hold one entry per token \(V=65\); got 64 entries",
    ),
    "block_count_0": (_set("llama.block_count", 0), r"llama\.block_count must be a positive integer; got 0"),
    "block_count_a_string": (
        _set("llama.block_count", "30"),
        r"llama\.block_count must be a positive integer; got '30'",
    ),
    "no_head_count": (
        _rewrite(lambda spec: without_entry(spec, "llama.attention.head_count")),
        r"llama\.attention\.head_count must be a positive integer; got no such key",
    ),
    "rope_base_nan": (
        _set("llama.rope.freq_base", float("nan")),
        r"llama\.rope\.freq_base must be a positive finite number; got nan",
    ),
    "eos_outside_the_vocabulary": (
        _set("tokenizer.ggml.eos_token_id", 10**6),
        r"tokenizer\.ggml\.eos_token_id must be a token id in \[0, 64\); got 1000000",
    ),
    "token_types_short": (
        _set("tokenizer.ggml.token_type", [1] * 3),
        r"tokenizer\.ggml\.token_type must hold one entry per token",
    ),
    "architecture": (
        _set("general.architecture", "gemma3"),
        r"general\.architecture must be 'llama'; got 'gemma3'",
    ),
    "missing_tensor": (
        _rewrite(
            lambda spec: {**spec, "tensors": [t for t in spec["tensors"] if t[0] != "blk.0.ffn_up.weight"]}
        ),
        r"the tensors must include 'blk\.0\.ffn_up\.weight'; got 1 of 11 missing",
    ),
    "unknown_tensor": (
        _rewrite(lambda spec: renamed(spec, "blk.0.ffn_up.weight", "blk.0.ffn_upp.weight")),
        r"tensor 'blk\.0\.ffn_upp\.weight' must be one of a llama model's tensors",
    ),
    "block_1_of_1": (
        _rewrite(
            lambda spec: {
                **spec,
                "tensors": [(t[0].replace("blk.0.", "blk.1."), *t[1:]) for t in spec["tensors"]],
            }
        ),
        r"block_count must be the number of blocks .*; got 1; the file holds 1 blocks \(blk\.1 to blk\.1\)",
    ),
    "untied_output": (
        _rewrite(
            lambda spec: {**spec, "tensors": [*spec["tensors"], ("output.weight", *spec["tensors"][0][1:])]}
        ),
        r"tensors must hold only the tensors of a tied-embedding Llama; got also \['output\.weight'\]",
    ),
}


@pytest.mark.parametrize("case", list(MODEL_DAMAGE))
def test_sizes_the_tensors_contradict_are_refused_before_a_read(smollm2, tmp_path, monkeypatch, case):
    damage, pattern = MODEL_DAMAGE[case]
    path = tmp_path / "model.gguf"
    damage(smollm2, path)
    reads = []
    monkeypatch.setattr(mgguf, "read_tensor", lambda file, name: reads.append(name))
    refused(lambda: llama.from_gguf(path), path, pattern, max_bytes=file_bound(path))
    assert reads == []


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("gemma3.block_count", 10**8, r"gemma3\.block_count must be the number of blocks .*; got 100000000"),
        (
            "gemma3.attention.head_count_kv",
            2,
            r"tensor 'blk\.0\.attn_[kv]\.weight' must have shape \[Hkv·Dh, D\]=\(512, 640\)",
        ),
        (
            "gemma3.attention.sliding_window",
            0,
            r"gemma3\.attention\.sliding_window must be a positive integer; got 0",
        ),
        (
            "tokenizer.ggml.unknown_token_id",
            VOCAB,
            r"unknown_token_id must be a token id in \[0, 64\); got 64",
        ),
    ],
)
def test_gemma_sizes_the_tensors_contradict_are_refused_before_a_read(
    gemma3, tmp_path, monkeypatch, key, value, pattern
):
    path = tmp_path / "model.gguf"
    write_gguf(path, **with_entry(gemma3, key, value))
    reads = []
    monkeypatch.setattr(mgguf, "read_tensor", lambda file, name: reads.append(name))
    refused(lambda: gemma.from_gguf(path), path, pattern, max_bytes=file_bound(path))
    assert reads == []


# ---- Random damage: truncations, extreme values, bit flips ----


def check_outcome(path: Path, intact: dict) -> None:
    """Opening `path` refuses it, or reads what gguf's GGUFReader reads; then the model check
    refuses it, or its tensors read (all of them, where their header entries changed)."""
    file, error = bounded(lambda: mgguf.open_gguf(path), max_bytes=file_bound(path))
    if error is not None:
        return
    reader = gguf.GGUFReader(path)
    assert file.metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    theirs = {
        t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type, int(t.data_offset))
        for t in reader.tensors
    }
    assert {name: tuple(info) for name, info in file.tensors.items()} == theirs
    _, error = bounded(lambda: mgguf.check_model(file, "llama"), max_bytes=file_bound(path))
    if error is None and file.tensors != intact:
        with np.errstate(all="ignore"):  # other bytes read as numbers: NaNs, infinities
            read = lambda: [mgguf.read_tensor(file, name) for name in file.tensors]  # noqa: E731
            bounded(read, max_bytes=20 * path.stat().st_size)


@pytest.fixture(scope="module")
def small_file(smollm2, tmp_path_factory):
    """The intact small SmolLM2 file: (its path, where its header fields lie, its tensors)."""
    path = tmp_path_factory.mktemp("intact") / "model.gguf"
    where = write_gguf(path, **smollm2)
    return path, where, mgguf.open_gguf(path).tensors


@contextlib.contextmanager
def damaged_in_place(path: Path, changes: dict[int, int]):
    """The file with the byte at each position of `changes` set to its value, then restored: a
    few bytes written, not the whole file."""
    with path.open("r+b") as handle:
        original = {}
        for position in changes:
            handle.seek(position)
            original[position] = handle.read(1)[0]
        try:
            for position, value in changes.items():
                handle.seek(position)
                handle.write(bytes([value]))
            handle.flush()
            yield path
        finally:
            for position, value in original.items():
                handle.seek(position)
                handle.write(bytes([value]))


def test_every_cut_of_the_header_is_refused(small_file, tmp_path):
    intact, where, _ = small_file
    raw, path = intact.read_bytes(), tmp_path / "model.gguf"
    ends = sorted({start + size for start, size in where.values()} | {start for start, _ in where.values()})
    for end in [*ends, len(raw) - 1]:  # at and one byte before every field's ends; one byte short
        for length in {max(end - 1, 0), end} - {len(raw)}:
            path.write_bytes(raw[:length])
            refused(lambda: mgguf.open_gguf(path), path, r"must ", max_bytes=file_bound(path))


def numeric_fields(where: dict) -> list[str]:
    """The header's counts, lengths, types, dims and offsets: the numbers it is parsed by."""
    kinds = ("version", "tensor_count", "kv_count", "key_length:", "type:", "item_type:", "count:")
    tensor = (":name_length", ":n_dims", ":dims", ":type", ":offset")
    return [f for f in where if f.startswith(kinds) or (f.startswith("tensor:") and f.endswith(tensor))]


def test_extreme_numbers_in_the_header_are_refused_or_read_correctly(small_file):
    path, where, intact = small_file
    for field in numeric_fields(where):
        start, size = where[field]
        for value in (0, 1, 7, 2**31, 2**32 - 1, path.stat().st_size, 2 ** (8 * size) - 1):
            new = value.to_bytes(size, "little")
            with damaged_in_place(path, {start + i: new[i] for i in range(size)}):
                check_outcome(path, intact)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(data=st.data())
def test_bit_flips_in_the_header_are_refused_or_read_correctly(small_file, data):
    path, where, intact = small_file
    numbers = [
        start + i for field in numeric_fields(where) for start, size in [where[field]] for i in range(size)
    ]
    anywhere = st.integers(0, where["header"][1] - 1)
    position = st.one_of(st.sampled_from(numbers), anywhere)  # half on the numbers it is parsed by
    flips = data.draw(st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=8))
    raw = path.read_bytes()
    changes = {}
    for byte, bit in flips:
        changes[byte] = changes.get(byte, raw[byte]) ^ (1 << bit)
    with damaged_in_place(path, changes):
        check_outcome(path, intact)


# ---- safetensors and BERT folders ----


@pytest.fixture(scope="module")
def minilm_small(tmp_path_factory) -> Path:
    """Real MiniLM tensors (the embeddings' LayerNorm, layer 0's query) in a small file."""
    names = [
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.weight",
    ]
    path = tmp_path_factory.mktemp("minilm") / "small.safetensors"
    files.save_tensors(path, files.load_tensors(checkpoint_path("all-minilm-l6-v2"), names))
    return path


@pytest.fixture
def minilm_folder(tmp_path) -> Path:
    """A folder like the installed MiniLM one: config.json and the tokenizer's files copied, the
    weights linked (not copied)."""
    real = checkpoint_path("all-minilm-l6-v2").parent
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        shutil.copy(real / name, tmp_path / name)
    (tmp_path / "model.safetensors").symlink_to(real / "model.safetensors")
    return tmp_path


def test_safetensors_cut_anywhere_is_refused(minilm_small, tmp_path):
    raw = minilm_small.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    path = tmp_path / "model.safetensors"
    for cut in [0, 7, 8, 9, 8 + header_length // 2, 8 + header_length, len(raw) // 2, len(raw) - 1]:
        path.write_bytes(raw[:cut])
        refused(
            lambda: files.load_tensors(path),
            path,
            r"the safetensors header must describe the file",
            max_bytes=file_bound(path),
        )


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(data=st.data())
def test_bit_flips_in_a_safetensors_header_are_refused_or_read(minilm_small, tmp_path_factory, data):
    raw = minilm_small.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, 8 + header_length - 1), st.integers(0, 7)), min_size=1, max_size=8)
    )
    damaged = bytearray(raw)
    for byte, bit in flips:
        damaged[byte] ^= 1 << bit
    path = tmp_path_factory.mktemp("flips") / "model.safetensors"
    path.write_bytes(damaged)
    tensors, error = bounded(lambda: files.load_tensors(path), max_bytes=file_bound(path))
    if error is None:  # e.g. a changed character of a name: every tensor still of its stated size
        assert sum(array.nbytes for array in tensors.values()) == len(raw) - 8 - header_length


def _config(**changes):
    """Set (or, with None, remove) keys of the folder's config.json."""

    def write(folder: Path) -> None:
        path = folder / "config.json"
        config = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps({key: value for key, value in config.items() if value is not None}))

    return write


# (what is done to a copy of the MiniLM folder, the file the DamagedFileError names, its message)
BERT_DAMAGE = {
    "tokenizer_not_json": (
        lambda folder: (folder / "tokenizer.json").write_text("{"),
        "tokenizer.json",
        r"its JSON must describe a tokenizer",
    ),
    "config_not_utf8": (
        lambda folder: (folder / "config.json").write_bytes(b"\xff{"),
        "config.json",
        r"its text must be JSON; got UnicodeDecodeError",
    ),
    "config_a_list": (
        lambda folder: (folder / "config.json").write_text("[]"),
        "config.json",
        r"its JSON must be an object \{\.\.\.\}; got list",
    ),
    "layers_10_8": (
        _config(num_hidden_layers=10**8),
        "config.json",
        r"num_hidden_layers must be the layers in model\.safetensors; got 100000000; it holds 6 layers",
    ),
    "width_a_string": (
        _config(hidden_size="384"),
        "config.json",
        r"hidden_size must be a positive integer; got '384'",
    ),
    "no_vocab_size": (
        _config(vocab_size=None),
        "config.json",
        r"vocab_size must be a positive integer; got no such key",
    ),
    "width_the_tensors_contradict": (
        _config(intermediate_size=1535),
        "model.safetensors",
        r"encoder\.layer\.0\.intermediate\.dense\.weight must have shape .*\(sizes from config\.json\)$",
    ),
}


@pytest.mark.parametrize("case", list(BERT_DAMAGE))
def test_damaged_bert_folder_is_refused(minilm_folder, case):
    damage, named, pattern = BERT_DAMAGE[case]
    damage(minilm_folder)
    # The tokenizer is built first, and the last case reads the 90 MB of weights: 20 s, 400 MiB.
    refused(lambda: bert.load(minilm_folder), minilm_folder / named, pattern, max_bytes=400 * MiB, seconds=20)


@pytest.mark.parametrize(
    ("missing", "pattern"),
    [("tokenizer.json", r"folder must hold tokenizer\.json; got none in "), ("config.json", r"config\.json")],
)
def test_bert_folder_without_a_file_names_it(minilm_folder, missing, pattern):
    (minilm_folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=pattern):
        bert.load(minilm_folder)
