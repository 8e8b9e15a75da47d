"""The training script through `main()`: smoke, resume, signals, bad input, sharding."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.nnx
import jax
import numpy as np
import pytest
import run_files
import toy_config
import toy_report
import train_toy
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def smoke(**overrides):
    return toy_config.load_config(SMOKE, [f"{k}={v}" for k, v in overrides.items()])


def final_params(run_dir: Path, cfg) -> dict:
    _, _, like = train_toy.initial_state(cfg)
    manager = run_files.checkpoint_manager(run_dir, cfg)
    state = run_files.restore_latest(manager, like, run_dir)
    manager.close()
    return state


def test_smoke_run_learns_and_writes_its_run_directory(tmp_path):
    history = train_toy.main(smoke(), run_dir=tmp_path, quiet=True)
    losses = [h["loss"] for h in history if "loss" in h]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2])  # it learns
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "heatmap_0.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == history
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["steps"] == 40
    assert any("eval_accuracy" in h for h in history)


@pytest.mark.parametrize("task", ["reverse", "teacher"])
def test_other_tasks_run(tmp_path, task):
    cfg = toy_config.load_config(
        ROOT / "configs" / f"{task}.yaml",
        [
            "steps=30",
            "log_every=10",
            "eval_every=30",
            "eval_size=64",
            "checkpoint_every=30",
            "num_heatmaps=1",
            "warmup_steps=3",
        ],
    )
    history = train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    losses = [h["loss"] for h in history if "loss" in h]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (tmp_path / "heatmap_0.png").exists()


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    cfg = smoke(steps=20, checkpoint_every=5, log_every=5)
    train_toy.main(cfg, run_dir=tmp_path / "straight", quiet=True)
    train_toy.main(cfg, run_dir=tmp_path / "split", quiet=True, stop_at=10)
    assert final_params(tmp_path / "split", cfg).step == 10
    history = train_toy.main(cfg, resume=tmp_path / "split", quiet=True)
    straight, split = final_params(tmp_path / "straight", cfg), final_params(tmp_path / "split", cfg)
    assert int(split.step) == 20
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(split), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)  # no duplicates


def test_sigint_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "scripts/train_toy.py",
        "--config",
        str(SMOKE),
        "--run-dir",
        str(run_dir),
        "--quiet",
        "--set",
        "steps=1000000",
        "--set",
        "checkpoint_every=100000",
        "--set",
        "warmup_steps=1",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # wait until the loop is running
            if line.startswith("{"):
                break
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "SIGINT received: checkpoint saved" in out
    assert "Traceback" not in err
    cfg = toy_config.load_config(run_dir / "config.yaml")
    state = final_params(run_dir, cfg)
    assert 0 < int(state.step) < 1000000


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # warm-up starts at lr=0, so step 1 is good and saved; the huge rate then diverges
    cfg = smoke(learning_rate=1e30, clip_norm=1e30, steps=40, checkpoint_every=1, log_every=1)
    with pytest.raises(run_files.NonFiniteLoss, match="training diverged: non-finite"):
        train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    manager = run_files.checkpoint_manager(tmp_path, cfg)
    kept = manager.all_steps()
    manager.close()
    assert kept, "the good checkpoints before the divergence are kept"
    state = final_params(tmp_path, cfg)  # the latest kept one
    assert int(state.step) == max(kept) and run_files.all_finite(state.params)


BAD_CONFIGS = [
    (["colour=red"], r"unknown config key\(s\) \['colour'\]; valid keys are \[.*'batch_size'"),
    (["steps=ten"], r"config field 'steps' must be of type int; got 'ten'"),
    (["learning_rate=fast"], r"config field 'learning_rate' must be of type float; got 'fast'"),
    (["d_model=31"], r"d_model must be divisible by num_heads=2; got 31"),
    (["num_pairs=9"], r"num_pairs must be at most num_keys=8 .*; got 9"),
    (["task=sort"], r"task must be one of \['recall', 'reverse', 'teacher'\]; got 'sort'"),
    (["implementation=fast"], r"implementation must be one of"),
    (["steps"], r"--set takes key=value; got 'steps'"),
    (["num_heads=True"], r"config field 'num_heads' must be of type int; got 'True'"),
    (["scale=0.5"], r"unknown config key\(s\) \['scale'\]"),  # the config has no scale
    (["clip_norm=-1"], r"clip_norm must be positive \(.*\); got -1.0"),
    (["clip_norm=0"], r"clip_norm must be positive \(.*\); got 0.0"),
    (["weight_decay=-1"], r"weight_decay must be non-negative and finite \(.*\); got -1.0"),
    (["learning_rate=inf"], r"learning_rate must be positive and finite; got inf"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[b[0][0] for b in BAD_CONFIGS])
def test_bad_config_is_named_before_anything_compiles(tmp_path, overrides, message):
    with pytest.raises(toy_config.ConfigError, match=message):
        cfg = toy_config.load_config(SMOKE, overrides)
        train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    assert not (tmp_path / "checkpoints").exists()


def test_set_keeps_the_field_type():
    cfg = smoke(learning_rate="1e-2", steps="12")
    assert cfg.learning_rate == 0.01 and isinstance(cfg.steps, int)


def test_resume_refuses_a_model_shape_change(tmp_path):
    train_toy.main(smoke(steps=10), run_dir=tmp_path, quiet=True)
    with pytest.raises(toy_config.ConfigError, match=r"changes the model shape \(d_model: 16 -> 32\)"):
        train_toy.main(smoke(steps=10, d_model=32), resume=tmp_path, quiet=True)


def test_missing_or_corrupt_checkpoint_is_a_clear_error_and_overwrites_nothing(tmp_path):
    with pytest.raises(run_files.CheckpointError, match="is not a run directory"):
        train_toy.main(smoke(), resume=tmp_path / "nowhere", quiet=True)
    cfg = smoke(steps=10, checkpoint_every=10)
    train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    for path in (tmp_path / "checkpoints" / "10").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    before = sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(run_files.CheckpointError, match="could not be read"):
        train_toy.main(cfg, resume=tmp_path, quiet=True)
    after = sorted(
        (p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file() and p.name != "config.yaml"
    )
    assert [a for a in after] == [b for b in before if b[0].name != "config.yaml"]
    # a fresh run into a directory with checkpoints refuses too
    with pytest.raises(run_files.CheckpointError, match="already holds checkpoints"):
        train_toy.main(cfg, run_dir=tmp_path, quiet=True)


def test_data_parallel_on_four_devices_matches_one_device(tmp_path):
    script = (
        "import sys, numpy as np, jax; import toy_config, train_toy;"
        "cfg = toy_config.load_config('configs/smoke.yaml', ['steps=10', 'checkpoint_every=10']);"
        "h = train_toy.main(cfg, run_dir=__import__('pathlib').Path(sys.argv[1]), quiet=True);"
        "print('DEVICES', jax.device_count())"
    )
    for count in (1, 4):
        env = dict(
            os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", PYTHONPATH="scripts"
        )  # pytest's pythonpath does not reach a child process
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / str(count))],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert f"DEVICES {count}" in result.stdout
    cfg = smoke(steps=10, checkpoint_every=10)
    one, four = final_params(tmp_path / "1", cfg), final_params(tmp_path / "4", cfg)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(one.params), jax.tree.leaves(four.params), strict=True
    ):
        if "b_k" in jax.tree_util.keystr(path):
            # b_k adds the same q·b_k to every score of a row, which the softmax
            # ignores: its exact gradient is 0, and Adam turns the rounding noise
            # left in it into +-lr steps that differ with the reduction order.
            assert np.abs(a).max() < 1e-2 and np.abs(b).max() < 1e-2
            continue
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Fast implementations, damaged or unwritable run directories, resume rules, field types


def tiny(**overrides):
    """The smoke config cut to a handful of steps: one compile and a few seconds."""
    values = dict(steps=4, log_every=2, eval_every=4, eval_size=16, checkpoint_every=2, warmup_steps=1)
    return smoke(**{**values, **overrides})


def test_fast_implementation_trains_and_draws_heatmaps_with_the_reference(tmp_path):
    # blockwise never materialises the weights; the heatmaps come from a reference copy
    history = train_toy.main(tiny(implementation="blockwise"), run_dir=tmp_path, quiet=True)
    assert history[-1]["step"] == 4
    assert (tmp_path / "heatmap_0.png").stat().st_size > 0


def test_reference_weights_come_from_the_trained_parameters():
    cfg = tiny(implementation="blockwise")
    _, _, state = train_toy.initial_state(cfg)
    batch = jax.tree.map(lambda a: a[:2], train_toy.held_out_set(cfg))
    weights = toy_report.reference_weights(cfg, state.params, batch)
    assert weights.shape == (2, cfg.num_heads, cfg.num_queries, cfg.num_pairs)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    graphdef, _, same = train_toy.initial_state(dataclasses.replace(cfg, implementation="reference"))
    _, expected = flax.nnx.merge(graphdef, same.params)(batch, return_weights=True)  # same seed
    np.testing.assert_array_equal(weights, expected)
    moved = jax.tree.map(lambda p: p * 2.0, state.params)  # other parameters, other weights
    assert not np.allclose(toy_report.reference_weights(cfg, moved, batch), weights)


def _unwritable(tmp_path):
    (tmp_path / "run" / "config.yaml").mkdir(parents=True)  # a write there fails, even as root
    return ["--config", str(SMOKE), "--run-dir", str(tmp_path / "run")]


def _empty_run_config(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("")
    return ["--resume", str(tmp_path / "run")]


def _yaml_syntax_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("task: recall\nsteps: [1, 2\n")
    return ["--config", str(tmp_path / "bad.yaml")]


COMMAND_LINE_ERRORS = [
    pytest.param(
        lambda tmp: ["--resume", str(tmp / "nowhere")],
        r"nowhere is not a run directory: .*nowhere/config\.yaml is missing",
        id="resume-missing-dir",
    ),
    pytest.param(
        _empty_run_config,
        r"run/config\.yaml must hold the run's config; got an empty file",
        id="empty-run-config",
    ),
    pytest.param(
        _yaml_syntax_error,
        r"config file .*bad\.yaml must be valid YAML; got .* \(line 3, column 1\)",
        id="yaml-syntax",
    ),
    pytest.param(
        lambda tmp: ["--config", str(tmp / "nope.yaml")],
        r"config file .*nope\.yaml must be a readable file; got No such file or directory",
        id="config-missing",
    ),
    pytest.param(
        lambda tmp: ["--config", str(tmp)],
        r"config file .* must be a readable file; got Is a directory",
        id="config-is-a-directory",
    ),
    pytest.param(
        _unwritable,
        r"run/config\.yaml must be writable \(the run directory .*run keeps "
        r"the run's files\); got Is a directory",
        id="run-dir-unwritable",
    ),
]


@pytest.mark.parametrize("make_argv, message", COMMAND_LINE_ERRORS)
def test_command_line_errors_are_one_line(tmp_path, make_argv, message):
    outcome = train_toy.cli(make_argv(tmp_path))
    assert isinstance(outcome, str) and outcome.startswith("error: "), outcome
    assert "\n" not in outcome
    assert re.search(message, outcome), outcome
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "make_argv",
    [lambda tmp: ["--resume", str(tmp / "nowhere")], _yaml_syntax_error],
    ids=["resume-missing", "yaml-syntax"],
)
def test_command_line_error_exits_1_with_one_stderr_line(tmp_path, make_argv):
    result = subprocess.run(
        [sys.executable, "scripts/train_toy.py", *make_argv(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_truncated_last_metrics_line_is_dropped_and_the_resume_proceeds(tmp_path, capsys):
    cfg = tiny()
    history = train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.5')  # killed mid-write
    capsys.readouterr()
    resumed = train_toy.main(cfg, resume=tmp_path, quiet=True)  # nothing left to train
    assert resumed == history
    assert "dropped the last line of" in capsys.readouterr().err
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == history


def test_a_bad_metrics_line_before_the_last_is_an_error(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(tiny())))
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 4\n{"step": 4}\n')
    with pytest.raises(
        run_files.CheckpointError, match=r"line 2 of .*metrics\.jsonl must be a JSON record with a step"
    ):
        run_files.read_history(tmp_path, upto=4)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    cfg = tiny()  # checkpoints at steps 2 and 4 (keep_checkpoints=2)
    train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    for path in (tmp_path / "checkpoints" / "4").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    capsys.readouterr()
    history = train_toy.main(cfg, resume=tmp_path, quiet=True)
    err = capsys.readouterr().err
    assert re.search(
        r"the checkpoint at step 4 in .*checkpoints could not be read \(.*\); "
        r"restoring step 2 instead",
        err,
    ), err
    assert re.search(r"moved the unreadable checkpoint at step 4 to .*unreadable-checkpoints", err)
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert int(final_params(tmp_path, cfg).step) == 4  # trained 2 -> 4 again and saved it
    assert list((tmp_path / "unreadable-checkpoints").iterdir())


def test_fresh_start_replaces_the_metrics_of_a_run_without_checkpoints(tmp_path):
    # a run killed before its first checkpoint, mid-write
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 9.0}\n{"step": 4, "lo')
    history = train_toy.main(tiny(), run_dir=tmp_path, quiet=True)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == history and all(h.get("loss") != 9.0 for h in history)


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_heads: true", r"config field 'num_heads' must be of type int; got True"),
        ("learning_rate: false", r"config field 'learning_rate' must be of type float; got False"),
        ("task: 5", r"config field 'task' must be of type str; got 5"),
        ("implementation: null", r"config field 'implementation' must be of type str; got None"),
    ],
    ids=["bool-for-int", "bool-for-float", "int-for-str", "null-for-str"],
)
def test_yaml_values_keep_the_field_type(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(toy_config.ConfigError, match=message):
        toy_config.load_config(tmp_path / "c.yaml")


def test_a_config_made_in_python_is_type_checked_too():
    with pytest.raises(
        toy_config.ConfigError, match=r"config field 'num_heads' must be of type int; got True"
    ):
        toy_config.check_config(dataclasses.replace(smoke(), num_heads=True))


@pytest.mark.parametrize(
    "override",
    [
        "seed=7",
        "eval_seed=3",
        "batch_size=32",
        "eval_size=32",
        "learning_rate=0.1",
        "warmup_steps=2",
        "weight_decay=0.5",
        "clip_norm=2.0",
    ],
)
def test_resume_refuses_changes_to_what_the_run_computes(tmp_path, override):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(smoke())))
    key, value = override.split("=")
    message = (
        rf"cannot resume .*: the config changes what the run computes \({key}: \S+ -> "
        rf"{value}\); a resumed run must keep .* except steps, implementation"
    )
    with pytest.raises(toy_config.ConfigError, match=message):
        train_toy.main(smoke(**{key: value}), resume=tmp_path, quiet=True)


def test_resume_may_change_steps_but_not_below_the_restored_step(tmp_path, capsys):
    train_toy.main(tiny(), run_dir=tmp_path, quiet=True)  # steps=4
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(
        toy_config.ConfigError,
        match=r"steps must be at least the restored step 4 "
        r"to resume .*; got 3",
    ):
        train_toy.main(tiny(steps=3), resume=tmp_path, quiet=True)
    assert (tmp_path / "config.yaml").read_text() == saved  # the refused config is not kept
    longer = tiny(steps=8, log_every=3)  # bookkeeping may change too
    assert run_files.prepare_run_dir(longer, None, tmp_path) == tmp_path
    _, _, like = train_toy.initial_state(longer)
    manager = run_files.checkpoint_manager(tmp_path, longer)
    state, history = run_files.resume_state(longer, manager, like, tmp_path)
    manager.close()
    assert int(state.step) == 4 and history[-1]["step"] == 4
    assert run_files.saved_config(tmp_path) == longer
    assert "note: resuming with steps=8 (was 4): the learning-rate schedule" in capsys.readouterr().err
