"""Learn Wq, Wk, Wv with optax on a toy task you can watch.

    python scripts/train_toy.py                          # associative recall (configs/recall.yaml)
    python scripts/train_toy.py --config configs/reverse.yaml --set steps=600
    python scripts/train_toy.py --resume runs/recall-20261125-101500
    python scripts/train_toy.py --set mesh_data=2 --set mesh_seq=2 --set mesh_heads=2
        # data × sequence (ring) × heads, with XLA_FLAGS=--xla_force_host_platform_device_count=8
    python scripts/bench.py --train-step                 # steps/s: ours vs flax.nnx attention

Reads in the order things happen: config, data, parameters, optimizer, step,
loop. Each run writes a run directory with config.yaml (as resolved),
metrics.jsonl, curves.png, heatmap PNGs and orbax checkpoints; --resume continues
bit-identically (on the same devices and implementation). One run at a time uses a
run directory (run_files.locked).

Ctrl-C or SIGTERM, at any moment, ends the run with one line and leaves nothing
half-written: from the first line of `cli` to its end a signal is only recorded, and the
run stops at its next safe point. Before the first step that is the next stage of the
start-up (nothing trained, nothing saved: `error: ...`, status 130 or 143); in the loop,
the end of the step: a checkpoint is saved and the line says how to resume; after the
last step, the end of the final save and of the picture being drawn. A second signal
changes nothing (it cannot cut the save short). A reader that stops early (`| head`)
stops the run the same way, with status 141. While the libraries load, before `cli`,
nothing is written yet: a signal then ends the process at once, with one line.

Beside it: toy_config.py (the Config, its YAML, its checks, and what a resume may
change), toy_tasks.py (each task's data, model and metrics), run_files.py (the run
directory: config.yaml, metrics.jsonl, checkpoints, resume, its lock), run_signals.py (how
a run stops: signals deferred to its safe points) and toy_report.py (the curves, heatmaps
and summary line of a finished run).
"""

# ruff: noqa: E402 (signals are handled from the first line on, before the slow imports)
from __future__ import annotations

import os
import signal
import sys

_stage = "while starting; nothing was trained or saved"


def _stopped_outside_cli(signum, frame):  # nothing is being written: say so and stop
    os.write(2, f"error: {signal.Signals(signum).name} received {_stage}\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    for _signal in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_signal) is not signal.SIG_IGN:  # a background job's stays ignored
            signal.signal(_signal, _stopped_outside_cli)  # until cli() takes over

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from run_files import (
    CheckpointError,
    NonFiniteLoss,
    checkpoint_manager,
    default_run_dir,
    diverged,
    files_of,
    locked,
    log_metrics,
    prepare_run_dir,
    resume_state,
    save_checkpoint,
    saved_config,
)
from run_signals import Interrupted, deferred_signals, say, stopped_by
from toy_config import Config, ConfigError, check_config, load_config
from toy_report import draw_pictures, summary
from toy_tasks import TASKS, loss_and_metrics, toy_mesh
from tqdm import tqdm

import mha_jax.parallel

# ---------------------------------------------------------------------------
# Config: a toy_config.Config, read from configs/*.yaml and --set by `cli` below; `main`
# checks it (check_config) before anything compiles.


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
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(schedule, weight_decay=cfg.weight_decay)
    )


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
    train_step = jax.jit(train_step, in_shardings=(state_sharding, data_sharding), donate_argnums=0)
    batches = jax.jit(lambda step: batch_for_step(cfg, step), out_shardings=data_sharding)
    return train_step, jax.jit(evaluate), batches


def shardings_for(state: TrainState, mesh: jax.sharding.Mesh | None = None, num_heads: int = 1):
    """(state, batch) shardings. The batch splits on its first axis over the mesh's "data"
    axis (default mesh: every device on "data"). With a "heads" axis of size > 1, the
    attention layer's parameters, and their optimizer moments, split by heads
    (`mha_jax.parallel.partition_names`); everything else is replicated."""
    if mesh is None:
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    heads = dict(mesh.shape).get("heads", 1)
    names = mha_jax.parallel.partition_names(num_heads, num_heads, axis_size=heads) if heads > 1 else {}

    def spec(path, _):  # an attention parameter is the leaf at .../attention/<name>, in params and moments
        keys = [getattr(k, "key", None) for k in path]
        split = len(keys) >= 2 and keys[-2] == "attention" and keys[-1] in names
        return NamedSharding(mesh, P(*names[keys[-1]]) if split else P())

    return jax.tree_util.tree_map_with_path(spec, state), NamedSharding(mesh, P("data"))


# ---------------------------------------------------------------------------
# Loop


def main(
    cfg: Config,
    *,
    run_dir: Path | None = None,
    resume: Path | None = None,
    quiet: bool = False,
    stop_at: int | None = None,
) -> list[dict]:
    """Train; return the logged history (one dict per log or eval point).

    `stop_at` ends the loop early as an interruption would (for tests). A signal before
    the first step raises Interrupted; one later ends the history with a record
    {"step", "interrupted": "SIGINT"} (or SIGTERM, SIGPIPE).
    """
    with deferred_signals() as received:
        check_config(cfg)
        if resume is not None:
            saved_config(resume)  # a run directory, before anything is made or locked there
        run_dir = resume if resume is not None else (run_dir or default_run_dir(cfg))
        with locked(run_dir):
            return _train(cfg, run_dir, resume, quiet, stop_at, received)


def _train(cfg: Config, run_dir: Path, resume: Path | None, quiet: bool, stop_at, received: dict):
    def unless_signalled():  # a safe point of the start-up: nothing is trained or saved yet
        if "signal" in received:
            raise Interrupted(received["signal"], run_dir)

    unless_signalled()
    run_dir = prepare_run_dir(cfg, run_dir, resume)
    graphdef, optimizer, state = initial_state(cfg)
    state_sharding, data_sharding = shardings_for(state, toy_mesh(cfg), cfg.num_heads)
    # Placed before a resume reads into its shardings: a checkpoint saved on one mesh
    # shape restores onto this one (orbax reshards as it reads).
    state = jax.device_put(state, state_sharding)
    history = []  # a fresh start: prepare_run_dir removed any earlier metrics.jsonl
    unless_signalled()
    with files_of(run_dir):
        manager = checkpoint_manager(run_dir, cfg)
    with contextlib.closing(manager):
        if resume is not None:
            with files_of(run_dir):
                state, history = resume_state(cfg, manager, state, run_dir)
        train_step, evaluate, batches = make_steps(cfg, graphdef, optimizer, (state_sharding, data_sharding))
        eval_set = jax.device_put(held_out_set(cfg), data_sharding)
        unless_signalled()

        start_step, start_time = int(state.step), time.perf_counter()
        last = min(cfg.steps, stop_at or cfg.steps)
        bar = tqdm(
            total=cfg.steps, initial=start_step, disable=quiet, unit="step", desc=cfg.task, dynamic_ncols=True
        )
        metrics = None
        with contextlib.closing(bar):
            previous = None
            for step in range(start_step, last):
                state, metrics = train_step(state, batches(step))
                # At most two steps in flight. XLA:CPU admits a fixed number of computations
                # per device; with several devices, a step whose collectives wait for its turn
                # on one device while later steps fill that device's slots never starts there,
                # and the other devices wait in its collectives until the run aborts (seen with
                # ring attention on 8 host devices). Dispatch still overlaps the step before.
                jax.block_until_ready(previous)
                previous = metrics
                bar.update(1)
                done = step + 1
                if done % cfg.log_every == 0 or done == last:
                    record = log_metrics(history, run_dir, done, "train", jax.device_get(metrics))
                    if not math.isfinite(record["loss"]):
                        raise diverged(done, manager, run_dir)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"})
                    if quiet:
                        say(json.dumps(record), received)
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    record = log_metrics(
                        history, run_dir, done, "eval", jax.device_get(evaluate(state.params, eval_set))
                    )
                    if quiet:
                        say(json.dumps(record), received)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    save_checkpoint(manager, done, state, run_dir)
                if "signal" in received:
                    break

        # Signals stay deferred: a second one cannot cut this save short.
        stopped_early = int(state.step) < cfg.steps
        if stopped_early and manager.latest_step() != int(state.step):
            save_checkpoint(manager, int(state.step), state, run_dir)
    seconds = time.perf_counter() - start_time
    drawing = "signal" not in received
    if drawing:  # a signal now stops it between two pictures
        with files_of(run_dir):
            draw_pictures(cfg, run_dir, history, state.params, eval_set, stop=lambda: "signal" in received)
    if "signal" in received:
        signum, step = received["signal"], int(state.step)
        if stopped_early:
            line = f"checkpoint saved at step {step} in {run_dir}; continue with --resume {run_dir}"
        else:
            pictures = "some pictures may be missing" if drawing else "the pictures were not drawn"
            line = f"training is done and saved at step {step} in {run_dir}; {pictures}"
        line = f"{stopped_by(signum)}: {line}"
        if signum == signal.SIGPIPE:
            print(line, file=sys.stderr, flush=True)
        else:
            say(line, received)
        history.append(dict(step=step, interrupted=signal.Signals(signum).name))
        return history
    if not stopped_early:
        say(summary(cfg, history, int(state.step) - start_step, seconds, run_dir), received)
    return history


class ArgumentError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ArgumentError(message)


def parse_args(argv=None):
    parser = Parser(description="Train Wq, Wk, Wv on a toy task.")
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML config (default: configs/recall.yaml, or RUN_DIR/config.yaml with --resume)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable); keeps the field's type",
    )
    parser.add_argument("--run-dir", type=Path, help="default: runs/<task>-<timestamp>")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (uses its config.yaml)",
    )
    parser.add_argument("--quiet", action="store_true", help="JSON log lines, no progress bar")
    args = parser.parse_args(argv)
    given = [("--config", args.config), ("--run-dir", args.run_dir), ("--resume", args.resume)]
    for name, value in given + [("--set", item) for item in args.set]:
        try:  # the paths and values are printed and saved as text
            str(value).encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that do not decode arrive surrogate-escaped
            shown = str(value).encode("utf-8", "surrogateescape")[:40]
            raise ArgumentError(
                f"{name} must be UTF-8 text; got bytes that do not decode: {shown!r}"
            ) from None
    return args


def cli(argv: list[str] | None = None) -> int | str:
    """The command line: its exit status, or the one `error: ...` line to exit with. Signals
    are deferred from here on (`deferred_signals`); one that stopped the run before its
    first step prints its line here, and the status is 128 + its number."""
    with deferred_signals():
        try:
            args = parse_args(argv)
            if args.resume is not None and args.config is None:
                saved_config(args.resume)  # says so when RUN_DIR is not a run directory
            config_path = args.config or (
                args.resume / "config.yaml" if args.resume else Path("configs/recall.yaml")
            )
            cfg = load_config(config_path, args.set)
            history = main(cfg, run_dir=args.run_dir, resume=args.resume, quiet=args.quiet)
        except ArgumentError as error:
            return f"error: {error}"
        except Interrupted as stop:
            print(f"error: {stop}", file=sys.stderr, flush=True)
            return 128 + stop.signum
        except (ConfigError, CheckpointError, NonFiniteLoss) as error:
            return "error: " + " ".join(str(error).split())
        interrupted = history and history[-1].get("interrupted")
        return 128 + signal.Signals[interrupted] if interrupted else 0


if __name__ == "__main__":
    status = cli()  # which puts back the handlers above when it returns
    _stage = "while exiting; the run had ended"
    sys.exit(status)
