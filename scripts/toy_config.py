"""The training script's config: a frozen dataclass filled from YAML and `--set`, checked
before anything compiles, and the rule for what a resume may change.

Unknown keys are an error that lists the valid ones, and so is a key given twice in one
YAML mapping; values keep the field's type (`--set steps=12` is an int, `num_heads: true`
is refused).

A resume continues the same run, so every config field keeps its saved value
except those in RESUME_MAY_CHANGE: `implementation` and the device mesh (mesh_data,
mesh_seq, mesh_heads, context_parallel: the same function, equal up to rounding; the
checkpoint is resharded onto the new mesh as it is read), the bookkeeping fields (log_every, eval_every,
checkpoint_every, keep_checkpoints, num_heatmaps, target) and `steps` (to train
longer or stop sooner, never below the restored step; the learning-rate
schedule spans `steps`, so the script says that it changes). The model's
shapes, the data (seed, eval_seed, batch_size, eval_size) and the optimiser
(learning_rate, warmup_steps, weight_decay, clip_norm) are refused: change
them in a new run directory.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import jax
import yaml
from toy_tasks import TASKS

import mha_jax
import mha_jax.parallel


@dataclasses.dataclass(frozen=True)
class Config:
    task: str = "recall"  # recall | reverse | teacher
    seed: int = 0  # parameters and the training data stream
    eval_seed: int = 1  # the held-out set: other sequences than training sees
    # model
    d_model: int = 64
    num_heads: int = 4
    implementation: str = "auto"
    # device mesh: data × seq × heads (mesh_data=0: every device the other two leave). With
    # mesh_seq or mesh_heads > 1 the attention runs mha_jax.parallel.mesh_attention, the
    # sequence split by context_parallel: ring | all_to_all | all_gather
    mesh_data: int = 0
    mesh_seq: int = 1
    mesh_heads: int = 1
    context_parallel: str = "ring"
    # recall
    num_keys: int = 64
    num_values: int = 64
    num_pairs: int = 16
    num_queries: int = 4
    # reverse and teacher
    seq_len: int = 12
    vocab_size: int = 16
    # optimisation (AdamW, linear warm-up then cosine decay, global-norm clipping)
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    # bookkeeping
    log_every: int = 50
    eval_every: int = 250
    eval_size: int = 2048
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_heatmaps: int = 3
    target: float = 0.99  # accuracy to reach (relative error to beat, for teacher)


# Fields that decide the shapes of the parameters: a resume must keep them.
MODEL_FIELDS = (
    "task",
    "d_model",
    "num_heads",
    "num_keys",
    "num_values",
    "num_pairs",
    "num_queries",
    "seq_len",
    "vocab_size",
)
# A resume continues the same run: every other field keeps its saved value too,
# except these, which change how the run is computed or watched, not what it computes
# (`steps` stretches the learning-rate schedule, and the script says so).
RESUME_MAY_CHANGE = (
    "steps",
    "implementation",
    "mesh_data",  # a checkpoint restores onto any mesh shape (orbax reshards)
    "mesh_seq",
    "mesh_heads",
    "context_parallel",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "num_heatmaps",
    "target",
)


# The seeds jax.random.PRNGKey tells apart: it takes any int64, but without jax_enable_x64 it
# keeps only the low 32 bits (PRNGKey(2**32) == PRNGKey(0)), so a wider seed would quietly
# repeat another run's data.
SEED_RANGE = (0, 2**32)
# The held-out set is made and evaluated in one piece: its estimated size is capped.
EVAL_MEMORY_LIMIT = 4 * 2**30  # bytes


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------
# Reading: YAML and `--set`, each value as its field's type


def _has_type(value: Any, kind: type) -> bool:
    """A bool is not an int (nor a float); an int is a float."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def _coerce(name: str, kind: type, value: Any) -> Any:
    """`value` (from YAML, or a string from `--set`) as the field's type."""
    try:
        if isinstance(value, str) and kind is not str:
            if kind is bool and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if kind in (int, float):
                return kind(value)  # int("True"), int("2.0") and float("yes") refuse
        elif _has_type(value, kind):
            return kind(value)
        raise ValueError
    except ValueError:
        raise ConfigError(f"config field {name!r} must be of type {kind.__name__}; got {value!r}") from None


def make_config(values: dict[str, Any]) -> Config:
    hints = typing.get_type_hints(Config)
    unknown = sorted(str(k) for k in values if k not in hints)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys are {sorted(hints)}")
    return Config(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"{key!r} on lines {first} and {again}")
        self.key, self.first, self.again = key, first, again


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last value). Keys merged in with `<<` may still be overridden, as YAML says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in lines:
                        raise DuplicateKey(key, lines[key], line)
                    lines[key] = line
                except TypeError:  # an unhashable key: the base class says so
                    break
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file `path`; an empty file is an empty mapping."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigError(f"config file {path} must be a readable file; got {reason}") from None
    try:
        loaded = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKey as error:
        raise ConfigError(f"config file {path} must give each key once; got {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError(f"config file {path} must be valid YAML; got {problem}{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of config keys; got a {type(loaded).__name__}"
        )
    return loaded


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    values = {} if path is None else read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes key=value; got {item!r}")
        values[key.strip()] = value.strip()
    return make_config(values)


# ---------------------------------------------------------------------------
# Checking: impossible settings, and what a resume may change


def check_config(cfg: Config) -> None:
    """Impossible settings fail here, before anything is compiled."""

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    for name, kind in typing.get_type_hints(Config).items():  # a Config made in Python, too
        value = getattr(cfg, name)
        need(_has_type(value, kind), f"config field {name!r} must be of type {kind.__name__}; got {value!r}")
    need(cfg.task in TASKS, f"task must be one of {sorted(TASKS)}; got {cfg.task!r}")
    need(
        cfg.implementation in mha_jax.IMPLEMENTATIONS,
        f"implementation must be one of {list(mha_jax.IMPLEMENTATIONS)}; got {cfg.implementation!r}",
    )
    for name in (
        "d_model",
        "num_heads",
        "num_keys",
        "num_values",
        "num_pairs",
        "num_queries",
        "seq_len",
        "vocab_size",
        "steps",
        "batch_size",
        "log_every",
        "eval_every",
        "eval_size",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        need(getattr(cfg, name) > 0, f"{name} must be positive; got {getattr(cfg, name)}")
    need(
        cfg.d_model % cfg.num_heads == 0,
        f"d_model must be divisible by num_heads={cfg.num_heads}; got {cfg.d_model}",
    )
    need(
        cfg.num_pairs <= cfg.num_keys,
        f"num_pairs must be at most num_keys={cfg.num_keys} (keys in a sequence are distinct); "
        f"got {cfg.num_pairs}",
    )
    need(
        cfg.num_queries <= cfg.num_pairs,
        f"num_queries must be at most num_pairs={cfg.num_pairs}; got {cfg.num_queries}",
    )
    need(
        0 <= cfg.warmup_steps < cfg.steps,
        f"warmup_steps must lie in [0, steps={cfg.steps}); got {cfg.warmup_steps}",
    )
    need(
        0 < cfg.learning_rate < math.inf,
        f"learning_rate must be positive and finite; got {cfg.learning_rate}",
    )
    need(
        0 <= cfg.weight_decay < math.inf,
        f"weight_decay must be non-negative and finite (0 turns it off); got {cfg.weight_decay}",
    )
    need(
        cfg.clip_norm > 0,
        f"clip_norm must be positive (the largest global gradient norm; inf "
        f"turns clipping off); got {cfg.clip_norm}",
    )
    low, high = SEED_RANGE
    for name in ("seed", "eval_seed"):
        value = getattr(cfg, name)
        need(
            low <= value < high,
            f"{name} must lie in [0, 2**32) (the seeds jax.random.PRNGKey tells apart); got {value}",
        )
    need(
        0 <= cfg.num_heatmaps <= cfg.eval_size,
        f"num_heatmaps must lie in [0, eval_size={cfg.eval_size}] (0 draws none); got {cfg.num_heatmaps}",
    )
    if cfg.task == "teacher":
        need(
            0 <= cfg.target < math.inf,
            f"target must be a finite relative error >= 0 (for task 'teacher'); got {cfg.target}",
        )
    else:
        need(
            0 <= cfg.target <= 1,
            f"target must be an accuracy in [0, 1] (for task {cfg.task!r}); got {cfg.target}",
        )
    per_example = eval_bytes_per_example(cfg)
    most = EVAL_MEMORY_LIMIT // per_example
    need(
        cfg.eval_size <= most,
        f"eval_size must be at most {most} (the held-out set is made and evaluated at once: about "
        f"{per_example / 1024:.1f} KiB an example, estimated, within {EVAL_MEMORY_LIMIT / 2**30:g} GiB); "
        f"got {cfg.eval_size}",
    )
    check_mesh(cfg, need)


def eval_bytes_per_example(cfg: Config) -> int:
    """An estimate (from above; XLA fuses much of it) of the bytes one held-out example takes
    while the set is made and evaluated: its inputs and targets, the embeddings and
    projections [L, D], the scores and weights [H, Lq, Lk] and the logits [Lq, outputs]."""
    if cfg.task == "recall":
        lq, lk, outputs, drawn = cfg.num_queries, cfg.num_pairs, cfg.num_values, cfg.num_keys
    else:
        lq = lk = cfg.seq_len
        outputs, drawn = (cfg.vocab_size if cfg.task == "reverse" else cfg.d_model), 0
    words = (
        drawn + 2 * (lq + lk) + 4 * (lq + lk) * cfg.d_model + 2 * cfg.num_heads * lq * lk + 2 * lq * outputs
    )
    return 4 * words  # int32 and float32


def check_mesh(cfg: Config, need) -> None:
    """The mesh fits the devices, and the batch, sequences and heads split over it evenly."""
    devices = jax.device_count()
    need(cfg.mesh_data >= 0, f"mesh_data must be non-negative (0: the devices left); got {cfg.mesh_data}")
    for name in ("mesh_seq", "mesh_heads"):
        need(getattr(cfg, name) > 0, f"{name} must be positive; got {getattr(cfg, name)}")
    model = cfg.mesh_seq * cfg.mesh_heads
    need(
        cfg.mesh_data > 0 or devices % model == 0,
        f"mesh_seq × mesh_heads must divide the device count {devices}; "
        f"got {cfg.mesh_seq} × {cfg.mesh_heads}",
    )
    data = cfg.mesh_data or devices // model
    need(
        data * model == devices,
        f"mesh_data × mesh_seq × mesh_heads must equal the device count {devices}; "
        f"got {cfg.mesh_data} × {cfg.mesh_seq} × {cfg.mesh_heads}",
    )
    need(
        cfg.batch_size % data == 0,
        f"batch_size must be divisible by the mesh's data size {data}; got {cfg.batch_size}",
    )
    need(
        cfg.eval_size % data == 0,
        f"eval_size must be divisible by the mesh's data size {data}; got {cfg.eval_size}",
    )
    if model == 1:
        return
    contexts = list(mha_jax.parallel.CONTEXTS)
    need(
        cfg.context_parallel in contexts,
        f"context_parallel must be one of {contexts}; got {cfg.context_parallel!r}",
    )
    need(
        cfg.implementation in ("auto", "blockwise"),
        f'implementation must be "auto" or "blockwise" with mesh_seq or mesh_heads > 1 (each device '
        f"runs the blockwise kernel); got {cfg.implementation!r}",
    )
    need(
        cfg.num_heads % cfg.mesh_heads == 0,
        f"num_heads must be divisible by mesh_heads={cfg.mesh_heads}; got {cfg.num_heads}",
    )
    lengths = ("num_pairs", "num_queries") if cfg.task == "recall" else ("seq_len",)
    for name in lengths:
        need(
            getattr(cfg, name) % cfg.mesh_seq == 0,
            f"{name} must be divisible by mesh_seq={cfg.mesh_seq} (the sequence is split); "
            f"got {getattr(cfg, name)}",
        )
    local_heads = cfg.num_heads // cfg.mesh_heads
    need(
        cfg.context_parallel != "all_to_all" or local_heads % cfg.mesh_seq == 0,
        f"num_heads / mesh_heads must be divisible by mesh_seq={cfg.mesh_seq} for "
        f"context_parallel='all_to_all' (it splits each device's heads); got {local_heads}",
    )


def check_resume(saved: Config, cfg: Config, run_dir: Path) -> None:
    """A resume of `run_dir` (last run with `saved`) must continue the same run: only the
    fields in RESUME_MAY_CHANGE may differ. (That `steps` stays at or above the restored
    step is checked once the checkpoint is read.)"""
    changed = [
        f.name
        for f in dataclasses.fields(Config)
        if f.name not in RESUME_MAY_CHANGE and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if not changed:
        return
    detail = lambda fields: ", ".join(f"{f}: {getattr(saved, f)!r} -> {getattr(cfg, f)!r}" for f in fields)
    shape = [f for f in changed if f in MODEL_FIELDS]
    rest = [f for f in changed if f not in MODEL_FIELDS]
    what = ([f"the model shape ({detail(shape)})"] if shape else []) + (
        [f"what the run computes ({detail(rest)})"] if rest else []
    )
    raise ConfigError(
        f"cannot resume {run_dir}: the config changes {' and '.join(what)}; a resumed run "
        f"must keep every field saved in {run_dir / 'config.yaml'} except "
        f"{', '.join(RESUME_MAY_CHANGE)} (start another --run-dir to change the others)"
    )
