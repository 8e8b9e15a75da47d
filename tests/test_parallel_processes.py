"""Ring attention across processes: 2 processes × 2 CPU devices, one 4-device mesh.

Each process runs this file as a script under `jax.distributed.initialize` (gloo CPU
collectives over localhost), computes the causal striped ring over the global mesh
on global arrays, and compares the shards it holds with the single-process,
single-device reference it computes itself. What a multi-host run does, on one machine.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_EACH = 2, 2


def test_ring_over_two_processes_matches_one_process():
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_EACH}"}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(rank)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(PROCESSES)
    ]
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-4000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for rank, report in enumerate(reports):
        assert report["process"] == rank and report["processes"] == PROCESSES, report
        assert report["devices"] == PROCESSES * DEVICES_EACH and report["local_devices"] == DEVICES_EACH
        assert report["out_error"] < 1e-5, report  # this process's shards of the output
        assert report["grads_close"], report  # every parameter's gradient, rtol = atol = 1e-5


def one_process(port: int, rank: int) -> dict:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=PROCESSES, process_id=rank)
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import mha_jax as mj
    from mha_jax import parallel

    num_heads = 4
    params = mj.init_params(jax.random.PRNGKey(0), 20, num_heads, num_kv_heads=2)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 24, 20)))  # [B, L, D], same in every process
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))  # all 4 devices
    layout = parallel.Layout("striped", 4)
    rows = np.asarray(parallel.to_layout(x, layout))
    x_global = jax.make_array_from_callback(
        rows.shape, NamedSharding(mesh, P(None, "seq")), lambda i: rows[i]
    )

    def loss(params, x):
        out = parallel.mesh_attention(
            params, x, num_heads=num_heads, mesh=mesh, seq_axis="seq", is_causal=True, layout=layout
        )
        return jnp.sum(out**2), out

    params_global = jax.device_put(params, NamedSharding(mesh, P()))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params_global, x_global)

    def reference(params):  # one device of this process
        return mj.batched_attention(params, jnp.asarray(x), num_heads=num_heads, is_causal=True)

    expected = np.asarray(parallel.to_layout(reference(params), layout))
    expected_grads = jax.grad(lambda p: jnp.sum(reference(p) ** 2))(params)
    out_error = max(
        float(np.abs(np.asarray(s.data) - expected[s.index]).max()) for s in out.addressable_shards
    )
    pairs = [
        (np.asarray(got.addressable_shards[0].data), np.asarray(want))  # replicated: any copy
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True)
    ]
    grads_close = all(np.allclose(got, want, rtol=1e-5, atol=1e-5) for got, want in pairs)
    return dict(
        process=jax.process_index(),
        processes=jax.process_count(),
        devices=jax.device_count(),
        local_devices=jax.local_device_count(),
        out_error=out_error,
        grad_error=max(float(np.abs(got - want).max()) for got, want in pairs),
        grads_close=grads_close,
    )


if __name__ == "__main__":
    print(json.dumps(one_process(int(sys.argv[1]), int(sys.argv[2]))))
