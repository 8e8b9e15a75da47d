"""Learn Wq, Wk, Wv with optax on a toy task you can watch.

    python scripts/train_toy.py                          # associative recall (configs/recall.yaml)
    python scripts/train_toy.py --config configs/reverse.yaml --set steps=600
    python scripts/train_toy.py --resume runs/recall-20261125-101500
    python scripts/train_toy.py --compare-flax           # steps/s: ours vs flax.nnx attention

Reads in the order things happen: config, data, parameters, optimizer, step,
loop. Each run writes a run directory with config.yaml (as resolved),
metrics.jsonl, curves.png, heatmap PNGs and orbax checkpoints; Ctrl-C or
SIGTERM saves a checkpoint and exits, and --resume continues bit-identically
(on the same devices and implementation).

A resume continues the same run, so every config field keeps its saved value
except those in RESUME_MAY_CHANGE: `implementation` (the same function, equal
up to rounding), the bookkeeping fields (log_every, eval_every,
checkpoint_every, keep_checkpoints, num_heatmaps, target) and `steps` (to train
longer or stop sooner, never below the restored step; the learning-rate
schedule spans `steps`, so the script says that it changes). The model's
shapes, the data (seed, eval_seed, batch_size, eval_size) and the optimiser
(learning_rate, warmup_steps, weight_decay, clip_norm) are refused: change
them in a new run directory. If the latest checkpoint does not read, the
newest one that does is restored (the unreadable ones are moved to
RUN_DIR/unreadable-checkpoints); only when none reads is it an error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import signal
import statistics
import sys
import time
import typing
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from plotting import curves, heatmap
from toy_tasks import TASKS, loss_and_metrics
from tqdm import tqdm

import mha_jax

# ---------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class Config:
    task: str = "recall"  # recall | reverse | teacher
    seed: int = 0  # parameters and the training data stream
    eval_seed: int = 1  # the held-out set: other sequences than training sees
    # model
    d_model: int = 64
    num_heads: int = 4
    implementation: str = "auto"
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
MODEL_FIELDS = ("task", "d_model", "num_heads", "num_keys", "num_values", "num_pairs",
                "num_queries", "seq_len", "vocab_size")  # fmt: skip
# A resume continues the same run: every other field keeps its saved value too,
# except these, which change how the run is computed or watched, not what it computes
# (`steps` stretches the learning-rate schedule, and the script says so).
RESUME_MAY_CHANGE = ("steps", "implementation", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "num_heatmaps", "target")  # fmt: skip


class ConfigError(ValueError):
    pass


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
        raise ConfigError(
            f"config field {name!r} must be of type {kind.__name__}; got {value!r}"
        ) from None


def make_config(values: dict[str, Any]) -> Config:
    hints = typing.get_type_hints(Config)
    unknown = sorted(str(k) for k in values if k not in hints)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys are {sorted(hints)}")
    return Config(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file `path`; an empty file is an empty mapping."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigError(f"config file {path} must be a readable file; got {reason}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError(f"config file {path} must be valid YAML; got {problem}{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys; "
                          f"got a {type(loaded).__name__}")  # fmt: skip
    return loaded


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    values = {} if path is None else read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes key=value; got {item!r}")
        values[key.strip()] = value.strip()
    return make_config(values)


def check_config(cfg: Config) -> None:
    """Impossible settings fail here, before anything is compiled."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    for name, kind in typing.get_type_hints(Config).items():  # a Config made in Python, too
        value = getattr(cfg, name)
        need(_has_type(value, kind),
             f"config field {name!r} must be of type {kind.__name__}; got {value!r}")
    need(cfg.task in TASKS, f"task must be one of {sorted(TASKS)}; got {cfg.task!r}")
    need(cfg.implementation in mha_jax.IMPLEMENTATIONS,
         f"implementation must be one of {list(mha_jax.IMPLEMENTATIONS)}; "
         f"got {cfg.implementation!r}")  # fmt: skip
    for name in ("d_model", "num_heads", "num_keys", "num_values", "num_pairs", "num_queries",
                 "seq_len", "vocab_size", "steps", "batch_size", "log_every", "eval_every",
                 "eval_size", "checkpoint_every", "keep_checkpoints"):  # fmt: skip
        need(getattr(cfg, name) > 0, f"{name} must be positive; got {getattr(cfg, name)}")
    need(cfg.d_model % cfg.num_heads == 0,
         f"d_model must be divisible by num_heads={cfg.num_heads}; got {cfg.d_model}")
    need(cfg.num_pairs <= cfg.num_keys,
         f"num_pairs must be at most num_keys={cfg.num_keys} (keys in a sequence are distinct); "
         f"got {cfg.num_pairs}")  # fmt: skip
    need(cfg.num_queries <= cfg.num_pairs,
         f"num_queries must be at most num_pairs={cfg.num_pairs}; got {cfg.num_queries}")
    need(0 <= cfg.warmup_steps < cfg.steps,
         f"warmup_steps must lie in [0, steps={cfg.steps}); got {cfg.warmup_steps}")
    need(0 < cfg.learning_rate < math.inf,
         f"learning_rate must be positive and finite; got {cfg.learning_rate}")
    need(0 <= cfg.weight_decay < math.inf,
         f"weight_decay must be non-negative and finite (0 turns it off); got {cfg.weight_decay}")
    need(cfg.clip_norm > 0, f"clip_norm must be positive (the largest global gradient norm; inf "
                            f"turns clipping off); got {cfg.clip_norm}")  # fmt: skip
    need(cfg.num_heatmaps <= cfg.eval_size, "num_heatmaps must be at most eval_size")
    devices = jax.device_count()
    need(cfg.batch_size % devices == 0,
         f"batch_size must be divisible by the device count {devices}; got {cfg.batch_size}")


# ---------------------------------------------------------------------------
# Data


def batch_for_step(cfg: Config, step) -> dict[str, jax.Array]:
    """The training batch of `step`: a pure function of (seed, step)."""
    _, make_batch, _ = TASKS[cfg.task]
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
    return make_batch(cfg, rng, cfg.batch_size)


def held_out_set(cfg: Config) -> dict[str, jax.Array]:
    _, make_batch, _ = TASKS[cfg.task]
    return make_batch(cfg, jax.random.PRNGKey(cfg.eval_seed + 1_000_003), cfg.eval_size)


# ---------------------------------------------------------------------------
# Parameters and optimizer


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict  # nnx.to_pure_dict of the model
    opt_state: Any


def initial_state(cfg: Config, flax_reference: bool = False):
    """(graphdef, optimizer, step-0 TrainState) of the task's model, from `cfg.seed`."""
    model_cls, _, _ = TASKS[cfg.task]
    graphdef, model_state = nnx.split(model_cls(cfg, nnx.Rngs(cfg.seed), flax_reference))
    optimizer = make_optimizer(cfg)
    params = nnx.to_pure_dict(model_state)
    return graphdef, optimizer, TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, end_value=cfg.learning_rate * 0.01
    )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))  # fmt: skip


# ---------------------------------------------------------------------------
# Step


def make_steps(cfg: Config, graphdef, optimizer, shardings):
    """Pure, jitted `train_step(state, batch) -> (state, metrics)` and `evaluate`."""

    def forward(params, batch):
        return nnx.merge(graphdef, params)(batch)

    def train_step(state: TrainState, batch):
        def loss_fn(params):
            outputs, _ = forward(params, batch)
            return loss_and_metrics(cfg.task, outputs, batch)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), metrics

    def evaluate(params, batch):
        outputs, _ = forward(params, batch)
        return loss_and_metrics(cfg.task, outputs, batch)[1]

    state_sharding, data_sharding = shardings
    train_step = jax.jit(train_step, in_shardings=(state_sharding, data_sharding),
                         donate_argnums=0)  # fmt: skip
    batches = jax.jit(lambda step: batch_for_step(cfg, step), out_shardings=data_sharding)
    return train_step, jax.jit(evaluate), batches


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


def shardings_for(state: TrainState):
    """Data parallel over every visible device: batch split on its first axis,
    parameters and optimizer state replicated."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    return replicated, NamedSharding(mesh, P("data"))


# ---------------------------------------------------------------------------
# Checkpoints


class CheckpointError(RuntimeError):
    """The run directory, or the checkpoints in it, cannot be used."""


@contextlib.contextmanager
def files_of(run_dir: Path):
    """OSErrors on the run directory (or a folder above it) become one CheckpointError that
    names the file; other OSErrors pass through."""
    try:
        yield
    except OSError as error:
        path = Path(error.filename) if isinstance(error.filename, str) else run_dir
        inside, here = path.absolute(), run_dir.absolute()
        if not (inside.is_relative_to(here) or here.is_relative_to(inside)):
            raise
        raise CheckpointError(f"{path} must be writable (the run directory {run_dir} keeps the "
                              f"run's files); got {error.strerror or error}") from error


def _tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _reason(error: Exception) -> str:
    """`error` on one short line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200] + '...' if len(text) > 200 else text}"


def checkpoint_manager(run_dir: Path, cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                           enable_async_checkpointing=False)  # fmt: skip
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def restore_latest(manager: ocp.CheckpointManager, like: TrainState, run_dir: Path) -> TrainState:
    """The newest checkpoint that reads; newer unreadable ones are skipped, with a warning."""
    where = run_dir / "checkpoints"
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint found in {where}; nothing to resume")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    failures = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # orbax raises many kinds for damaged files
            failures.append((step, _reason(error)))
            continue
        for skipped, reason in failures:
            _tell(f"warning: the checkpoint at step {skipped} in {where} could not be read "
                  f"({reason}); restoring step {step} instead")  # fmt: skip
        return TrainState(*restored) if not isinstance(restored, TrainState) else restored
    details = "; ".join(f"step {skipped} ({reason})" for skipped, reason in failures)
    raise CheckpointError(f"the checkpoints in {where} could not be read: {details}; "
                          "nothing was overwritten")  # fmt: skip


def set_aside_newer(manager: ocp.CheckpointManager, step: int, run_dir: Path) -> None:
    """Move the checkpoints after `step` (the unreadable ones `restore_latest` skipped) to
    RUN_DIR/unreadable-checkpoints, so the resumed run can save those steps again."""
    newer = [s for s in manager.all_steps() if s > step]
    for skipped in newer:
        target = run_dir / "unreadable-checkpoints" / f"{skipped}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(exist_ok=True)
        shutil.move(Path(manager.directory) / str(skipped), target)
        _tell(f"warning: moved the unreadable checkpoint at step {skipped} to {target}")
    if newer:
        manager.reload()


def all_finite(tree) -> bool:
    return bool(jax.tree.reduce(lambda a, b: a & b,
                                jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)))  # fmt: skip


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Loop


def saved_config(run_dir: Path) -> Config:
    """The config a run directory was last run with: its config.yaml."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory: {path} is missing")
    values = read_yaml(path)
    if not values:
        raise CheckpointError(f"{path} must hold the run's config; got an empty file")
    return make_config(values)


def prepare_run_dir(cfg: Config, run_dir: Path | None, resume: Path | None) -> Path:
    """The run directory. A resume must continue the same run (see RESUME_MAY_CHANGE);
    a fresh start gets its config.yaml and no metrics.jsonl of an earlier attempt."""
    if resume is not None:
        before = saved_config(resume)
        changed = [f.name for f in dataclasses.fields(Config) if f.name not in RESUME_MAY_CHANGE
                   and getattr(before, f.name) != getattr(cfg, f.name)]  # fmt: skip
        if changed:
            detail = lambda fields: ", ".join(
                f"{f}: {getattr(before, f)!r} -> {getattr(cfg, f)!r}" for f in fields)  # fmt: skip
            shape = [f for f in changed if f in MODEL_FIELDS]
            rest = [f for f in changed if f not in MODEL_FIELDS]
            what = ([f"the model shape ({detail(shape)})"] if shape else []) + (
                [f"what the run computes ({detail(rest)})"] if rest else [])  # fmt: skip
            raise ConfigError(
                f"cannot resume {resume}: the config changes {' and '.join(what)}; a resumed run "
                f"must keep every field saved in {resume / 'config.yaml'} except "
                f"{', '.join(RESUME_MAY_CHANGE)} (start another --run-dir to change the others)"
            )
        return resume
    if run_dir is None:
        run_dir = Path("runs") / f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume {run_dir} to "
                              "continue it, or choose another --run-dir")  # fmt: skip
    with files_of(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, cfg)  # the first write: an unwritable directory fails here
        if (run_dir / "metrics.jsonl").exists():  # of an attempt that saved no checkpoint
            _tell(f"note: {run_dir / 'metrics.jsonl'} of an earlier attempt without checkpoints "
                  "is replaced")  # fmt: skip
            (run_dir / "metrics.jsonl").unlink()
    return run_dir


def _write_config(run_dir: Path, cfg: Config) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def resume_state(cfg: Config, manager: ocp.CheckpointManager, like: TrainState,
                 run_dir: Path) -> tuple[TrainState, list[dict]]:  # fmt: skip
    """The state and history to continue from. The run directory changes only once the
    resume is sure: a refused one leaves it as it was."""
    state = restore_latest(manager, like, run_dir)
    step, saved_steps = int(state.step), saved_config(run_dir).steps
    if cfg.steps < step:
        raise ConfigError(f"steps must be at least the restored step {step} to resume {run_dir}; "
                          f"got {cfg.steps}")  # fmt: skip
    history = read_history(run_dir, upto=step)
    if cfg.steps != saved_steps:
        _tell(f"note: resuming with steps={cfg.steps} (was {saved_steps}): the learning-rate "
              f"schedule spans steps, so from step {step} on it differs from the saved run's")
    set_aside_newer(manager, step, run_dir)
    _write_config(run_dir, cfg)
    return state, history


def main(cfg: Config, *, run_dir: Path | None = None, resume: Path | None = None,
         quiet: bool = False, stop_at: int | None = None) -> list[dict]:  # fmt: skip
    """Train; return the logged history (one dict per log or eval point).

    `stop_at` ends the loop early as an interruption would (for tests).
    """
    check_config(cfg)
    run_dir = prepare_run_dir(cfg, run_dir, resume)

    graphdef, optimizer, state = initial_state(cfg)
    history = []  # a fresh start: prepare_run_dir removed any earlier metrics.jsonl
    with files_of(run_dir):
        manager = checkpoint_manager(run_dir, cfg)
        if resume is not None:
            state, history = resume_state(cfg, manager, state, run_dir)
    state_sharding, data_sharding = shardings_for(state)
    state = jax.device_put(state, state_sharding)
    train_step, evaluate, batches = make_steps(cfg, graphdef, optimizer,
                                               (state_sharding, data_sharding))  # fmt: skip
    eval_set = jax.device_put(held_out_set(cfg), data_sharding)

    stop_signal = {}
    handlers = {s: signal.signal(s, lambda signum, _: stop_signal.setdefault("signal", signum))
                for s in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    start_step, start_time = int(state.step), time.perf_counter()
    last = min(cfg.steps, stop_at or cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start_step, disable=quiet, unit="step",
               desc=cfg.task, dynamic_ncols=True)  # fmt: skip
    metrics = None
    try:
        for step in range(start_step, last):
            state, metrics = train_step(state, batches(step))
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == last:
                record = _log(history, run_dir, done, "train", jax.device_get(metrics))
                if not math.isfinite(record["loss"]):
                    raise NonFiniteLoss(_nonfinite_message(done, manager, run_dir))
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"})
                if quiet:
                    print(json.dumps(record), flush=True)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                record = _log(history, run_dir, done, "eval", jax.device_get(
                    evaluate(state.params, eval_set)))  # fmt: skip
                if quiet:
                    print(json.dumps(record), flush=True)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _save(manager, done, state, run_dir)
            if "signal" in stop_signal:
                break
    finally:
        bar.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)

    stopped_early = int(state.step) < cfg.steps
    if stopped_early and manager.latest_step() != int(state.step):
        _save(manager, int(state.step), state, run_dir)
    with files_of(run_dir):
        manager.close()
    if "signal" in stop_signal:
        name = signal.Signals(stop_signal["signal"]).name
        print(f"{name} received: checkpoint saved at step {int(state.step)} in {run_dir}; "
              f"continue with --resume {run_dir}", flush=True)  # fmt: skip
        history.append(dict(step=int(state.step), interrupted=name))
        return history

    seconds = time.perf_counter() - start_time
    with files_of(run_dir):
        _pictures(cfg, run_dir, history, state.params, eval_set)
    if not stopped_early:
        print(_summary(cfg, history, int(state.step) - start_step, seconds, run_dir), flush=True)
    return history


def _log(history, run_dir, step, split, metrics) -> dict:
    record = {"step": step, **{f"{split}_{k}" if split == "eval" else k: float(v)
                               for k, v in metrics.items()}}  # fmt: skip
    history.append(record)
    with files_of(run_dir), open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_history(run_dir: Path, upto: int) -> list[dict]:
    """Records up to the restored step; later ones (from after the checkpoint) are dropped,
    and so is a last line cut short by a kill mid-write."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    history = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            if number == len(lines):
                _tell(f"warning: dropped the last line of {path}, which is not a whole record "
                      f"(a write cut short?): {line[:80]!r}")  # fmt: skip
                break
            raise CheckpointError(f"line {number} of {path} must be a JSON record with a step; "
                                  f"got {line[:80]!r} (repair or delete it to resume)")  # fmt: skip
        if record["step"] <= upto:
            history.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in history))
    return history


def _save(manager, step: int, state: TrainState, run_dir: Path) -> None:
    if not all_finite(state.params):
        raise NonFiniteLoss(_nonfinite_message(step, manager, run_dir))
    with files_of(run_dir):
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()


def _nonfinite_message(step, manager, run_dir) -> str:
    last = manager.latest_step()
    kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint"
    return (f"training diverged: non-finite loss or parameters by step {step}; {kept} in "
            f"{run_dir / 'checkpoints'} (try a lower learning_rate)")  # fmt: skip


def _pictures(cfg, run_dir, history, params, eval_set) -> None:
    keys = ["loss", "eval_loss"] + (["relative_error", "eval_relative_error"]
                                    if cfg.task == "teacher" else ["accuracy", "eval_accuracy"])
    curves(history, keys, run_dir / "curves.png", f"{cfg.task}: training and held-out metrics")
    _, _, labels_for = TASKS[cfg.task]
    count = cfg.num_heatmaps
    examples = jax.tree.map(lambda a: np.asarray(a[:count]), eval_set)
    weights = np.asarray(reference_weights(cfg, params, examples))  # [n, H, Lq, Lk]
    for b in range(count):
        head = int(weights[b].max(-1).mean(-1).argmax())  # the most decided head
        rows, cols = labels_for(cfg, examples, b)
        heatmap(weights[b, head], rows, cols, f"{cfg.task}, held-out example {b}, head {head}",
                run_dir / f"heatmap_{b}.png")  # fmt: skip


def _summary(cfg, history, steps, seconds, run_dir) -> str:
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    metric = "eval_relative_error" if cfg.task == "teacher" else "eval_accuracy"
    final = evals[-1][metric] if evals else float("nan")
    reached = final <= cfg.target if cfg.task == "teacher" else final >= cfg.target
    sign = "<=" if cfg.task == "teacher" else ">="
    return (f"done: {steps} steps in {seconds:.1f} s ({steps / seconds:.1f} steps/s); held-out "
            f"{metric.removeprefix('eval_')} {final:.4g} ({'reached' if reached else 'MISSED'} "
            f"target {sign} {cfg.target}); run directory {run_dir}")  # fmt: skip


# ---------------------------------------------------------------------------
# Throughput against flax.nnx.MultiHeadAttention (same model, same data)


def compare_flax(cfg: Config, rounds: int = 7, steps_per_round: int = 20) -> dict[str, float]:
    check_config(cfg)
    runners = {}
    for name, flax_reference in (("mha_jax", False), ("flax.nnx", True)):
        graphdef, optimizer, state = initial_state(cfg, flax_reference)
        shardings = shardings_for(state)
        train_step, _, batches = make_steps(cfg, graphdef, optimizer, shardings)
        data = [batches(i) for i in range(steps_per_round)]
        state, _ = train_step(jax.device_put(state, shardings[0]), data[0])  # compile
        runners[name] = [train_step, state, data]
    times = {name: [] for name in runners}
    for _ in range(rounds):  # interleaved: both see the same machine noise
        for name, runner in runners.items():
            train_step, state, data = runner
            begin = time.perf_counter()
            for batch in data:
                state, metrics = train_step(state, batch)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - begin)
            runner[1] = state
    rates = {name: steps_per_round / statistics.median(t) for name, t in times.items()}
    print(f"train steps/s, median of {rounds} interleaved rounds of {steps_per_round} steps "
          f"({cfg.task}, d_model={cfg.d_model}, heads={cfg.num_heads}, batch={cfg.batch_size}):")
    for name, rate in rates.items():
        print(f"  {name:<10} {rate:8.1f} steps/s   ratio to flax.nnx {rate / rates['flax.nnx']:.2f}")
    return rates


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train Wq, Wk, Wv on a toy task.")
    parser.add_argument("--config", type=Path,
                        help="YAML config (default: configs/recall.yaml, or RUN_DIR/config.yaml "
                             "with --resume)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable); keeps the field's type")
    parser.add_argument("--run-dir", type=Path, help="default: runs/<task>-<timestamp>")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue RUN_DIR from its last checkpoint (uses its config.yaml)")
    parser.add_argument("--quiet", action="store_true", help="JSON log lines, no progress bar")
    parser.add_argument("--compare-flax", action="store_true",
                        help="measure train steps/s against flax.nnx.MultiHeadAttention")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int | str:
    """The command line: its exit status, or the one `error: ...` line to exit with."""
    args = parse_args(argv)
    try:
        if args.resume is not None and args.config is None:
            saved_config(args.resume)  # says so when RUN_DIR is not a run directory
        config_path = args.config or (args.resume / "config.yaml" if args.resume
                                      else Path("configs/recall.yaml"))  # fmt: skip
        cfg = load_config(config_path, args.set)
        if args.compare_flax:
            compare_flax(cfg)
            return 0
        history = main(cfg, run_dir=args.run_dir, resume=args.resume, quiet=args.quiet)
        interrupted = history and history[-1].get("interrupted")
        return {"SIGINT": 130, "SIGTERM": 143}.get(interrupted, 0)
    except (ConfigError, CheckpointError, NonFiniteLoss) as error:
        return "error: " + " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(cli())
