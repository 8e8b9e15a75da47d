"""The run directory: what a training run keeps on disk, and the resume that reads it back.

    RUN_DIR/config.yaml            the config as resolved (a resume rewrites it)
    RUN_DIR/metrics.jsonl          one JSON record per log or eval point
    RUN_DIR/checkpoints/STEP       orbax checkpoints of the TrainState, the newest few
    RUN_DIR/run.lock               held (fcntl.flock) by the run using the directory

One run at a time: a second run of a directory in use stops with a CheckpointError before
it reads or writes anything there. If the latest checkpoint does not read, the newest one
that does is restored (the unreadable ones are moved to RUN_DIR/unreadable-checkpoints);
only when none reads is it an error. Each checkpoint's files are read through first, so a
damaged one fails in one place, before orbax starts its parallel reads. A state with a
non-finite parameter is never saved; config.yaml and metrics.jsonl are replaced whole
(written beside, then renamed), so an interrupt never leaves half of one. An OSError on
any of these files becomes one CheckpointError that names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorstore as ts
import yaml
from toy_config import Config, ConfigError, check_resume, make_config, read_yaml


class CheckpointError(RuntimeError):
    """The run directory, or the checkpoints in it, cannot be used."""


class NonFiniteLoss(RuntimeError):
    pass


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
        raise CheckpointError(
            f"{path} must be writable (the run directory {run_dir} keeps the "
            f"run's files); got {error.strerror or error}"
        ) from error


def _tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _reason(error: Exception) -> str:
    """`error` on one short line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200] + '...' if len(text) > 200 else text}"


# ---------------------------------------------------------------------------
# The directory and its config.yaml


def saved_config(run_dir: Path) -> Config:
    """The config a run directory was last run with: its config.yaml."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory: {path} is missing")
    values = read_yaml(path)
    if not values:
        raise CheckpointError(f"{path} must hold the run's config; got an empty file")
    return make_config(values)


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold RUN_DIR/run.lock while inside: a second run of the same directory (a second
    --resume, or a fresh run into it) gets a CheckpointError instead of racing this one.
    The directory is made if need be (a resume checks first that it is a run directory)."""
    path = run_dir / "run.lock"
    with files_of(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a")  # held until the run ends
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"run directory {run_dir} must be free for this run; got it in use by another run, "
                f"which holds the lock {path} (wait for that run to end, or choose another --run-dir)"
            ) from None
        yield
    finally:
        lock.close()  # releases the lock


def prepare_run_dir(cfg: Config, run_dir: Path | None, resume: Path | None) -> Path:
    """The run directory. A resume must continue the same run (toy_config.check_resume);
    a fresh start gets its config.yaml and no metrics.jsonl of an earlier attempt."""
    if resume is not None:
        check_resume(saved_config(resume), cfg, resume)
        return resume
    if run_dir is None:
        run_dir = default_run_dir(cfg)
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise CheckpointError(
            f"{run_dir} already holds checkpoints: pass --resume {run_dir} to "
            "continue it, or choose another --run-dir"
        )
    with files_of(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, cfg)  # the first write: an unwritable directory fails here
        if (run_dir / "metrics.jsonl").exists():  # of an attempt that saved no checkpoint
            _tell(f"note: {run_dir / 'metrics.jsonl'} of an earlier attempt without checkpoints is replaced")
            (run_dir / "metrics.jsonl").unlink()
    return run_dir


def _replace(path: Path, text: str) -> None:
    """Write `path` whole: beside it first, then renamed over it (an interrupt or a kill
    leaves the old file or the new one, never half of one)."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as error:  # named as `path`, the file the run keeps
        partial.unlink(missing_ok=True)
        raise type(error)(error.errno, error.strerror, str(path)) from None


def _write_config(run_dir: Path, cfg: Config) -> None:
    _replace(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------
# metrics.jsonl


def log_metrics(history: list[dict], run_dir: Path, step: int, split: str, metrics) -> dict:
    """Append the record of `metrics` (host values) at `step` to `history` and metrics.jsonl."""
    record = {
        "step": step,
        **{f"{split}_{k}" if split == "eval" else k: float(v) for k, v in metrics.items()},
    }
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
                _tell(
                    f"warning: dropped the last line of {path}, which is not a whole record "
                    f"(a write cut short?): {line[:80]!r}"
                )
                break
            raise CheckpointError(
                f"line {number} of {path} must be a JSON record with a step; "
                f"got {line[:80]!r} (repair or delete it to resume)"
            )
        if record["step"] <= upto:
            history.append(record)
    _replace(path, "".join(json.dumps(r) + "\n" for r in history))
    return history


# ---------------------------------------------------------------------------
# Checkpoints


def checkpoint_manager(run_dir: Path, cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,  # of a save that a kill cut short
    )
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def all_finite(tree) -> bool:
    return bool(jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)))


def diverged(step: int, manager: ocp.CheckpointManager, run_dir: Path) -> NonFiniteLoss:
    """The error to stop with when the loss or the parameters are no longer finite."""
    last = manager.latest_step()
    kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint"
    return NonFiniteLoss(
        f"training diverged: non-finite loss or parameters by step {step}; "
        f"{kept} in {run_dir / 'checkpoints'} (try a lower learning_rate)"
    )


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, run_dir: Path) -> None:
    """Save the TrainState `state` as `step`; a non-finite one stops the run instead."""
    if not all_finite(state.params):
        raise diverged(step, manager, run_dir)
    with files_of(run_dir):
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()


def read_through(step_dir: Path) -> None:
    """Read every array of the checkpoint in `step_dir` once, synchronously; raise if one
    does not read. orbax reads the arrays concurrently, in an event loop it closes as soon
    as the first read fails: the reads still in flight then finish into the closed loop,
    each printing an "Event loop is closed" traceback. Read here first, a damaged file
    fails alone. (The arrays are orbax's default layout: zarr in an OCDBT database in
    the item folder `default`; another layout is left to orbax.)"""
    item = step_dir / "default"
    if not item.is_dir():
        raise CheckpointError(f"{item} is missing")
    if not (item / "manifest.ocdbt").is_file():
        return
    database = {"driver": "ocdbt", "base": f"file://{item.absolute()}/"}
    keys = [key.decode() for key in ts.KvStore.open(database).result().list().result()]
    for key in keys:
        name, _, leaf = key.rpartition("/")
        if leaf in (".zarray", "zarr.json"):
            driver = "zarr" if leaf == ".zarray" else "zarr3"
            spec = {"driver": driver, "kvstore": {**database, "path": name + "/"}}
            ts.open(spec, open=True).result().read().result()


def _restore(directory: Path, step: int, abstract):
    """`step` restored by a manager of its own: after a failed restore, an orbax manager
    can answer every other step with an error about `Composite` args."""
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)  # saves nothing
    reader = ocp.CheckpointManager(directory, options=options)
    try:
        return reader.restore(step, args=ocp.args.StandardRestore(abstract))
    finally:
        reader.close()


def restore_latest(manager: ocp.CheckpointManager, like: tuple, run_dir: Path) -> tuple:
    """The newest checkpoint that reads, as the type of `like` (the TrainState whose shapes
    it has); newer unreadable ones are skipped, with a warning."""
    where = run_dir / "checkpoints"
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint found in {where}; nothing to resume")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    directory = Path(manager.directory)
    failures = []
    for step in steps:
        try:
            read_through(directory / str(step))
            restored = _restore(directory, step, abstract)
        except Exception as error:  # orbax and tensorstore raise many kinds for damaged files
            failures.append((step, _reason(error)))
            continue
        for skipped, reason in failures:
            _tell(
                f"warning: the checkpoint at step {skipped} in {where} could not be read "
                f"({reason}); restoring step {step} instead"
            )
        return restored if isinstance(restored, type(like)) else type(like)(*restored)
    details = "; ".join(f"step {skipped} ({reason})" for skipped, reason in failures)
    raise CheckpointError(f"the checkpoints in {where} could not be read: {details}; nothing was overwritten")


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


# ---------------------------------------------------------------------------
# Resume


def resume_state(
    cfg: Config, manager: ocp.CheckpointManager, like: tuple, run_dir: Path
) -> tuple[tuple, list[dict]]:
    """The state and history to continue from. The run directory changes only once the
    resume is sure: a refused one leaves it as it was."""
    state = restore_latest(manager, like, run_dir)
    step, saved_steps = int(state.step), saved_config(run_dir).steps
    if cfg.steps < step:
        raise ConfigError(
            f"steps must be at least the restored step {step} to resume {run_dir}; got {cfg.steps}"
        )
    history = read_history(run_dir, upto=step)
    if cfg.steps != saved_steps:
        _tell(
            f"note: resuming with steps={cfg.steps} (was {saved_steps}): the learning-rate "
            f"schedule spans steps, so from step {step} on it differs from the saved run's"
        )
    set_aside_newer(manager, step, run_dir)
    _write_config(run_dir, cfg)
    return state, history
