"""Tensors to and from `.safetensors` files (NumPy in and out; never pickle).

>>> save_tensors("layer0.safetensors", export_params("bert", params, num_heads=12))
>>> params = import_params("bert", load_tensors("layer0.safetensors"), num_heads=12)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import safe_open


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
    with safe_open(path, framework="numpy") as file:
        available = list(file.keys())
        if names is None:
            names = [name for name in available if name.startswith(prefix)]
        missing = sorted(set(names) - set(available))
        if missing:
            raise KeyError(f"names must be tensors in {os.fspath(path)!r}; got missing {missing}")
        return {name: file.get_tensor(name) for name in names}
