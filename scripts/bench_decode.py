"""Decoding speed: one KV-cache step of mha_jax against flax.nnx's decode mode.

    python scripts/bench_decode.py              # the three parts (about 3 min on 2 CPU cores)
    python scripts/bench_decode.py --quick      # tiny sizes, 3 rounds: a smoke check
    python scripts/bench_decode.py --rounds 31  # more rounds

One step = one new token (T=1) through the full layer (D=768 -> 12 heads of 64
-> D: projections, append to the cache, attention, output projection), jitted
with the cache donated, as a decode loop runs it. "Filled length L" is the
number of keys the step attends to: the cache holds L-1 positions and the step
appends the L-th (flax.nnx: `cache_index` at L-1). To keep the work identical
across calls and rounds, each timed function is the library's step followed by
putting the cache's length back to its input value, inside the same jit
(mha_jax: `cache._replace(length=cache_in.length)`; flax.nnx: `cache_index`
restored): every call writes slot L-1 again and reads the same L keys, while
the K/V buffers are still donated and updated in place.

Parts (all candidates interleaved round-robin in one process, each round in a
shuffled order; medians with min-max over the rounds; every call is blocked on
before the next, so a time is one token's latency):

1. mha_jax against flax.nnx.MultiHeadAttention(decode=True) at B=1 and B=8,
   L=2048 in a capacity of 8192 (target: mha_jax >= 2x faster).
2. mha_jax's step against L (512 ... 8192) at capacity 8192, B=1: it should
   grow in proportion to L (ms per 1k filled).
3. Memory traffic at B=8, L=16384: bytes of K and V read per step / step time,
   as a share of a streaming-read probe (`jnp.sum` over arrays of the same size,
   jitted, interleaved; target >= 50%), float32 and bfloat16 caches, capacity
   16384 (= L) and twice that. Then, on the probe's arrays, the attention core
   alone in several forms (the step's kernel with other blocks, XLA's plain
   einsum, block-diagonal GEMMs, and a sketch of a kernel that contracts each
   block in the cache's layout), to show where the step's time goes.

Writes a Markdown and a JSON report (--out, default docs/bench_decode.{md,json};
with --quick, bench_out/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from bench import block  # scripts/bench.py: block_until_ready for any result

import mha_jax
from mha_jax import kernels
from mha_jax.decoding import KVCache, cached_attention
from mha_jax.kernels import blockwise, scan
from mha_jax.masks import Structure
from mha_jax.options import Options

D_MODEL, NUM_HEADS = 768, 12
HEAD_DIM = D_MODEL // NUM_HEADS
TARGET_SAMPLE_S = 0.025  # each round times enough calls of a candidate to last about this long


@dataclasses.dataclass(frozen=True)
class Sizes:
    compare_batches: tuple[int, ...]  # part 1
    compare_length: int
    capacity: int  # parts 1 and 2
    lengths: tuple[int, ...]  # part 2 (B=1)
    traffic_batch: int  # part 3
    traffic_length: int
    traffic_capacities: tuple[int, ...]  # the first equals traffic_length


FULL = Sizes((1, 8), 2048, 8192, (512, 1024, 2048, 4096, 8192), 8, 16384, (16384, 32768))
QUICK = Sizes((1, 2), 256, 1024, (128, 256, 512, 1024), 2, 1024, (1024, 2048))


# ---------------------------------------------------------------------------
# Candidates: `run(reps)` makes `reps` calls, blocking on each


@dataclasses.dataclass
class Candidate:
    part: str
    name: str
    batch: int
    length: int  # keys read per call
    capacity: int
    dtype: str
    run: Callable[[int], None]
    bytes_read: int = 0  # K and V bytes the call must read (parts 3)
    reps: int = 1
    times: list[float] = dataclasses.field(default_factory=list)  # seconds per call, one per round
    note: str = ""


def random_array(rng, shape, dtype):
    return jax.jit(lambda rng: jax.random.uniform(rng, shape, jnp.float32, -1, 1).astype(dtype))(rng)


def kv_arrays(batch, capacity, dtype, seed):
    shape = (batch, capacity, NUM_HEADS, HEAD_DIM)  # [B, S, Hkv, Dh]
    rng_k, rng_v = jax.random.split(jax.random.PRNGKey(seed))
    return random_array(rng_k, shape, dtype), random_array(rng_v, shape, dtype)


def new_token(batch):
    return jax.random.normal(jax.random.PRNGKey(1), (batch, 1, D_MODEL))  # [B, T=1, D]


def chain(step, params, state, x) -> Callable[[int], None]:
    """`reps` calls of `step(params, state, x) -> (out, state)`, threading the donated state."""
    holder = [state]

    def run(reps):
        for _ in range(reps):
            out, holder[0] = step(params, holder[0], x)
            block((out, holder[0]))

    return run


def repeat(fn, *args) -> Callable[[int], None]:
    """`reps` calls of a function that only reads its arguments."""

    def run(reps):
        for _ in range(reps):
            block(fn(*args))

    return run


def mha_jax_step(implementation: str, compute_dtype=None):
    def step(params, cache, x):
        out, new = cached_attention(
            params, x, cache, num_heads=NUM_HEADS, implementation=implementation, dtype=compute_dtype
        )
        return out, new._replace(length=cache.length)  # the same filled length next call

    return jax.jit(step, donate_argnums=1)


def mha_jax_candidate(
    part, implementation, batch, length, capacity, dtype=jnp.float32, seed=0, compute_dtype=None
):
    params = mha_jax.init_params(jax.random.PRNGKey(0), D_MODEL, NUM_HEADS)
    k, v = kv_arrays(batch, capacity, dtype, seed)
    cache = KVCache(k, v, jnp.full((batch,), length - 1, jnp.int32))
    step = mha_jax_step(implementation, compute_dtype)
    x = new_token(batch)
    note = compiled_summary(step, params, cache, x)
    run = chain(step, params, cache, x)
    name = f"mha_jax {implementation}" + (
        f", {jnp.dtype(compute_dtype).name} compute" if compute_dtype else ""
    )
    return Candidate(part, name, batch, length, capacity, jnp.dtype(dtype).name, run, note=note)


def flax_nnx_candidate(part, batch, length, capacity, seed=0):
    from flax import nnx

    module = nnx.MultiHeadAttention(NUM_HEADS, D_MODEL, decode=True, rngs=nnx.Rngs(0))
    module.init_cache((batch, capacity, D_MODEL), jnp.float32)
    module.cached_key[...], module.cached_value[...] = kv_arrays(batch, capacity, jnp.float32, seed)
    module.cache_index[...] = length - 1
    graphdef, params, cache = nnx.split(module, nnx.Param, nnx.Cache)

    def step(params, cache, x):
        layer = nnx.merge(graphdef, params, cache)
        index = layer.cache_index[...]
        out = layer(x)
        layer.cache_index[...] = index  # the same filled length next call
        return out, nnx.state(layer, nnx.Cache)

    run = chain(jax.jit(step, donate_argnums=1), params, cache, new_token(batch))
    return Candidate(part, "flax.nnx decode", batch, length, capacity, "float32", run)


def compiled_summary(step, params, cache, x) -> str:
    """The step as XLA compiled it: its loops, its gathers, and its converts of the whole
    cache (a sign of work that grows with the capacity rather than the filled length)."""
    lines = step.lower(params, cache, x).compile().as_text().splitlines()
    whole = "[" + ",".join(str(n) for n in cache.k.shape) + "]"
    loops = sum(" while(" in line for line in lines)
    gathers = sum(" gather(" in line for line in lines)
    shape = lambda line: line.split("=")[1].split(" ")[1]  # noqa: E731
    converts = sum(" convert(" in line and whole in shape(line) for line in lines)
    bitcasts = sum(" bitcast-convert(" in line and whole in shape(line) for line in lines)
    return (
        f"{loops} while loops, {gathers} gathers, {converts} converts and {bitcasts} bitcast-converts "
        "of a whole K or V cache"
    )


def auto_choice(length_k: int, dtype) -> str:
    """What `implementation="auto"` runs for a decode step over a cache of `length_k` slots."""
    request = kernels.Request.of(
        jax.ShapeDtypeStruct((1, NUM_HEADS, HEAD_DIM), jnp.float32),
        jax.ShapeDtypeStruct((length_k, NUM_HEADS, HEAD_DIM), dtype),
        mask=None,
        bias=None,
        structure=Structure(is_causal=True, q_offset=length_k - 2, kv_length=length_k - 1),
        options=Options(),
        return_weights=False,
    )._replace(batched=True)  # a decode step hands the whole batch over (kernels.attend_batch)
    name = kernels.choose("auto", request).name
    if name == "scan":
        return f"scan_cache (one loop over (example, block) pairs, blocks of {scan.BLOCK} keys)"
    if name != "blockwise":
        return name
    block_q, block_k = blockwise.default_block_sizes(1, length_k)
    return f"blockwise, blocks {block_q}x{block_k}"


# ---------------------------------------------------------------------------
# Part 3's probe and core variants: read-only functions of K, V [B, S, Hkv, Dh]


def probe():
    return jax.jit(lambda k, v: jnp.sum(k, dtype=jnp.float32) + jnp.sum(v, dtype=jnp.float32))


def core_queries(batch):
    return jax.random.normal(jax.random.PRNGKey(2), (batch, 1, NUM_HEADS, HEAD_DIM))  # [B, 1, H, Dh]


def blockwise_core(block_k):
    """The attention core alone (no projections, no append), as the step calls it: one
    example under `jax.vmap`, its filled length a traced value per example."""

    def one(q, k, v, length):  # [1, H, Dh], [S, H, Dh] x2, int -> [1, H, Dh]
        structure = Structure(is_causal=True, q_offset=length - 1, kv_length=length)
        return mha_jax.blockwise_attention(q, k, v, structure=structure, block_sizes=(1, block_k))

    return jax.jit(jax.vmap(one))


def layout_core(block_k):
    """A sketch of the change part 3 points to (not the library's kernel): the same online
    softmax over the filled key blocks, but each block `[Bk, H, Dh]` is contracted where
    it lies, a multiply and a sum over Dh (then over Bk), with no per-head re-layout."""

    def one(q, k, v, length):  # [1, H, Dh], [S, H, Dh] x2, int -> [1, H, Dh]
        q = q[0].astype(jnp.float32) * HEAD_DIM**-0.5  # [H, Dh]
        capacity = k.shape[0]

        def step(j, carry):
            m, row_sum, acc = carry  # [H], [H], [H, Dh]
            start = jnp.minimum(j * block_k, capacity - block_k)  # the last block may move back
            k_blk = jax.lax.dynamic_slice_in_dim(k, start, block_k)  # [Bk, H, Dh]
            v_blk = jax.lax.dynamic_slice_in_dim(v, start, block_k)
            position = start + jnp.arange(block_k)
            visible = (position < length) & (position >= j * block_k)  # [Bk]
            scores = jnp.where(visible[:, None], jnp.sum(k_blk * q, axis=-1), -jnp.inf)  # [Bk, H]
            m_new = jnp.maximum(m, scores.max(axis=0))
            p = jnp.exp(scores - m_new)  # [Bk, H]
            alpha = jnp.exp(m - m_new)
            acc = acc * alpha[:, None] + jnp.sum(p[..., None] * v_blk, axis=0)
            return m_new, row_sum * alpha + p.sum(axis=0), acc

        init = (jnp.full((NUM_HEADS,), -jnp.inf), jnp.zeros((NUM_HEADS,)), jnp.zeros((NUM_HEADS, HEAD_DIM)))
        _, row_sum, acc = jax.lax.fori_loop(0, -(-length // block_k), step, init)
        return (acc / row_sum[:, None])[None]

    return jax.jit(jax.vmap(one))


def dense_core(length, form: str):
    """One pass over the first `length` slots, no blocks: what XLA makes of the plain maths.

    "einsum": per-head contractions as a user writes them. "gemm": K and V read as
    `[L, H·Dh]` matrices (contiguous in the cache) against a block-diagonal query
    `[H·Dh, H]`, two plain matrix products (12x the useful flops, but one streaming read)."""

    def core(q, k, v, lengths):  # [B, 1, H, Dh], [B, S, H, Dh] x2, [B] (all = length) -> [B, H, Dh]
        k, v = k[:, :length], v[:, :length]
        q = q[:, 0].astype(jnp.float32) * HEAD_DIM**-0.5  # [B, H, Dh]
        if form == "einsum":
            scores = jnp.einsum("bhd,bkhd->bhk", q, k, preferred_element_type=jnp.float32)
            weights = jax.nn.softmax(scores, axis=-1)  # [B, H, L]
            return jnp.einsum("bhk,bkhd->bhd", weights, v, preferred_element_type=jnp.float32)
        eye = jnp.eye(NUM_HEADS, dtype=jnp.float32)
        q_diagonal = (q[..., None] * eye[:, None, :]).reshape(-1, D_MODEL, NUM_HEADS)  # [B, H·Dh, H]
        scores = jnp.matmul(k.reshape(-1, length, D_MODEL), q_diagonal)  # [B, L, H]
        weights = jax.nn.softmax(scores, axis=1)
        mixed = jnp.matmul(weights.transpose(0, 2, 1), v.reshape(-1, length, D_MODEL))  # [B, H, H·Dh]
        mixed = mixed.reshape(-1, NUM_HEADS, NUM_HEADS, HEAD_DIM)
        return jnp.einsum("bhhd->bhd", mixed)  # head h's weights on head h's values

    return jax.jit(core)


# ---------------------------------------------------------------------------
# Building, timing, reporting


def build(sizes: Sizes) -> list[Candidate]:
    made, seed = [], iter(range(10, 10_000))
    cap = sizes.capacity
    for batch in sizes.compare_batches:
        for implementation in ("auto", "reference"):
            made.append(
                mha_jax_candidate("1", implementation, batch, sizes.compare_length, cap, seed=next(seed))
            )
        made.append(flax_nnx_candidate("1", batch, sizes.compare_length, cap, seed=next(seed)))
    for length in sizes.lengths:
        if not (length == sizes.compare_length and 1 in sizes.compare_batches):  # part 1 has it
            made.append(mha_jax_candidate("2", "auto", 1, length, cap, seed=next(seed)))
            made.append(flax_nnx_candidate("2", 1, length, cap, seed=next(seed)))
    batch, length = sizes.traffic_batch, sizes.traffic_length
    for dtype in (jnp.float32, jnp.bfloat16):
        kv_bytes = 2 * batch * length * NUM_HEADS * HEAD_DIM * jnp.dtype(dtype).itemsize
        for capacity in sizes.traffic_capacities:
            made.append(mha_jax_candidate("3", "auto", batch, length, capacity, dtype, seed=next(seed)))
            made[-1].bytes_read = kv_bytes
        if dtype == jnp.bfloat16:  # the whole layer in bfloat16 (scores and softmax stay float32)
            made.append(mha_jax_candidate("3", "auto", batch, length, length, dtype, next(seed), dtype))
            made[-1].bytes_read = kv_bytes
        k, v = kv_arrays(batch, length, dtype, next(seed))
        name = f"probe: jnp.sum over K and V ({jnp.dtype(dtype).name})"
        made.append(Candidate("3", name, batch, length, length, jnp.dtype(dtype).name, repeat(probe(), k, v)))
        made[-1].bytes_read = kv_bytes
        if dtype == jnp.float32:  # where the time goes: the core alone, in several forms, same arrays
            args = (core_queries(batch), k, v, jnp.full((batch,), length, jnp.int32))
            variants = {
                "core: blockwise kernel 1x256 (the step before scan_cache)": blockwise_core(256),
                "core: blockwise 1x2048": blockwise_core(2048),
                "core: dense einsum over the L slots": dense_core(length, "einsum"),
                "core: dense block-diagonal GEMMs over the L slots": dense_core(length, "gemm"),
                "core sketch: 1x256 blocks contracted in the cache's layout": layout_core(256),
                "core sketch: 1x1024 blocks contracted in the cache's layout": layout_core(1024),
            }
            check_same(variants, *args)
            for name, fn in variants.items():
                made.append(Candidate("3d", name, batch, length, length, "float32", repeat(fn, *args)))
                made[-1].bytes_read = kv_bytes
    return made


def check_same(variants: dict, q, *args) -> None:
    """The core variants compute the same heads (up to float32 rounding)."""
    outs = {name: fn(q, *args).reshape(q.shape) for name, fn in variants.items()}
    first = next(iter(outs.values()))
    for name, out in outs.items():
        error = float(jnp.max(jnp.abs(out - first)))
        if not error < 1e-4:
            raise AssertionError(f"{name} differs from the step's core by {error}")


def time_all(made: list[Candidate], rounds: int, seed: int = 0) -> None:
    for candidate in made:  # compile, warm up, and size each round's sample
        candidate.run(2)
        begin = time.perf_counter()
        candidate.run(1)
        once = time.perf_counter() - begin
        candidate.reps = max(1, min(200, math.ceil(TARGET_SAMPLE_S / max(once, 1e-6))))
    order = list(range(len(made)))
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for index in order:
            candidate = made[index]
            begin = time.perf_counter()
            candidate.run(candidate.reps)
            candidate.times.append((time.perf_counter() - begin) / candidate.reps)


def ms(candidate: Candidate) -> float:
    return statistics.median(candidate.times) * 1e3


def ms_range(candidate: Candidate) -> str:
    return f"{ms(candidate):.3f} ({min(candidate.times) * 1e3:.3f}-{max(candidate.times) * 1e3:.3f})"


def find(made, part, name_start, **where) -> Candidate | None:
    for c in made:
        if (c.part == part or (part == "2" and c.part == "1" and c.batch == 1)) and c.name.startswith(
            name_start
        ):
            if all(getattr(c, key) == value for key, value in where.items()):
                return c
    return None


def part1(made, sizes: Sizes) -> tuple[str, dict]:
    lines = [
        f"### 1. One decode step, L={sizes.compare_length} filled in a capacity of {sizes.capacity}",
        "",
        "| B | mha_jax auto ms (min-max) | mha_jax reference ms | flax.nnx decode ms | "
        "flax.nnx / mha_jax auto | target >= 2x |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for batch in sizes.compare_batches:
        ours, ref, theirs = (find(made, "1", n, batch=batch) for n in ("mha_jax auto", "mha_jax ref", "flax"))
        ratio = ms(theirs) / ms(ours)
        summary[f"B={batch}"] = ratio
        lines.append(
            f"| {batch} | {ms_range(ours)} | {ms_range(ref)} | {ms_range(theirs)} | "
            f"{ratio:.2f}x | {'met' if ratio >= 2 else 'not met'} |"
        )
    ours = find(made, "1", "mha_jax auto")
    lines += ["", f"auto ran: {auto_choice(sizes.capacity, jnp.float32)}; {ours.note}."]
    return "\n".join(lines), summary


def part2(made, sizes: Sizes) -> tuple[str, dict]:
    lines = [
        f"### 2. Step time against filled length L, capacity {sizes.capacity}, B=1",
        "",
        "| L | mha_jax auto ms (min-max) | ms per 1k filled | flax.nnx decode ms (min-max) |",
        "|---|---|---|---|",
    ]
    points = []
    for length in sizes.lengths:
        ours = find(made, "2", "mha_jax auto", batch=1, length=length, capacity=sizes.capacity)
        theirs = find(made, "2", "flax", batch=1, length=length, capacity=sizes.capacity)
        points.append((length, ms(ours)))
        lines.append(f"| {length} | {ms_range(ours)} | {ms(ours) / length * 1e3:.3f} | {ms_range(theirs)} |")
    slope, intercept = least_squares(points)
    lines += [
        "",
        f"Least-squares line: {intercept:.3f} ms + {slope * 1e3:.3f} ms per 1k filled "
        f"(the intercept is the part that does not grow with L: projections, append, dispatch). "
        f"Time at L={points[-1][0]} / time at L={points[-2][0]}: {points[-1][1] / points[-2][1]:.2f} "
        f"(2.00 if proportional).",
    ]
    return "\n".join(lines), {"ms_per_1k": slope * 1e3, "intercept_ms": intercept}


def least_squares(points):
    xs, ys = zip(*points, strict=True)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def gbps(candidate: Candidate) -> float:
    return candidate.bytes_read / (ms(candidate) / 1e3) / 1e9


def part3(made, sizes: Sizes) -> tuple[str, dict]:
    batch, length = sizes.traffic_batch, sizes.traffic_length
    probes = {c.dtype: c for c in made if c.part == "3" and c.name.startswith("probe")}
    lines = [
        f"### 3. Memory traffic, B={batch}, L={length}",
        "",
        "| candidate | cache | capacity | K+V read per step | ms (min-max) | GB/s | "
        "% of probe, same dtype | % of float32 probe | target >= 50% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for c in (c for c in made if c.part == "3"):
        share = 100 * gbps(c) / gbps(probes[c.dtype])
        share32 = 100 * gbps(c) / gbps(probes["float32"])
        verdict = "" if c.name.startswith("probe") else ("met" if share >= 50 else "not met")
        lines.append(
            f"| {c.name} | {c.dtype} | {c.capacity} | {c.bytes_read / 1e6:.0f} MB | {ms_range(c)} | "
            f"{gbps(c):.1f} | {share:.0f}% | {share32:.0f}% | {verdict} |"
        )
        summary[f"{c.name} {c.dtype} S={c.capacity}"] = {"gbps": gbps(c), "pct_probe_same_dtype": share}
    for dtype in ("float32", "bfloat16"):
        step = find(made, "3", "mha_jax auto", dtype=dtype, capacity=length)
        lines.append(f"\n{dtype} step: auto ran {auto_choice(length, jnp.dtype(dtype))}; {step.note}.")
    lines += [
        "",
        "#### Where the time goes: the attention core alone (q [B, 1, H, Dh], no projections), "
        "float32, on the probe's K and V",
        "",
        "| variant | ms (min-max) | GB/s | % of float32 probe |",
        "|---|---|---|---|",
    ]
    for c in (c for c in made if c.part == "3d"):
        share = 100 * gbps(c) / gbps(probes["float32"])
        lines.append(f"| {c.name} | {ms_range(c)} | {gbps(c):.1f} | {share:.0f}% |")
        summary[c.name] = {"gbps": gbps(c), "pct_probe": share}
    return "\n".join(lines), summary


def machine() -> dict:
    model = ""
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        model = names[0] if names else ""
    return {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "python": platform.python_version(),
        "backend": f"{jax.device_count()} {jax.default_backend()} device(s)",
        "cores": os.cpu_count(),
        "cpu": model,
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 15; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    parser.add_argument("--out", type=Path, help="report folder (default: docs/, bench_out/ with --quick)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 15)
    out_dir = args.out or Path("bench_out" if args.quick else "docs")
    out_dir.mkdir(parents=True, exist_ok=True)

    meta = machine()
    print(" | ".join(f"{key}: {value}" for key, value in meta.items()), flush=True)
    made = build(sizes)
    print(f"{len(made)} candidates built; timing {rounds} interleaved rounds ...", flush=True)
    time_all(made, rounds)
    meta["load average at end (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    sections = [part1(made, sizes), part2(made, sizes), part3(made, sizes)]

    head = [
        "## Decoding benchmark (scripts/bench_decode.py)",
        "",
        *(f"- {key}: {value}" for key, value in meta.items()),
        f"- {rounds} interleaved rounds; medians (min-max) of the per-call time, in ms; "
        "every call blocked on; float32 compute, D=768, 12 heads of 64, T=1 new token",
        "",
        "Filled length L = the keys a step attends to: the cache holds L-1 positions and the step "
        "appends the L-th (flax.nnx: `cache_index` = L-1). Each timed call is the library's step, "
        "jitted with the cache donated, followed inside the same jit by putting the length back "
        "(mha_jax: `cache._replace(length=cache_in.length)`; flax.nnx: `cache_index` restored): "
        "every call writes slot L-1 again and reads the same L keys, in place.",
        "",
    ]
    markdown = "\n".join(head) + "\n\n".join(text for text, _ in sections) + "\n"
    print("\n" + markdown)
    (out_dir / "bench_decode.md").write_text(markdown)
    report = {
        **meta,
        "rounds": rounds,
        "sizes": dataclasses.asdict(sizes),
        "summary": {f"part{i + 1}": summary for i, (_, summary) in enumerate(sections)},
        "candidates": [
            {
                **{k: getattr(c, k) for k in ("part", "name", "batch", "length", "capacity", "dtype")},
                **{"bytes_read": c.bytes_read, "reps_per_round": c.reps, "note": c.note},
                "median_ms": ms(c),
                "min_ms": min(c.times) * 1e3,
                "max_ms": max(c.times) * 1e3,
                "times_ms": [t * 1e3 for t in c.times],
            }
            for c in made
        ],
    }
    (out_dir / "bench_decode.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir}/bench_decode.md and .json")


if __name__ == "__main__":
    main()
