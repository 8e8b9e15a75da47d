"""Generate text with a pretrained model running on mha_jax, streamed as it decodes.

    python scripts/generate.py --prompt "LLM with me." --max-new-tokens 64
    python scripts/generate.py --chat --prompt "What is attention?" --temperature 0.7 --top-p 0.9 --seed 1
    python scripts/generate.py --prompt "LLM with me." --compare    (+ transformers' greedy generate)
    python scripts/generate.py --model gemma3 --prompt "The capital of France is" --compare

The prompt is prefilled in one call, then each new token is one cached step (greedy
unless --temperature > 0); the text is printed piece by piece as it decodes, then the
prefill and decode speeds. Both steps are compiled first, by a 2-token run on the same
shapes, so the speeds leave compilation out. --chat wraps the prompt in the model's chat
template (from its GGUF; SmolLM2's only: the Gemma 3 270M file is the base model and holds
none) and stops at its end-of-turn token. --compare loads HF
transformers' model from the same GGUF (float32, CPU; about 30 s), runs its greedy
`generate` on the same token ids in this process, and prints both speeds and whether the
tokens agree. Nothing is downloaded: the checkpoints are the ones the Makefile installs.

The arguments are checked before the model loads (those that need its sizes, right after).
Every failure is one `error: ...` line and status 1; Ctrl-C, at any moment, one line and
130; a reader that stops early (`| head -c 5`) ends the run quietly, with status 141.
"""

# ruff: noqa: E402 (Ctrl-C is handled from the first line on, before the slow imports)
from __future__ import annotations

import os
import signal
import sys

_open_line = False  # stdout's last character is not a newline (see `show`)


def _interrupted(signum, frame):
    """Ctrl-C in the script, at any moment: there is nothing to finish or save, so the line
    and status 130 at once. (A KeyboardInterrupt can land in a gc callback or a __del__,
    where Python prints "Exception ignored" and carries on.)"""
    if _open_line:
        try:
            os.write(1, b"\n")  # the line below starts a line of its own
        except OSError:
            pass
    os.write(2, b"error: interrupted (SIGINT)\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)  # before the slow imports

import argparse
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from mha_jax.interop import checkpoint_path, gguf
from mha_jax.models import gemma, llama

# The seeds jax.random.PRNGKey tells apart: it takes any int64 but keeps only the low 32 bits
# (without jax_enable_x64), so PRNGKey(2**32) == PRNGKey(0).
SEED_RANGE = (0, 2**32)


class Checkpoint(NamedTuple):
    """What the script needs of a model. Another model (`--model gemma3`) is one more loader
    in `MODELS` returning this record, with its own `generate` of the same signature."""

    model: Any
    tokenizer: Any  # a `tokenizers.Tokenizer`
    encode: Callable[[str], list[int]]  # text -> ids, as the model expects them (no BOS for SmolLM2)
    chat_template: str | None  # jinja2, from the GGUF metadata
    stop_ids: tuple[int, ...]  # end of a chat turn
    # (model, ids [B, L], lengths [B], max_new_tokens, *, stop_ids, rng, temperature, top_k, top_p,
    # capacity) -> tokens [B] per step
    generate: Callable[..., Iterator[np.ndarray]]
    gguf_path: Path  # for --compare: transformers loads the same file
    hf_class: str  # for --compare: transformers' class name


def smollm2() -> Checkpoint:
    path = checkpoint_path("smollm2-135m-instruct")
    model, tokenizer = llama.load(path)
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        chat_template=gguf.open_gguf(path).metadata["tokenizer.chat_template"],
        stop_ids=(model.config.eos_token_id,),
        generate=llama.generate,
        gguf_path=path,
        hf_class="LlamaForCausalLM",
    )


def gemma3() -> Checkpoint:
    path = checkpoint_path("gemma3-270m")
    model, tokenizer = gemma.load(path)
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        encode=lambda text: gemma.encode(tokenizer, text).tolist(),  # <bos> first
        chat_template=None,  # the base model's file has none
        stop_ids=(model.config.eos_token_id,),
        generate=gemma.stream_tokens,
        gguf_path=path,
        hf_class="Gemma3ForCausalLM",
    )


MODELS: dict[str, Callable[[], Checkpoint]] = {"smollm2": smollm2, "gemma3": gemma3}


class TextStream:
    """The text of the tokens so far, handed out in pieces as they complete: a byte-level token
    may hold part of a character (郭 is three SmolLM2 tokens), so a piece waits for the rest."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished character
            return ""
        piece, self.shown = text[self.shown :], len(text)
        return piece


class Timed(NamedTuple):
    tokens: list[int]
    prefill_s: float  # until the first new token was on the host
    decode_s: float  # from the first new token to the last


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def speeds(name: str, timed: Timed, prompt_tokens: int) -> str:
    decoded = len(timed.tokens) - 1  # the first new token comes from the prefill
    return (
        f"{name}: prefill {prompt_tokens} tokens in {timed.prefill_s:.3f} s "
        f"({rate(prompt_tokens, timed.prefill_s):.1f} tokens/s); decode {decoded} tokens in "
        f"{timed.decode_s:.2f} s ({rate(decoded, timed.decode_s):.1f} tokens/s)"
    )


def run_ours(checkpoint: Checkpoint, ids: list[int], args) -> Timed:
    prompt, lengths = np.array([ids], np.int32), np.array([len(ids)], np.int32)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    # room for the warm-up's 2 tokens (cli checked that the prompt and new tokens fit the context)
    context = checkpoint.model.config.max_positions
    capacity = min(llama.cache_capacity(len(ids) + max(args.max_new_tokens, 2) - 1), context)
    warm = checkpoint.generate(checkpoint.model, prompt, lengths, 2, capacity=capacity, **sampling)
    started = time.perf_counter()
    list(warm)  # compiles the prefill and the decode step for these shapes
    print(
        f"[compiled the prefill and decode steps in {time.perf_counter() - started:.1f} s]", file=sys.stderr
    )

    stream, tokens, first = TextStream(checkpoint.tokenizer), [], None
    started = time.perf_counter()
    steps = checkpoint.generate(
        checkpoint.model, prompt, lengths, args.max_new_tokens, stop_ids=checkpoint.stop_ids,
        rng=jax.random.PRNGKey(args.seed), capacity=capacity, **sampling,
    )  # fmt: skip
    try:
        for step in steps:
            now = time.perf_counter()
            first = now if first is None else first
            tokens.append(int(step[0]))
            show(stream.add(tokens[-1]))
    except KeyboardInterrupt:
        if _open_line:
            show("\n")  # the error line starts a line of its own
        raise
    show("\n")
    return Timed(tokens, first - started, now - first)


def show(text: str) -> None:
    """Streamed text on stdout, now."""
    global _open_line
    sys.stdout.write(text)
    sys.stdout.flush()
    if text:
        _open_line = not text.endswith("\n")


def run_transformers(checkpoint: Checkpoint, ids: list[int], max_new_tokens: int) -> Timed:
    """HF transformers' greedy `generate` on the same file and ids, float32 on the CPU; a clock
    streamer stamps each new token as `generate` hands it out."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    path = checkpoint.gguf_path
    print(f"[loading transformers' {checkpoint.hf_class} from {path.name}]", file=sys.stderr)
    hf_class = getattr(transformers, checkpoint.hf_class)
    model = hf_class.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    class Clock(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first the prompt, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    prompt = torch.tensor([ids])
    stop_ids = list(checkpoint.stop_ids)
    settings = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=stop_ids[0],
                    eos_token_id=stop_ids)  # fmt: skip
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, **settings)  # warm-up, as ours
        clock, started = Clock(), time.perf_counter()
        out = model.generate(prompt, max_new_tokens=max_new_tokens, streamer=clock, **settings)
    first, last = clock.times[1], clock.times[-1]
    return Timed(out[0, len(ids) :].tolist(), first - started, last - first)


class ArgumentError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ArgumentError(message)


def not_utf8(name: str, text: str) -> str | None:
    """The complaint about argument `name` if it is not UTF-8 text, else None. On Linux,
    argv bytes that do not decode arrive as a str with surrogate escapes."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates handed over from Python
            return f"{name} must be UTF-8 text; got {ascii(text)[:60]}"
        return f"{name} must be UTF-8 text; got bytes that do not decode: {raw[:40]!r}"


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompt", required=True, help="the text to continue (with --chat: the user's message)"
    )
    parser.add_argument("--model", default="smollm2", choices=list(MODELS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (needs --temperature)")
    parser.add_argument("--top-p", type=float, help="sample from the likeliest tokens up to probability p")
    parser.add_argument("--seed", type=int, default=0, help="for sampling")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--compare", action="store_true", help="also run HF transformers' greedy generate")
    args = parser.parse_args(argv)
    low, high = SEED_RANGE
    undecodable = not_utf8("--prompt", args.prompt)
    checks = [
        (undecodable is not None, undecodable),
        (not args.prompt.strip(), "--prompt must not be empty"),
        (args.max_new_tokens < 1, f"--max-new-tokens must be at least 1; got {args.max_new_tokens}"),
        (
            not 0 <= args.temperature < math.inf,
            f"--temperature must be finite and >= 0 (0 is greedy); got {args.temperature}",
        ),
        (args.top_k is not None and args.top_k < 1, f"--top-k must be at least 1; got {args.top_k}"),
        (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p must lie in (0, 1]; got {args.top_p}"),
        (
            not low <= args.seed < high,
            f"--seed must lie in [0, 2**32) (the seeds jax.random.PRNGKey tells apart); got {args.seed}",
        ),
        (
            args.temperature == 0 and (args.top_k is not None or args.top_p is not None),
            "--top-k and --top-p shape sampling: give --temperature > 0 with them (0 is greedy)",
        ),
        (args.compare and args.temperature > 0, "--compare runs greedy decoding: leave out --temperature"),
    ]
    for failed, message in checks:
        if failed:
            raise ArgumentError(message)
    return args


def cli(argv: list[str] | None = None) -> int | str:
    """The command line: its exit status, or the one `error: ...` line to exit with. Called
    from Python, Ctrl-C prints its line here and returns 130 (the script stops in
    `_interrupted` instead)."""
    try:
        return generate_text(argv)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130


def generate_text(argv: list[str] | None) -> int | str:
    try:
        args = parse_args(argv)
    except ArgumentError as error:
        return f"error: {error}"
    try:
        checkpoint = MODELS[args.model]()
    except (OSError, ValueError) as error:  # not installed, or a damaged file
        return "error: " + " ".join(str(error).split())
    text = args.prompt
    if args.chat and checkpoint.chat_template is None:
        return f"error: --chat: the {args.model} checkpoint holds no chat template (a base model)"
    vocab_size = checkpoint.model.config.vocab_size
    if args.top_k is not None and args.top_k > vocab_size:
        return (
            f"error: --top-k must be at most the vocabulary size of {args.model} ({vocab_size}); "
            f"got {args.top_k}"
        )
    if args.chat:
        text = llama.chat_prompt(checkpoint.chat_template, [{"role": "user", "content": args.prompt}])
    ids = checkpoint.encode(text)
    context = checkpoint.model.config.max_positions
    if len(ids) + args.max_new_tokens > context:
        return (
            f"error: the prompt ({len(ids)} tokens) plus --max-new-tokens ({args.max_new_tokens}) must fit "
            f"the {context} positions of {args.model}; got {len(ids) + args.max_new_tokens}"
        )
    if not args.chat:
        show(args.prompt)  # while the steps compile
    ours = run_ours(checkpoint, ids, args)
    print(speeds("mha_jax", ours, len(ids)))
    if args.compare:
        theirs = run_transformers(checkpoint, ids, args.max_new_tokens)
        print(speeds("transformers", theirs, len(ids)))
        speedup = rate(len(ours.tokens) - 1, ours.decode_s) / rate(len(theirs.tokens) - 1, theirs.decode_s)
        pairs = zip(ours.tokens, theirs.tokens, strict=False)
        differ = next(
            (i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours.tokens), len(theirs.tokens))
        )
        agree = ours.tokens == theirs.tokens
        verdict = (
            f"yes ({len(ours.tokens)} of {len(ours.tokens)})" if agree else f"no (from token {differ} on)"
        )
        print(f"decode speed: mha_jax / transformers = {speedup:.2f}x; tokens agree: {verdict}")
    return 0


def main() -> int | str:
    """`cli()` as a process. A reader that went away (`| head -c 5`) leaves the rest of the
    output nowhere to go: stdout points at /dev/null, so that the exit's flush is quiet too."""
    try:
        outcome = cli()
        sys.stdout.flush()
        return outcome
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process that SIGPIPE ended


if __name__ == "__main__":
    sys.exit(main())
