"""SmolLM2-135M-Instruct on mha_jax against HF transformers on the same weights, in one process.

    python scripts/bench_models.py             # about 5 min on 2 CPU cores (run it on an idle machine)
    python scripts/bench_models.py --quick     # 2 rounds of short runs: a smoke check (bench_out/)

Both models come from the installed GGUF (Q4_1, dequantised to float32): ours through
`mha_jax.models.llama`, transformers' `LlamaForCausalLM.from_pretrained(folder, gguf_file=...)`
(float32, CPU, torch's default threads, SDPA attention). Candidates are interleaved round-robin,
each round in a shuffled order; the tables give medians over the rounds (min-max beside them).

1. Decode at batch 1, float32: greedy `generate` of 64 new tokens after the chapter's sentence
   (30 tokens), ours (`llama.generate`) against transformers' `generate`; tokens/s from the
   second new token on (the first comes from the prefill), timed as each token reaches the host
   (transformers: a streamer's clock). Compilation is done before the rounds.
2. Prefill of 512 tokens at batch 1: our step over [1, 512] into an empty cache against
   transformers' forward with `use_cache=True, logits_to_keep=1` (the call `generate` makes).
3. Decode at batch 8: 8 prompts of 5 to 30 tokens (ours right-padded with lengths; transformers
   left-padded with its attention mask, as its `generate` wants), 32 new tokens each;
   tokens/s counts all 8 sequences.
4. The memory-bandwidth floor at batch 1: bytes a decode step must read (every weight once,
   the tied embedding included, plus the KV-cache slots our step reads: its whole capacity),
   divided by the rate of a streaming read (a jitted `jnp.sum` over a float32 array of that
   many bytes, interleaved with part 1); how close each decode comes to it.
5. bfloat16 weights and cache (ours): decode and prefill as in 1 and 2, and the error of the
   last-position logits of the four test prompts against float32.

Writes a Markdown and a JSON report (--out, default docs/bench_models.{md,json}).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from mha_jax.interop import checkpoint_path
from mha_jax.models import llama

PATH = checkpoint_path("smollm2-135m-instruct")
SENTENCE = "LLM with me.郭同学热爱AI喜欢游戏"
BATCH_PROMPTS = [
    SENTENCE,
    "The capital of France is",
    "Attention lets every token look at every other token.",
    "Once upon a time",
    "多头注意力机制",
    "def fibonacci(n):",
    "The three primary colours are",
    "Wq, Wk and Wv start random and are learned by gradient descent.",
]
TEST_PROMPTS = [SENTENCE, "Hi", "The capital of France is", "What is attention?"]
PARAGRAPH = (
    "Multi-head attention lets every token of a sentence look at every other token. Each head "
    "projects the tokens into queries, keys and values, compares every query with every key, and "
    "mixes the values by the softmax of those scores. "
)


class Candidate:
    """`run()` returns one measurement (tokens/s or seconds); one call per round."""

    def __init__(self, part: str, name: str, run: Callable[[], float], unit: str):
        self.part, self.name, self.run, self.unit, self.values = part, name, run, unit, []


# ---- Part 1 and 3: decode through each library's generate loop ----


def ours_decode(model, prompts, new_tokens) -> Callable[[], float]:
    ids, lengths = prompts
    batch = len(lengths)

    def run():
        times = []
        for _ in llama.generate(model, ids, lengths, new_tokens):  # no stop id: all new_tokens
            times.append(time.perf_counter())
        return batch * (len(times) - 1) / (times[-1] - times[0])

    run()  # compiles the prefill and the step
    return run


class Clock(transformers.generation.streamers.BaseStreamer):
    def __init__(self):
        self.times = []

    def put(self, value):  # first the prompt, then each new token
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_decode(model, prompts, new_tokens) -> Callable[[], float]:
    """Left-padded, as transformers' generate expects for a batch of decoder prompts."""
    ids, lengths = prompts
    batch, width = ids.shape
    left = np.full_like(ids, 2)
    for b, length in enumerate(lengths):
        left[b, width - length :] = ids[b, :length]
    prompt = torch.tensor(left.astype(np.int64))
    mask = torch.tensor((np.arange(width) >= width - lengths[:, None]).astype(np.int64))
    settings = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=2)

    def run():
        clock = Clock()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, streamer=clock, **settings)
        first, last = clock.times[1], clock.times[-1]
        return batch * (len(clock.times) - 2) / (last - first)

    run()
    return run


# ---- Part 2: prefill ----


def ours_prefill(model, ids) -> Callable[[], float]:
    graphdef, params = nnx.split(model)
    step = llama.decode_step(graphdef)
    dtype = model.embed.embedding[...].dtype
    lengths = jnp.array([ids.shape[1]], jnp.int32)
    capacity = llama.cache_capacity(ids.shape[1] + 64)

    def run():
        caches = llama.init_caches(model.config, 1, capacity, dtype)
        jax.block_until_ready(caches)
        started = time.perf_counter()
        logits, _ = step(params, caches, ids, lengths)
        jax.block_until_ready(logits)
        return time.perf_counter() - started

    run()
    return run


def hf_prefill(model, ids) -> Callable[[], float]:
    prompt = torch.tensor(np.asarray(ids).astype(np.int64))

    def run():
        with torch.no_grad():
            started = time.perf_counter()
            model(prompt, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - started

    run()
    return run


# ---- Part 4: the streaming-read probe ----


def probe(nbytes: int) -> tuple[Callable[[], float], int]:
    array = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)

    def run():
        started = time.perf_counter()
        jax.block_until_ready(total(array))
        return time.perf_counter() - started

    run()
    return run, array.nbytes


def step_bytes(model, capacity: int) -> tuple[int, int]:
    """What one decode step at batch 1 reads: every weight once, and the K and V slots of every
    layer (our step's attention reads the cache's whole capacity)."""
    weights = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    config, dtype = model.config, model.embed.embedding[...].dtype
    slots = 2 * config.num_layers * capacity * config.num_kv_heads * config.head_dim
    return weights, slots * jnp.dtype(dtype).itemsize


# ---- Part 5: bfloat16 ----


def as_bfloat16(model):
    graphdef, params = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))


def logits_error(model, low, tokenizer) -> dict:
    ids, lengths = llama.tokenize(tokenizer, TEST_PROMPTS)
    forward = nnx.jit(lambda m, ids, lengths: m(ids, lengths))
    rows = np.arange(len(lengths)), lengths - 1
    exact = np.asarray(forward(model, ids, lengths))[rows]
    rounded = np.asarray(forward(low, ids, lengths).astype(jnp.float32))[rows]
    return {
        "max_abs": float(np.abs(rounded - exact).max()),
        "max_abs_logit": float(np.abs(exact).max()),
        "argmax_agree": f"{int((rounded.argmax(-1) == exact.argmax(-1)).sum())}/{len(lengths)}",
    }


# ---- Rounds and the report ----


def measure(candidates: list[Candidate], rounds: int) -> None:
    for r in range(rounds):
        order = random.Random(r).sample(candidates, len(candidates))
        for candidate in order:
            candidate.values.append(candidate.run())
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)


def summary(candidate: Candidate) -> dict:
    values = candidate.values
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def spread(stats: dict, digits: int = 1) -> str:
    low, high = sorted((stats["min"], stats["max"]))
    return f"{stats['median']:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def machine() -> dict:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()}


def versions() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    return {
        "jax": jax.__version__, "flax": flax.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "git": commit.strip() + " + uncommitted changes",
    }  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 16 new tokens, prefill 128")
    parser.add_argument("--out", type=Path, help="report prefix (default docs/bench_models)")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    new_tokens, prefill_length = (16, 128) if args.quick else (64, 512)
    out = args.out or (Path("bench_out/bench_models") if args.quick else Path("docs/bench_models"))
    command = "python scripts/bench_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started_at = datetime.datetime.now().isoformat(timespec="seconds")
    info = {"machine": machine(), "versions": versions()}
    print(f"{command.strip()}  ({started_at}, load average {info['machine']['load_average_at_start']})")

    model, tokenizer = llama.load(PATH)
    low = as_bfloat16(model)
    hf = transformers.LlamaForCausalLM.from_pretrained(PATH.parent, gguf_file=PATH.name, dtype=torch.float32)
    hf.eval()
    one = llama.tokenize(tokenizer, [SENTENCE])  # [1, 30]
    eight = llama.tokenize(tokenizer, BATCH_PROMPTS)  # [8, 30], ragged
    text = PARAGRAPH * 20
    long_ids = jnp.asarray(tokenizer.encode(text, add_special_tokens=False).ids[:prefill_length])[None]
    capacity = llama.cache_capacity(one[0].shape[1] + new_tokens - 1)
    weight_bytes, cache_bytes = step_bytes(model, capacity)
    nbytes = weight_bytes + cache_bytes
    print("compiling and warming up ...", file=sys.stderr)
    probe_run, probe_bytes = probe(nbytes)
    candidates = [
        Candidate("decode1", "mha_jax", ours_decode(model, one, new_tokens), "tokens/s"),
        Candidate("decode1", "transformers", hf_decode(hf, one, new_tokens), "tokens/s"),
        Candidate("decode1", "mha_jax bf16", ours_decode(low, one, new_tokens), "tokens/s"),
        Candidate("floor", "streaming read", probe_run, "s"),
        Candidate("prefill", "mha_jax", ours_prefill(model, long_ids), "s"),
        Candidate("prefill", "transformers", hf_prefill(hf, long_ids), "s"),
        Candidate("prefill", "mha_jax bf16", ours_prefill(low, long_ids), "s"),
        Candidate("decode8", "mha_jax", ours_decode(model, eight, new_tokens // 2), "tokens/s"),
        Candidate("decode8", "transformers", hf_decode(hf, eight, new_tokens // 2), "tokens/s"),
    ]
    measure(candidates, rounds)
    stats = {(c.part, c.name): summary(c) for c in candidates}
    error = logits_error(model, low, tokenizer)

    rate = probe_bytes / stats[("floor", "streaming read")]["median"]
    floor_s = nbytes / rate
    d = lambda name: stats[("decode1", name)]  # noqa: E731
    e = lambda name: stats[("decode8", name)]  # noqa: E731
    pre = {  # seconds -> tokens/s
        name: {k: prefill_length / v for k, v in stats[("prefill", name)].items() if k != "values"}
        for name in ("mha_jax", "transformers", "mha_jax bf16")
    }
    ratio = lambda ours, theirs: f"{ours['median'] / theirs['median']:.2f}×"  # noqa: E731
    row = lambda *cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    machine_line = (
        f"`{command.strip()}`, {started_at}; {info['machine']['cpu']}, {info['machine']['cores']} cores, "
        f"load average at start {tuple(round(x, 2) for x in info['machine']['load_average_at_start'])}; "
        f"{rounds} interleaved rounds, medians (min–max); jax {info['versions']['jax']}, "
        f"torch {info['versions']['torch']} ({info['versions']['torch_threads']} threads), "
        f"transformers {info['versions']['transformers']}."
    )
    lines = [
        "# SmolLM2-135M-Instruct: mha_jax against HF transformers (same weights, same process)",
        "",
        machine_line,
        "",
        row("measure", "mha_jax", "transformers", "mha_jax / transformers"),
        row("---", "---", "---", "---"),
        row(
            f"decode, batch 1, float32 (tokens/s; {new_tokens} new after 30)",
            spread(d("mha_jax")), spread(d("transformers")), ratio(d("mha_jax"), d("transformers")),
        ),
        row(
            f"prefill {prefill_length} tokens, batch 1, float32 (tokens/s)",
            spread(pre["mha_jax"], 0), spread(pre["transformers"], 0),
            ratio(pre["mha_jax"], pre["transformers"]),
        ),
        row(
            f"decode, batch 8, float32 (tokens/s, all 8; {new_tokens // 2} new)",
            spread(e("mha_jax")), spread(e("transformers")), ratio(e("mha_jax"), e("transformers")),
        ),
        row(
            f"decode at batch 1: share of the bandwidth floor ({floor_s * 1e3:.1f} ms/token)",
            f"{floor_s * d('mha_jax')['median']:.0%}", f"{floor_s * d('transformers')['median']:.0%}", "",
        ),
        row(
            "bfloat16 weights and cache: decode, batch 1 (tokens/s)",
            spread(d("mha_jax bf16")), "", ratio(d("mha_jax bf16"), d("mha_jax")) + " of float32",
        ),
        row(
            f"bfloat16: prefill {prefill_length} tokens (tokens/s)",
            spread(pre["mha_jax bf16"], 0), "", ratio(pre["mha_jax bf16"], pre["mha_jax"]) + " of float32",
        ),
        row(
            "bfloat16: last-position logits against float32 (4 prompts)",
            f"max abs error {error['max_abs']:.3f} (logits up to {error['max_abs_logit']:.1f}); "
            f"argmax agrees {error['argmax_agree']}", "", "",
        ),
        "",
        f"Bandwidth floor: a decode step at batch 1 reads {nbytes / 1e6:.1f} MB (weights "
        f"{weight_bytes / 1e6:.1f} MB, the tied embedding once; KV cache {cache_bytes / 1e6:.1f} MB, "
        f"{capacity} slots × 30 layers); the streaming read ran at {rate / 1e9:.1f} GB/s, so a float32 "
        f"decode step cannot take less than {floor_s * 1e3:.1f} ms ({1 / floor_s:.1f} tokens/s) here.",
    ]  # fmt: skip
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    result = {
        "command": command.strip(), "date": started_at, **info, "rounds": rounds,
        "new_tokens": new_tokens, "prefill_length": prefill_length, "bytes_per_decode_step": nbytes,
        "streaming_read_bytes_per_s": rate, "floor_s_per_token": floor_s, "bf16_logits_error": error,
        "candidates": [{"part": c.part, "name": c.name, "unit": c.unit, **summary(c)} for c in candidates],
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"written to {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
