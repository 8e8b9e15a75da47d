"""Tensors to and from `.safetensors` files (NumPy in and out; never pickle).

>>> save_tensors("layer0.safetensors", export_params("bert", params, num_heads=12))
>>> params = import_params("bert", load_tensors("layer0.safetensors"), num_heads=12)

A model file is untrusted input: one that contradicts its format or its own header (cut
short, a header that is not UTF-8 JSON, sizes its tensors do not have) raises
`DamagedFileError`, naming the file and the field, before anything it declares is allocated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open


class DamagedFileError(ValueError):
    """A model file (GGUF, safetensors, config.json, tokenizer.json) refused: its bytes contradict
    its format or its own header (cut short, a count or offset past its end, sizes its tensors do
    not have), or it holds what the loader cannot read. A `ValueError`, so the callers that turn
    those into one `error:` line (scripts/embed.py, scripts/generate.py) do so here too."""


def damaged(path: str | os.PathLike, field: str, expectation: str, got: object) -> DamagedFileError:
    """`_checks.fail`'s message, prefixed with the file: "model.gguf: general.alignment must be
    a power of two; got 7"."""
    return DamagedFileError(f"{os.fspath(path)}: {field} must {expectation}; got {got}")


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Write `{name: array}` (NumPy, JAX or CPU torch arrays) to `path`."""
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in tensors.items()}
    safetensors.numpy.save_file(arrays, path, metadata)


def load_tensors(
    path: str | os.PathLike, names: Iterable[str] | None = None, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """`{name: NumPy array}` from `path`: the given `names`, else every name that
    starts with `prefix` (all by default). Only what is asked for is read."""
    with _open(path) as file:
        available = list(file.keys())
        if names is None:
            names = [name for name in available if name.startswith(prefix)]
        missing = sorted(set(names) - set(available))
        if missing:
            raise KeyError(f"names must be tensors in {os.fspath(path)!r}; got missing {missing}")
        return {name: file.get_tensor(name) for name in names}


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` from the header alone: nothing else is read, so a loader can hold the
    shapes to its config before it reads a byte of data."""
    with _open(path) as file:
        return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}


@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[Any]:
    """`safe_open(path)`. The safetensors library checks the header (its length, UTF-8 JSON,
    every tensor's offsets inside the file, without gaps or overlaps) before it maps anything;
    its refusals come out as `DamagedFileError`s naming the file. A missing file stays a
    `FileNotFoundError`."""
    if not os.path.isfile(path):  # safe_open says "No such device" for a folder
        raise FileNotFoundError(f"path must be a .safetensors file; got {os.fspath(path)!r}")
    try:
        with safe_open(path, framework="numpy") as file:
            yield file
    except SafetensorError as error:  # e.g. "Error while deserializing header: invalid UTF-8 in header"
        raise damaged(path, "the safetensors header", "describe the file", error) from None
