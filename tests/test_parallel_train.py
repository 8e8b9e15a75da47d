"""The training script on a data × seq × heads mesh of 8 forced host devices: the same
losses and parameters as data parallelism alone, a checkpoint that restores onto a
different mesh shape (orbax reshards as it reads), and mesh settings that cannot work
named before anything compiles.

The runs happen in one subprocess (this file run as a script, with 8 devices); the
checks read their histories and checkpoints here."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import run_files
import toy_config
import train_toy

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
COMMON = ["steps=10", "log_every=1", "eval_every=10", "checkpoint_every=5"]

BAD_MESHES = [  # (overrides, message) on 8 devices, with the smoke config (2 heads, 2 queries, 4 pairs)
    (["mesh_seq=3"], r"mesh_seq × mesh_heads must divide the device count 8; got 3 × 1"),
    (
        ["mesh_data=2", "mesh_seq=2"],
        r"mesh_data × mesh_seq × mesh_heads must equal the device count 8; got 2 × 2 × 1",
    ),
    (["mesh_heads=4"], r"num_heads must be divisible by mesh_heads=4; got 2"),
    (["mesh_seq=4"], r"num_queries must be divisible by mesh_seq=4 \(the sequence is split\); got 2"),
    (
        ["mesh_seq=2", "context_parallel=zigzag"],
        r"context_parallel must be one of \['ring', 'all_to_all', 'all_gather'\]",
    ),
    (
        ["mesh_seq=2", "mesh_heads=2", "context_parallel=all_to_all"],
        r"num_heads / mesh_heads must be divisible by mesh_seq=2 .*; got 1",
    ),
    (
        ["mesh_seq=2", "implementation=reference"],
        r'implementation must be "auto" or "blockwise" with mesh_seq',
    ),
    (["mesh_data=-1"], r"mesh_data must be non-negative"),
]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh_runs")
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH="scripts"
    )  # pytest's pythonpath does not reach a child process
    done = subprocess.run(
        [sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def final_state(run_dir: Path):
    """The last checkpoint of `run_dir`, restored here on one device (whatever mesh saved it)."""
    cfg = toy_config.load_config(SMOKE, COMMON)
    _, _, like = train_toy.initial_state(cfg)
    manager = run_files.checkpoint_manager(run_dir, cfg)
    state = run_files.restore_latest(manager, like, run_dir)
    manager.close()
    return state


def assert_same_params(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        if "b_k" in jax.tree_util.keystr(path):
            # b_k's exact gradient is 0 (a softmax ignores a per-row constant); Adam turns the
            # rounding noise in it into +-lr steps that differ with the reduction order.
            assert np.abs(x).max() < 1e-2 and np.abs(y).max() < 1e-2
            continue
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_mesh_training_matches_data_parallel_and_restores_onto_another_mesh(eight_devices):
    """Data parallelism over 8 devices, against 5 steps on 2×2×2 (ring attention, heads
    split) resumed for 5 more on 4×1×2 from the 2×2×2 checkpoint: equal losses and
    accuracies at every step, equal parameters at the end."""
    out, results = eight_devices
    data8, split = results["data8"], results["split"]
    assert [h["step"] for h in data8] == [h["step"] for h in split] and split[-1]["step"] == 10
    for a, b in zip(data8, split, strict=True):  # every logged loss, accuracy and eval metric
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} at {a['step']}")
    resumed = final_state(out / "split")
    assert int(resumed.step) == 10
    assert_same_params(resumed.params, final_state(out / "data8").params)


def test_bad_mesh_is_named_before_anything_compiles(eight_devices):
    _, results = eight_devices
    for overrides, message in BAD_MESHES:
        assert re.search(message, results["errors"][" ".join(overrides)]), (overrides, message)


def train_on_eight_devices(out: Path) -> dict:
    assert jax.device_count() == 8, jax.devices()
    config = lambda overrides: toy_config.load_config(SMOKE, COMMON + overrides)
    errors = {}
    for overrides, _ in BAD_MESHES:
        try:
            toy_config.check_config(config(overrides))
            errors[" ".join(overrides)] = "no error"
        except toy_config.ConfigError as error:
            errors[" ".join(overrides)] = str(error)
    data8 = train_toy.main(config(["mesh_data=8"]), run_dir=out / "data8", quiet=True)
    cube = config(["mesh_data=2", "mesh_seq=2", "mesh_heads=2"])
    train_toy.main(cube, run_dir=out / "split", quiet=True, stop_at=5)
    other_mesh = config(["mesh_data=4", "mesh_seq=1", "mesh_heads=2"])
    split = train_toy.main(other_mesh, resume=out / "split", quiet=True)
    return {"data8": data8, "split": split, "errors": errors}


if __name__ == "__main__":
    print(json.dumps(train_on_eight_devices(Path(sys.argv[1]))))
