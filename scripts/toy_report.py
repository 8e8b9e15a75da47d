"""What a finished training run shows: its curves, attention heatmaps of held-out
examples, and the one summary line.

The heatmaps come from a reference copy of the model with the trained parameters,
so a run with a fast implementation (which never materialises the weights) draws
them too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from plotting import curves, heatmap
from toy_config import Config
from toy_tasks import TASKS


def reference_weights(cfg: Config, params: dict, batch) -> jax.Array:
    """Attention weights [B, H, Lq, Lk] of the trained `params` on `batch`.

    Only implementation="reference" returns them; the implementation is a static
    attribute of the module and the parameters are the same for every one, so
    the trained parameters merge into a reference copy of the model.
    """
    model_cls, _, _ = TASKS[cfg.task]
    reference = dataclasses.replace(cfg, implementation="reference")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_cls(reference, nnx.Rngs(0))))
    _, weights = nnx.merge(graphdef, params)(batch, return_weights=True)
    return weights


def draw_pictures(
    cfg: Config,
    run_dir: Path,
    history: list[dict],
    params: dict,
    eval_set,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """curves.png, and heatmap_<b>.png of the most decided head for the first held-out examples;
    once `stop()` is true, no further picture is begun (each one is written whole)."""
    keys = ["loss", "eval_loss"] + (
        ["relative_error", "eval_relative_error"] if cfg.task == "teacher" else ["accuracy", "eval_accuracy"]
    )
    curves(history, keys, run_dir / "curves.png", f"{cfg.task}: training and held-out metrics")
    _, _, labels_for = TASKS[cfg.task]
    count = cfg.num_heatmaps
    if count == 0 or stop():
        return
    examples = jax.tree.map(lambda a: np.asarray(a[:count]), eval_set)
    weights = np.asarray(reference_weights(cfg, params, examples))  # [n, H, Lq, Lk]
    for b in range(count):
        if stop():
            return
        head = int(weights[b].max(-1).mean(-1).argmax())  # the most decided head
        rows, cols = labels_for(cfg, examples, b)
        heatmap(
            weights[b, head],
            rows,
            cols,
            f"{cfg.task}, held-out example {b}, head {head}",
            run_dir / f"heatmap_{b}.png",
        )


def summary(cfg: Config, history: list[dict], steps: int, seconds: float, run_dir: Path) -> str:
    """The line printed at the end: speed, the final held-out metric, and the target."""
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    metric = "eval_relative_error" if cfg.task == "teacher" else "eval_accuracy"
    final = evals[-1][metric] if evals else float("nan")
    reached = final <= cfg.target if cfg.task == "teacher" else final >= cfg.target
    sign = "<=" if cfg.task == "teacher" else ">="
    return (
        f"done: {steps} steps in {seconds:.1f} s ({steps / seconds:.1f} steps/s); held-out "
        f"{metric.removeprefix('eval_')} {final:.4g} ({'reached' if reached else 'MISSED'} "
        f"target {sign} {cfg.target}); run directory {run_dir}"
    )
