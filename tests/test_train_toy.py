"""The training script through `main()`: smoke, resume, signals, bad input, sharding."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import train_toy  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"


def smoke(**overrides):
    return train_toy.load_config(SMOKE, [f"{k}={v}" for k, v in overrides.items()])


def final_params(run_dir: Path, cfg) -> dict:
    _, _, like = train_toy.initial_state(cfg)
    manager = train_toy.checkpoint_manager(run_dir, cfg)
    state = train_toy.restore_latest(manager, like, run_dir)
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
    cfg = train_toy.load_config(ROOT / "configs" / f"{task}.yaml",
                                ["steps=30", "log_every=10", "eval_every=30", "eval_size=64",
                                 "checkpoint_every=30", "num_heatmaps=1", "warmup_steps=3"])
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
    command = [sys.executable, "scripts/train_toy.py", "--config", str(SMOKE), "--run-dir",
               str(run_dir), "--quiet", "--set", "steps=1000000", "--set", "checkpoint_every=100000",
               "--set", "warmup_steps=1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
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
    cfg = train_toy.load_config(run_dir / "config.yaml")
    state = final_params(run_dir, cfg)
    assert 0 < int(state.step) < 1000000


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # warm-up starts at lr=0, so step 1 is good and saved; the huge rate then diverges
    cfg = smoke(learning_rate=1e30, clip_norm=1e30, steps=40, checkpoint_every=1, log_every=1)
    with pytest.raises(train_toy.NonFiniteLoss, match="training diverged: non-finite"):
        train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    manager = train_toy.checkpoint_manager(tmp_path, cfg)
    kept = manager.all_steps()
    manager.close()
    assert kept, "the good checkpoints before the divergence are kept"
    state = final_params(tmp_path, cfg)  # the latest kept one
    assert int(state.step) == max(kept) and train_toy.all_finite(state.params)


BAD_CONFIGS = [
    (["colour=red"], r"unknown config key\(s\) \['colour'\]; valid keys are \[.*'batch_size'"),
    (["steps=ten"], r"config field 'steps' must be of type int; got 'ten'"),
    (["learning_rate=fast"], r"config field 'learning_rate' must be of type float; got 'fast'"),
    (["d_model=31"], r"d_model must be divisible by num_heads=2; got 31"),
    (["num_pairs=9"], r"num_pairs must be at most num_keys=8 .*; got 9"),
    (["task=sort"], r"task must be one of \['recall', 'reverse', 'teacher'\]; got 'sort'"),
    (["implementation=fast"], r"implementation must be one of"),
    (["steps"], r"--set takes key=value; got 'steps'"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[b[0][0] for b in BAD_CONFIGS])
def test_bad_config_is_named_before_anything_compiles(tmp_path, overrides, message):
    with pytest.raises(train_toy.ConfigError, match=message):
        cfg = train_toy.load_config(SMOKE, overrides)
        train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    assert not (tmp_path / "checkpoints").exists()


def test_set_keeps_the_field_type():
    cfg = smoke(learning_rate="1e-2", steps="12")
    assert cfg.learning_rate == 0.01 and isinstance(cfg.steps, int)


def test_resume_refuses_a_model_shape_change(tmp_path):
    train_toy.main(smoke(steps=10), run_dir=tmp_path, quiet=True)
    with pytest.raises(train_toy.ConfigError, match=r"changes the model shape \(d_model: 16 -> 32\)"):
        train_toy.main(smoke(steps=10, d_model=32), resume=tmp_path, quiet=True)


def test_missing_or_corrupt_checkpoint_is_a_clear_error_and_overwrites_nothing(tmp_path):
    with pytest.raises(train_toy.CheckpointError, match="is not a run directory"):
        train_toy.main(smoke(), resume=tmp_path / "nowhere", quiet=True)
    cfg = smoke(steps=10, checkpoint_every=10)
    train_toy.main(cfg, run_dir=tmp_path, quiet=True)
    for path in (tmp_path / "checkpoints" / "10").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    before = sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(train_toy.CheckpointError, match="could not be read"):
        train_toy.main(cfg, resume=tmp_path, quiet=True)
    after = sorted((p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()
                   and p.name != "config.yaml")
    assert [a for a in after] == [b for b in before if b[0].name != "config.yaml"]
    # a fresh run into a directory with checkpoints refuses too
    with pytest.raises(train_toy.CheckpointError, match="already holds checkpoints"):
        train_toy.main(cfg, run_dir=tmp_path, quiet=True)


def test_data_parallel_on_four_devices_matches_one_device(tmp_path):
    script = (
        "import sys, numpy as np, jax; sys.path.insert(0, 'scripts'); import train_toy;"
        "cfg = train_toy.load_config('configs/smoke.yaml', ['steps=10', 'checkpoint_every=10']);"
        "h = train_toy.main(cfg, run_dir=__import__('pathlib').Path(sys.argv[1]), quiet=True);"
        "print('DEVICES', jax.device_count())"
    )
    for count in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / str(count))],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"DEVICES {count}" in result.stdout
    cfg = smoke(steps=10, checkpoint_every=10)
    one, four = final_params(tmp_path / "1", cfg), final_params(tmp_path / "4", cfg)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one.params),
                            jax.tree.leaves(four.params), strict=True):
        if "b_k" in jax.tree_util.keystr(path):
            # b_k adds the same q·b_k to every score of a row, which the softmax
            # ignores: its exact gradient is 0, and Adam turns the rounding noise
            # left in it into +-lr steps that differ with the reduction order.
            assert np.abs(a).max() < 1e-2 and np.abs(b).max() < 1e-2
            continue
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
