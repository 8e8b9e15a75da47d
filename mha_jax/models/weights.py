"""Moving named weights in and out of a model's NNX state: what every model's loader shares.

    shapes = param_shapes(model)                       # {"blocks.0.mlp.gate.kernel": (576, 1536), ...}
    load_params(model, {"blocks.0.mlp.gate.kernel": array, ...})   # every parameter, by name
    arrays = params_as_numpy(model)                    # the inverse, for export

Names are the state's paths joined by dots, as the models' weight tables write them.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mha_jax.interop import unflatten


def flat_params(model: nnx.Module) -> dict[str, nnx.Param]:
    """{"blocks.0.mlp.gate.kernel": the Param, ...}."""
    return {".".join(map(str, path)): param for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name (works on an `nnx.eval_shape` model: nothing drawn)."""
    return {name: param.shape for name, param in flat_params(model).items()}


def load_params(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> nnx.Module:
    """Set every parameter of `model` from `arrays` (by name), as device arrays: a NumPy leaf
    left in the state would be copied in again on every jitted call (1 GB a step for Gemma)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten(jax.tree.map(jnp.asarray, dict(arrays))))
    nnx.update(model, state)
    return model


def params_as_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter by name, as NumPy."""
    return {name: np.asarray(param[...]) for name, param in flat_params(model).items()}
