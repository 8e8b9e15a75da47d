"""Side-by-side speed and memory of attention implementations on this machine.

    python scripts/bench.py                 # time table (about 10 min on 2 CPU cores)
    python scripts/bench.py --quick         # two small shapes, a few rounds
    python scripts/bench.py --memory        # peak RSS vs L, one fresh process per point
    python scripts/bench.py --train-step    # train steps/s of train_toy.py's model, vs flax.nnx
    python scripts/bench.py --mesh          # context parallelism on 8 host devices (L=32768, ~3 min)
    python scripts/bench.py --packed        # 8 packed documents of 512: segment ids, mask_mod, 8 calls, dense
    python scripts/bench.py --flex          # L=4096: mask_mod / score_mod vs the built-in window / ALiBi
    python scripts/bench.py --baseline REV  # also time the library as it was at git revision REV

Time mode: every candidate is compiled and warmed up, then timed in rounds,
interleaved round-robin (each round runs every candidate once, in a shuffled
order) so machine noise hits all alike; we report medians with min-max, the
ratio to flax.linen's MultiHeadDotProductAttention, achieved GFLOP/s and the
percentage of a large `jnp.dot` measured in the same process. All candidates
include the four projections (full layer: D=768 -> 12 heads of 64 -> D).

Memory mode: each (candidate, L) runs forward+backward at B=1 in a fresh
subprocess with its data segment capped, and reports peak RSS; a candidate is
dropped after it fails or passes the cap.

Packed mode: a row of 8 documents of 512 tokens (L=4096), causal within each, forward and
forward+backward: the row with segment ids against the 8 documents as a batch of separate
L=512 sequences (the work it should cost) and against the same mask given densely, as
`[1, L, L]` bool (what a user without segment ids writes; the blockwise kernel cannot skip
it). Interleaved rounds, medians, ratios to the separate calls.

Flex mode: at L=4096, a sliding window of 512 built in, as a `mask_mod` and as a dense mask,
and ALiBi built in and as a `score_mod`, forward and forward+backward, after checking that each
rewrite gives the built-in's numbers; ratios to the built-in of each group.

Baseline (`--baseline REV`, any mode but memory): the package as committed at REV is copied
under another name (`mha_jax_baseline`) and timed beside today's in the same rounds, so a
"no slowdown" claim is one interleaved run, not two runs on a noisy machine.

Train-step mode: the training step of scripts/train_toy.py (--config, --set) with
our attention and with flax.nnx.MultiHeadAttention in the same model on the same
data, in interleaved rounds in one process; prints the median steps/s of each and
the ratio to flax.nnx.

Time and memory modes write JSON, Markdown and a PNG (time and memory against L)
under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

D_MODEL, NUM_HEADS = 768, 12
HEAD_DIM = D_MODEL // NUM_HEADS

# (B, L, pass, causal)
SHAPES = [
    (4, 16, "fwd", False),
    (4, 16, "fwd+bwd", False),
    (8, 512, "fwd", False),
    (8, 512, "fwd+bwd", False),
    (1, 2048, "fwd", False),
    (1, 4096, "fwd", False),
    (1, 4096, "fwd", True),
    (1, 4096, "fwd+bwd", False),
    (1, 4096, "fwd+bwd", True),
]
QUICK = [(4, 16, "fwd", False), (1, 1024, "fwd+bwd", True)]


# ---------------------------------------------------------------------------
# Candidates: each returns f(x) -> something to block on, for a [B, L, D] input


BASELINE = {}  # "rev": the git revision copied as the package mha_jax_baseline (--baseline)


def baseline_package(rev: str, out_dir: Path) -> str:
    """Copy `mha_jax/` as committed at `rev` to `out_dir/baseline/mha_jax_baseline`, its own
    imports renamed, and put it on sys.path: two versions in one process."""
    import re
    import shutil
    import tarfile
    from io import BytesIO

    root = out_dir / "baseline"
    shutil.rmtree(root, ignore_errors=True)
    archive = subprocess.run(["git", "archive", rev, "mha_jax"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(root, filter="data")
    (root / "mha_jax").rename(root / "mha_jax_baseline")
    for path in (root / "mha_jax_baseline").rglob("*.py"):
        path.write_text(re.sub(r"\bmha_jax\b", "mha_jax_baseline", path.read_text()))
    sys.path.insert(0, str(root))
    BASELINE["rev"] = rev
    return "mha_jax_baseline"


def mha_jax_candidate(implementation: str, causal: bool, backward: bool, package: str = "mha_jax"):
    import importlib

    mha_jax = importlib.import_module(package)

    params = mha_jax.init_params(jax.random.PRNGKey(0), D_MODEL, NUM_HEADS)

    def forward(params, x):
        return mha_jax.batched_attention(
            params, x, num_heads=NUM_HEADS, is_causal=causal, implementation=implementation
        )

    return _wrap(forward, params, backward)


def flax_linen_candidate(causal: bool, backward: bool):
    import flax.linen as nn

    module = nn.MultiHeadDotProductAttention(num_heads=NUM_HEADS)
    x0 = jnp.ones((1, 8, D_MODEL))
    params = module.init(jax.random.PRNGKey(0), x0, x0)

    def forward(params, x):  # linen's module has no is_causal: users pass a causal mask
        mask = nn.make_causal_mask(x[..., 0], dtype=bool) if causal else None
        return module.apply(params, x, x, mask=mask)

    return _wrap(forward, params, backward)


def flax_nnx_candidate(causal: bool, backward: bool):
    from flax import nnx

    module = nnx.MultiHeadAttention(NUM_HEADS, D_MODEL, decode=False, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(module)

    def forward(params, x):
        return nnx.merge(graphdef, params)(x, is_causal=causal)

    return _wrap(forward, params, backward)


def jax_nn_candidate(causal: bool, backward: bool):
    import mha_jax

    params = mha_jax.init_params(jax.random.PRNGKey(0), D_MODEL, NUM_HEADS)

    def forward(params, x):
        batch, length, _ = x.shape
        split = lambda w, b: (x @ w + b).reshape(batch, length, NUM_HEADS, HEAD_DIM)
        q, k, v = split(params.w_q, params.b_q), split(params.w_k, params.b_k), split(params.w_v, params.b_v)
        heads = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        return heads.reshape(batch, length, D_MODEL) @ params.w_o + params.b_o

    return _wrap(forward, params, backward)


def equinox_candidate(causal: bool, backward: bool):
    import equinox as eqx

    module = eqx.nn.MultiheadAttention(
        NUM_HEADS,
        D_MODEL,
        use_query_bias=True,
        use_key_bias=True,
        use_value_bias=True,
        use_output_bias=True,
        key=jax.random.PRNGKey(0),
    )
    params, static = eqx.partition(module, eqx.is_array)

    def forward(params, x):  # equinox's module takes one sequence: vmap it over the batch
        layer = eqx.combine(params, static)
        length = x.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool)) if causal else None
        return jax.vmap(lambda x: layer(x, x, x, mask=mask))(x)

    return _wrap(forward, params, backward)


def _with_arguments(forward, params, backward, extra=None):
    """`_wrap`, with the parameters (and `extra`, forward's third argument) passed in as
    arguments: a large closed-over constant (a dense mask) is folded at compile time, which
    takes XLA seconds and is not what a user's training step does."""
    if not backward:
        f = jax.jit(forward)
    else:
        loss = lambda params, x, extra: jnp.sum(forward(params, x, extra) ** 2)
        f = jax.jit(lambda params, x, extra: jax.grad(loss, argnums=(0, 1))(params, x, extra))
    return lambda x: f(params, x, extra)


def _wrap(forward, params, backward):
    if not backward:
        return jax.jit(lambda x: forward(params, x))
    loss = lambda params, x: jnp.sum(forward(params, x) ** 2)
    return jax.jit(lambda x: jax.grad(loss, argnums=(0, 1))(params, x))


def torch_candidate(causal: bool, backward: bool):
    import torch

    torch.manual_seed(0)
    projections = [torch.nn.Linear(D_MODEL, D_MODEL) for _ in range(4)]

    def run(x_np):
        x = torch.from_numpy(np.asarray(x_np)).requires_grad_(backward)
        batch, length, _ = x.shape
        q, k, v = (p(x).view(batch, length, NUM_HEADS, HEAD_DIM).transpose(1, 2) for p in projections[:3])
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = projections[3](heads.transpose(1, 2).reshape(batch, length, D_MODEL))
        if backward:
            (out**2).sum().backward()
        return out

    if not backward:

        def no_grad(x):
            with torch.no_grad():
                return run(x)

        return no_grad
    return run


def candidates(causal: bool, backward: bool, include_torch: bool) -> dict:
    made = {
        "flax.linen": flax_linen_candidate(causal, backward),
        "flax.nnx": flax_nnx_candidate(causal, backward),
        "jax.nn+proj": jax_nn_candidate(causal, backward),
        "equinox": equinox_candidate(causal, backward),
        "mha_jax auto": mha_jax_candidate("auto", causal, backward),
        "mha_jax reference": mha_jax_candidate("reference", causal, backward),
        "mha_jax blockwise": mha_jax_candidate("blockwise", causal, backward),
    }
    if BASELINE:
        made[f"mha_jax@{BASELINE['rev']} auto"] = mha_jax_candidate(
            "auto", causal, backward, "mha_jax_baseline"
        )
    if include_torch:
        made["torch sdpa+proj"] = torch_candidate(causal, backward)
    return made


def torch_available() -> bool:
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------
# Time mode


def flops(batch: int, length: int, causal: bool, backward: bool) -> float:
    """Useful matmul FLOPs: 4 projections + QKᵀ and PV (half of them when causal)."""
    projections = 4 * 2 * batch * length * D_MODEL * D_MODEL
    attention = 2 * 2 * batch * length * length * D_MODEL * (0.5 if causal else 1.0)
    return (projections + attention) * (3 if backward else 1)


def block(result):
    if hasattr(result, "detach"):
        return result
    return jax.block_until_ready(result)


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
    dot = jax.jit(jnp.dot)
    block(dot(a, a))
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        block(dot(a, a))
        times.append(time.perf_counter() - begin)
    return 2 * size**3 / statistics.median(times)


def time_case(batch, length, mode, causal, rounds, include_torch, seed=0) -> dict:
    backward = mode == "fwd+bwd"
    made = candidates(causal, backward, include_torch)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, length, D_MODEL))
    x_np = np.asarray(x)
    inputs = {name: (x_np if name.startswith("torch") else x) for name in made}
    for name, f in made.items():  # compile and warm up
        block(f(inputs[name]))
        block(f(inputs[name]))
    times = {name: [] for name in made}
    order = list(made)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            begin = time.perf_counter()
            block(made[name](inputs[name]))
            times[name].append(time.perf_counter() - begin)
    return times


def run_time_mode(shapes, rounds, include_torch, out_dir: Path) -> dict:
    rate = matmul_rate()
    print(
        f"large jnp.dot: {rate / 1e9:.1f} GFLOP/s on {jax.device_count()} {jax.default_backend()}"
        f" device(s), {os.cpu_count()} cores"
    )
    results = {"matmul_gflops": rate / 1e9, "cases": []}
    for batch, length, mode, causal in shapes:
        case_rounds = rounds if length <= 1024 else max(3, rounds // 3)
        times = time_case(batch, length, mode, causal, case_rounds, include_torch)
        useful = flops(batch, length, causal, mode == "fwd+bwd")
        base = statistics.median(times["flax.linen"])
        rows = {}
        for name, ts in times.items():
            median = statistics.median(ts)
            rows[name] = dict(
                median_ms=median * 1e3,
                min_ms=min(ts) * 1e3,
                max_ms=max(ts) * 1e3,
                ratio_to_linen=median / base,
                gflops=useful / median / 1e9,
                pct_matmul=100 * useful / median / rate,
            )
        case = dict(batch=batch, length=length, mode=mode, causal=causal, rounds=case_rounds, results=rows)
        results["cases"].append(case)
        print(_case_markdown(case), flush=True)
        (out_dir / "bench.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench.md").write_text(_markdown(results))
    return results


def _case_markdown(case) -> str:
    title = (
        f"B={case['batch']} L={case['length']} {case['mode']}"
        f"{' causal' if case['causal'] else ''} ({case['rounds']} rounds)"
    )
    lines = [
        f"\n{title}",
        "| implementation | median ms (min-max) | vs flax.linen | GFLOP/s | % of matmul |",
        "|---|---|---|---|---|",
    ]
    for name, r in sorted(case["results"].items(), key=lambda item: item[1]["median_ms"]):
        lines.append(
            f"| {name} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
            f"{r['ratio_to_linen']:.2f}x | {r['gflops']:.1f} | {r['pct_matmul']:.0f}% |"
        )
    return "\n".join(lines)


def _markdown(results) -> str:
    head = (
        f"Large `jnp.dot` rate in this process: {results['matmul_gflops']:.1f} GFLOP/s. "
        "Ratios are time relative to flax.linen (lower is faster).\n"
    )
    return head + "\n".join(_case_markdown(c) for c in results["cases"]) + "\n"


# ---------------------------------------------------------------------------
# Packed mode

DOCUMENTS, DOCUMENT_LENGTH = 8, 512


def packed_candidates(backward: bool) -> dict:
    """Each takes the packed row `[1, 8·512, D]` (the separate calls reshape it to `[8, 512, D]`)."""
    import mha_jax

    params = mha_jax.init_params(jax.random.PRNGKey(0), D_MODEL, NUM_HEADS)
    length = DOCUMENTS * DOCUMENT_LENGTH
    ids = jnp.repeat(jnp.arange(DOCUMENTS), DOCUMENT_LENGTH)[None]  # [1, L]
    structure = mha_jax.Structure(is_causal=True, segment_ids=ids)
    dense = (ids[:, :, None] == ids[:, None, :]) & jnp.tril(jnp.ones((length, length), bool))  # [1, L, L]

    def segment_ids(params, x, _):
        return mha_jax.batched_attention(params, x, num_heads=NUM_HEADS, structure=structure)

    def separate(params, x, _):
        documents = x.reshape(DOCUMENTS, DOCUMENT_LENGTH, D_MODEL)
        out = mha_jax.batched_attention(params, documents, num_heads=NUM_HEADS, is_causal=True)
        return out.reshape(x.shape)

    def dense_mask(params, x, mask):
        return mha_jax.batched_attention(params, x, num_heads=NUM_HEADS, mask=mask)

    # The same documents as a mask function (FlexAttention's way; its block table skips the
    # tiles across documents), and a score function reading a relative-position table.
    doc_of = ids[0]
    by_function = mha_jax.Structure(is_causal=True, mask_mod=lambda h, q, k: doc_of[q] == doc_of[k])
    table = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (NUM_HEADS, 129))
    relative = mha_jax.Options(score_mod=lambda s, h, q, k: s + table[h, jnp.clip(q - k, -64, 64) + 64])

    def mask_function(params, x, _):
        return mha_jax.batched_attention(params, x, num_heads=NUM_HEADS, structure=by_function)

    def score_function(params, x, _):
        return mha_jax.batched_attention(
            params, x, num_heads=NUM_HEADS, structure=structure, options=relative
        )

    made = {
        "segment ids (1 row of 8x512)": _with_arguments(segment_ids, params, backward),
        "mask_mod documents (1 row)": _with_arguments(mask_function, params, backward),
        "segment ids + score_mod table": _with_arguments(score_function, params, backward),
        "separate calls (8 x 512)": _with_arguments(separate, params, backward),
        "dense mask (1 row, [L, L] bool)": _with_arguments(dense_mask, params, backward, dense),
    }
    if BASELINE:  # the dense mask is what the baseline could do
        import mha_jax_baseline

        def baseline_dense(params, x, mask):
            return mha_jax_baseline.batched_attention(params, x, num_heads=NUM_HEADS, mask=mask)

        theirs = mha_jax_baseline.MHAParams(*params)  # the same weights, as the baseline's type
        made[f"mha_jax@{BASELINE['rev']} dense mask"] = _with_arguments(
            baseline_dense, theirs, backward, dense
        )
    return made


def interleaved(made: dict, x, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate on `x`: compiled and warmed, then `rounds` rounds,
    each running every candidate once in a shuffled order."""
    for f in made.values():
        block(f(x))
        block(f(x))
    times = {name: [] for name in made}
    order, shuffle = list(made), random.Random(0)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            begin = time.perf_counter()
            block(made[name](x))
            times[name].append(time.perf_counter() - begin)
    return times


def machine_line() -> tuple[float, float]:
    """The matmul rate and load average, printed (a load above the cores is flagged)."""
    rate, load = matmul_rate(), os.getloadavg()[0]
    busy = " (busier than the cores: treat the times with care)" if load > (os.cpu_count() or 1) else ""
    print(f"large jnp.dot: {rate / 1e9:.1f} GFLOP/s; load average {load:.1f} on {os.cpu_count()} cores{busy}")
    return rate, load


def run_packed_mode(rounds: int, out_dir: Path) -> dict:
    rate, load = machine_line()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, DOCUMENTS * DOCUMENT_LENGTH, D_MODEL))
    results = {"matmul_gflops": rate / 1e9, "load": load, "cases": []}
    lines = []
    for mode in ("fwd", "fwd+bwd"):
        times = interleaved(packed_candidates(mode == "fwd+bwd"), x, rounds)
        base = statistics.median(times["separate calls (8 x 512)"])
        useful = flops(DOCUMENTS, DOCUMENT_LENGTH, True, mode == "fwd+bwd")
        rows = {
            name: dict(median_ms=statistics.median(ts) * 1e3, min_ms=min(ts) * 1e3, max_ms=max(ts) * 1e3,
                       ratio_to_separate=statistics.median(ts) / base,
                       pct_matmul=100 * useful / statistics.median(ts) / rate)
            for name, ts in times.items()
        }  # fmt: skip
        results["cases"].append(dict(mode=mode, rounds=rounds, results=rows))
        lines += [f"\nL={DOCUMENTS}x{DOCUMENT_LENGTH} causal documents, {mode} ({rounds} rounds)",
                  "| candidate | median ms (min-max) | vs separate calls | % of matmul (useful FLOPs) |",
                  "|---|---|---|---|"]  # fmt: skip
        for name, r in sorted(rows.items(), key=lambda item: item[1]["median_ms"]):
            lines.append(f"| {name} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) | "
                         f"{r['ratio_to_separate']:.2f}x | {r['pct_matmul']:.0f}% |")  # fmt: skip
        print("\n".join(lines[-(len(rows) + 3) :]), flush=True)
    (out_dir / "bench_packed.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench_packed.md").write_text("\n".join(lines) + "\n")
    return results


# ---------------------------------------------------------------------------
# Flex mode: user score and mask functions against the built-ins they rewrite

FLEX_LENGTH, FLEX_WINDOW = 4096, 512


def flex_candidates(backward: bool) -> dict[str, dict]:
    """Two groups over one causal row `[1, 4096, D]`, each led by its built-in: a sliding
    window of 512 (built in; as a `mask_mod`, which carries the causal rule too; as a dense
    `[L, L]` bool mask) and ALiBi (built in; as a `score_mod`)."""
    import mha_jax
    from mha_jax.alibi import slopes as alibi_slopes

    params = mha_jax.init_params(jax.random.PRNGKey(0), D_MODEL, NUM_HEADS)
    q, k = jnp.arange(FLEX_LENGTH)[:, None], jnp.arange(FLEX_LENGTH)[None]
    dense = ((q >= k) & (q - k < FLEX_WINDOW))[None]  # [1, L, L]
    window = mha_jax.Structure(is_causal=True, window=(FLEX_WINDOW - 1, 0))
    by_function = mha_jax.Structure(mask_mod=lambda h, q, k: (q >= k) & (q - k < FLEX_WINDOW))
    slopes = jnp.asarray(alibi_slopes(NUM_HEADS), jnp.float32)
    alibi = mha_jax.Options(alibi=True)
    alibi_function = mha_jax.Options(score_mod=lambda s, h, q, k: s + slopes[h] * (k - q))
    call = functools.partial(mha_jax.batched_attention, num_heads=NUM_HEADS)
    calls = {
        "window": {
            "built-in window=(511, 0)": lambda params, x, _: call(params, x, structure=window),
            "mask_mod window": lambda params, x, _: call(params, x, structure=by_function),
            "dense [L, L] bool mask": lambda params, x, mask: call(params, x, mask=mask),
        },
        "alibi": {
            "built-in Options(alibi=True)": lambda params, x, _: call(
                params, x, is_causal=True, options=alibi
            ),
            "score_mod ALiBi": lambda params, x, _: call(params, x, is_causal=True, options=alibi_function),
        },
    }
    return {
        group: {name: _with_arguments(f, params, backward, dense) for name, f in made.items()}
        for group, made in calls.items()
    }


def run_flex_mode(rounds: int, out_dir: Path) -> dict:
    rate, load = machine_line()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, FLEX_LENGTH, D_MODEL))
    for group in flex_candidates(False).values():  # the rewrites compute the built-ins' numbers
        outs = [np.asarray(f(x)) for f in group.values()]
        for out in outs[1:]:
            np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-4)
    results = {"matmul_gflops": rate / 1e9, "load": load, "cases": []}
    lines = []
    for mode in ("fwd", "fwd+bwd"):
        groups = flex_candidates(mode == "fwd+bwd")
        made = {name: f for group in groups.values() for name, f in group.items()}
        times = interleaved(made, x, rounds)
        for group, members in groups.items():
            base = statistics.median(times[next(iter(members))])
            medians = {name: statistics.median(times[name]) for name in members}
            rows = {
                name: dict(median_ms=medians[name] * 1e3, min_ms=min(times[name]) * 1e3,
                           max_ms=max(times[name]) * 1e3, ratio_to_built_in=medians[name] / base)
                for name in members
            }  # fmt: skip
            results["cases"].append(dict(group=group, mode=mode, rounds=rounds, results=rows))
            lines += [f"\nL={FLEX_LENGTH} {group}, {mode} ({rounds} rounds)",
                      "| candidate | median ms (min-max) | vs the built-in |", "|---|---|---|"]  # fmt: skip
            for name, r in rows.items():
                lines.append(f"| {name} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) | "
                             f"{r['ratio_to_built_in']:.2f}x |")  # fmt: skip
            print("\n".join(lines[-(len(rows) + 3) :]), flush=True)
    (out_dir / "bench_flex.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench_flex.md").write_text("\n".join(lines) + "\n")
    return results


# ---------------------------------------------------------------------------
# Memory mode


MEMORY_CANDIDATES = ["flax.linen", "jax.nn+proj", "mha_jax reference", "mha_jax blockwise", "torch sdpa+proj"]


def _one_memory_point(name: str, length: int, causal: bool) -> None:
    """Child process: one forward+backward at B=1, print peak RSS in bytes."""
    backward = True
    if name == "torch sdpa+proj":
        torch_available()
        f = torch_candidate(causal, backward)
    elif name.startswith("mha_jax"):
        f = mha_jax_candidate(name.split()[1], causal, backward)
    else:
        f = {"flax.linen": flax_linen_candidate, "jax.nn+proj": jax_nn_candidate}[name](causal, backward)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, length, D_MODEL))
    begin = time.perf_counter()
    block(f(np.asarray(x) if name.startswith("torch") else x))
    seconds = time.perf_counter() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(peak_rss=peak, seconds=seconds)))


def run_memory_mode(
    lengths, cap_gib: float, causal: bool, include_torch: bool, out_dir: Path, timeout: int
) -> dict:
    names = [n for n in MEMORY_CANDIDATES if include_torch or not n.startswith("torch")]
    results = {name: {} for name in names}
    for name in names:
        for length in lengths:
            cap = int(cap_gib * 2**30)
            code = (
                f"import resource; resource.setrlimit(resource.RLIMIT_DATA, ({cap}, {cap}));"
                f"import bench; bench._one_memory_point({name!r}, {length}, {causal})"
            )
            try:  # `python -c` puts its working directory, here scripts/, on sys.path
                done = subprocess.run(
                    [sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    cwd=Path(__file__).parent,
                )
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                outcome = json.loads(lines[-1]) if done.returncode == 0 and lines else None
            except subprocess.TimeoutExpired:
                outcome = "timeout"
            if not isinstance(outcome, dict):
                results[name][length] = {"failed": outcome or f"over {cap_gib} GiB or error"}
                print(f"{name:<20} L={length:<6} failed ({results[name][length]['failed']})", flush=True)
                break
            results[name][length] = outcome
            print(
                f"{name:<20} L={length:<6} peak RSS {outcome['peak_rss'] / 2**30:6.2f} GiB "
                f"({outcome['seconds']:.1f} s)",
                flush=True,
            )
            (out_dir / "memory.json").write_text(json.dumps(results, indent=1))
    return results


# ---------------------------------------------------------------------------
# Train-step mode: scripts/train_toy.py's step, ours against flax.nnx.MultiHeadAttention


def run_train_step_mode(cfg, rounds: int = 7, steps_per_round: int = 20) -> dict[str, float]:
    """Steps/s of the jitted train step of `cfg`'s model with each attention layer (the
    same parameters' shapes, the same batches), median of `rounds` interleaved rounds."""
    from toy_config import check_config
    from train_toy import initial_state, make_steps, shardings_for

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
    print(
        f"train steps/s, median of {rounds} interleaved rounds of {steps_per_round} steps "
        f"({cfg.task}, d_model={cfg.d_model}, heads={cfg.num_heads}, batch={cfg.batch_size}):"
    )
    for name, rate in rates.items():
        print(f"  {name:<10} {rate:8.1f} steps/s   ratio to flax.nnx {rate / rates['flax.nnx']:.2f}")
    return rates


# ---------------------------------------------------------------------------
# Mesh mode: context parallelism over several devices (mha_jax.parallel)

MESH_DEVICES = 8
MESH_HEADS, MESH_HEAD_DIM = 8, 64  # the attention core: causal, B=1, q, k, v given, float32


def mesh_candidates(length: int) -> dict:
    """name -> (forward f(q, k, v), mesh or None): ring (striped), all-to-all, all-gather over
    every device on one "seq" axis, and the blockwise kernel on one device."""
    import functools

    from jax.sharding import PartitionSpec as P

    import mha_jax
    from mha_jax import parallel

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    per_device = lambda f, **kw: jax.shard_map(
        functools.partial(f, axis_name="seq", structure=mha_jax.Structure(is_causal=True), **kw),
        mesh=mesh,
        in_specs=P("seq"),
        out_specs=P("seq"),
    )
    return {
        "ring (striped)": (per_device(parallel.ring_attention, layout=parallel.Layout("striped", n)), mesh),
        "all-to-all": (per_device(parallel.all_to_all_attention), mesh),
        "all-gather": (per_device(parallel.all_gather_attention), mesh),
        "blockwise, 1 device": (
            lambda q, k, v: mha_jax.blockwise_attention(q, k, v, structure=mha_jax.Structure(is_causal=True)),
            None,
        ),
    }


def mesh_traffic(name: str, length: int, n: int) -> tuple[float, float]:
    """Bytes each device receives (forward, forward+backward), from the algorithm: the
    ring receives N-1 K/V chunks (and in the backward N-1 more with N dK/dV chunks);
    all-to-all moves (N-1)/N of its q, k, v, out chunks (and of their gradients);
    all-gather receives N-1 K/V chunks (and reduce-scatters as much of dK/dV)."""
    chunk = length // n * MESH_HEADS * MESH_HEAD_DIM * 4  # one device's q (= k = v) rows, float32
    if name.startswith("ring"):
        return (n - 1) * 2 * chunk, (n - 1) * 2 * chunk + (n - 1) * 2 * chunk + n * 2 * chunk
    if name == "all-to-all":
        return 4 * chunk * (n - 1) / n, 8 * chunk * (n - 1) / n
    if name == "all-gather":
        return (n - 1) * 2 * chunk, (n - 1) * 4 * chunk
    return 0.0, 0.0


def run_mesh_mode(length: int, rounds: int, out_dir: Path) -> list[dict]:
    """Per candidate: compile the forward and the forward+backward (XLA's memory_analysis of
    each, per device), then time `rounds` forward runs (median). Prints and writes
    mesh.json and mesh.md under `out_dir`."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    shape = (length, MESH_HEADS, MESH_HEAD_DIM)  # [L, H, Dh]
    rows = [jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(3)]
    per_device_bytes = lambda m: m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    results = []
    for name, (forward, mesh) in mesh_candidates(length).items():
        where = NamedSharding(mesh, P("seq")) if mesh else jax.devices()[0]
        q, k, v = (jax.device_put(x, where) for x in rows)
        loss = lambda q, k, v, forward=forward: jnp.sum(forward(q, k, v) ** 2)
        compiled = jax.jit(forward).lower(q, k, v).compile()
        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        times = []
        for _ in range(rounds):
            begin = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v))
            times.append(time.perf_counter() - begin)
        traffic = mesh_traffic(name, length, n) if mesh else (0.0, 0.0)
        result = dict(
            name=name,
            devices=n if mesh else 1,
            fwd_seconds=statistics.median(times),
            fwd_bytes=per_device_bytes(compiled.memory_analysis()),
            fwd_bwd_bytes=per_device_bytes(backward.memory_analysis()),
            received_fwd=traffic[0],
            received_fwd_bwd=traffic[1],
        )
        results.append(result)
        print(
            f"{name:<20} fwd {result['fwd_seconds']:7.2f} s   memory per device fwd "
            f"{result['fwd_bytes'] / 2**20:7.1f} MiB, fwd+bwd {result['fwd_bwd_bytes'] / 2**20:7.1f} MiB   "
            f"received per device fwd {traffic[0] / 2**20:6.1f} MiB, fwd+bwd {traffic[1] / 2**20:6.1f} MiB",
            flush=True,
        )
    (out_dir / "mesh.json").write_text(json.dumps(dict(length=length, devices=n, results=results), indent=1))
    (out_dir / "mesh.md").write_text(_mesh_markdown(length, n, results))
    return results


def _mesh_markdown(length: int, n: int, results: list[dict]) -> str:
    head = (
        f"Causal attention core, B=1, L={length}, {MESH_HEADS} heads of {MESH_HEAD_DIM}, float32, "
        f"{n} forced host devices sharing this machine's cores.\n\n"
        "| strategy | devices | forward time | memory per device, fwd | fwd+bwd | received per device, fwd "
        "| fwd+bwd |\n|---|---|---|---|---|---|---|\n"
    )
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    return head + "".join(
        f"| {r['name']} | {r['devices']} | {r['fwd_seconds']:.1f} s | {mib(r['fwd_bytes'])} | "
        f"{mib(r['fwd_bwd_bytes'])} | {mib(r['received_fwd'])} | {mib(r['received_fwd_bwd'])} |\n"
        for r in results
    )


def mesh_mode(length: int, rounds: int, out_dir: Path) -> None:
    """`--mesh`: 8 forced host devices unless XLA_FLAGS says otherwise (set before jax
    starts its backend, which nothing before this has done)."""
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={MESH_DEVICES}")
    if jax.device_count() < 2:
        sys.exit(
            f"error: --mesh needs several devices; got {jax.device_count()} (run it as "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={MESH_DEVICES} python scripts/bench.py --mesh)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    run_mesh_mode(length, rounds, out_dir)
    print(f"wrote {out_dir}/mesh.json and mesh.md")


def plot(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bench_path, memory_path = out_dir / "bench.json", out_dir / "memory.json"
    if bench_path.exists():
        cases = [
            c
            for c in json.loads(bench_path.read_text())["cases"]
            if c["batch"] == 1 and c["mode"] == "fwd" and not c["causal"]
        ]
        for name in cases[0]["results"] if cases else []:
            points = sorted((c["length"], c["results"][name]["median_ms"]) for c in cases)
            axes[0].plot(*zip(*points, strict=True), marker="o", label=name)
        axes[0].set(xscale="log", yscale="log", xlabel="L (B=1, forward)", ylabel="median ms", title="time")
        axes[0].legend(fontsize=7)
    if memory_path.exists():
        for name, points in json.loads(memory_path.read_text()).items():
            ok = sorted(
                (int(length), p["peak_rss"] / 2**30) for length, p in points.items() if "peak_rss" in p
            )
            if ok:
                axes[1].plot(*zip(*ok, strict=True), marker="o", label=name)
        axes[1].set(
            xscale="log",
            yscale="log",
            xlabel="L (B=1, forward+backward)",
            ylabel="peak RSS (GiB)",
            title="memory",
        )
        axes[1].legend(fontsize=7)
    for ax in axes:  # label the measured lengths as 2k, 4k, ... instead of crowded powers of 10
        lengths = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="B,L,PASS,CAUSAL",
        help="time only these shapes, e.g. 8,512,fwd,0 (repeatable)",
    )
    parser.add_argument("--memory", action="store_true", help="peak RSS vs L instead of time")
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--causal", action="store_true", help="memory mode: causal attention")
    parser.add_argument("--cap-gib", type=float, default=16.0)
    parser.add_argument("--timeout", type=int, default=900, help="memory mode: s per point")
    parser.add_argument(
        "--train-step",
        action="store_true",
        help="train steps/s of train_toy.py's model: ours vs flax.nnx.MultiHeadAttention",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("configs/recall.yaml"),
        help="train-step mode: the training config (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="train-step mode: override a config field (repeatable)",
    )
    parser.add_argument(
        "--steps-per-round",
        type=int,
        default=20,
        help="train-step mode: steps timed in each round (default: %(default)s)",
    )
    parser.add_argument(
        "--mesh",
        type=int,
        nargs="?",
        const=32768,
        metavar="L",
        help="context parallelism at length L (default 32768) on 8 host devices: ring, "
        "all-to-all and all-gather against one device (--rounds default 1)",
    )
    parser.add_argument("--packed", action="store_true", help="8 packed documents: segment ids vs 8 calls")
    parser.add_argument(
        "--flex", action="store_true", help="L=4096: mask_mod and score_mod vs the built-in window and ALiBi"
    )
    parser.add_argument(
        "--baseline", metavar="REV", help="also time mha_jax as committed at git revision REV"
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 15; 7 in train-step mode)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    if args.baseline:
        baseline_package(args.baseline, args.out)
    if args.packed:
        args.out.mkdir(parents=True, exist_ok=True)
        run_packed_mode(args.rounds or 9, args.out)
        return
    if args.flex:
        args.out.mkdir(parents=True, exist_ok=True)
        run_flex_mode(args.rounds or 5, args.out)
        return
    if args.mesh:
        return mesh_mode(args.mesh, args.rounds or 1, args.out)
    if args.train_step:
        from toy_config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.set)
            run_train_step_mode(cfg, args.rounds or 7, args.steps_per_round)
        except ConfigError as error:
            sys.exit("error: " + " ".join(str(error).split()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    include_torch = not args.no_torch and torch_available()
    if args.memory:
        run_memory_mode(args.lengths, args.cap_gib, args.causal, include_torch, args.out, args.timeout)
    else:
        shapes = QUICK if args.quick else SHAPES
        if args.shape:
            parse = lambda b, n, mode, c: (int(b), int(n), mode, c in ("1", "causal", "True"))
            shapes = [parse(*spec.split(",")) for spec in args.shape]
        run_time_mode(shapes, 5 if args.quick else args.rounds or 15, include_torch, args.out)
    plot(args.out)
    print(f"wrote {args.out}/")


if __name__ == "__main__":
    main()
