"""Sentence embeddings with all-MiniLM-L6-v2 running on mha_jax: their cosine similarities.

    python scripts/embed.py "LLM with me.郭同学热爱AI喜欢游戏" "I like games." "今天天气很好"
    python scripts/embed.py --json "one sentence" "another"      (about 5 s on 2 CPU cores)

Prints the sentences by index, then the cosine-similarity matrix of their
mean-pooled, L2-normalised embeddings (4 decimals). With `--json` it prints one
JSON object instead: {"sentences": [...], "embeddings": [[384 floats], ...]}.
The checkpoint is the one the Makefile installs (`--folder` reads another HF folder).

The arguments (and the folder's files) are checked before the model loads. Every failure
is one `error: ...` line and status 1; Ctrl-C, at any moment, one line and 130; a reader
that stops early (`| head -c 5`) ends the run quietly, with status 141.
"""

# ruff: noqa: E402 (Ctrl-C is handled from the first line on, before the slow imports)
from __future__ import annotations

import os
import signal
import sys


def _interrupted(signum, frame):
    """Ctrl-C in the script, at any moment: there is nothing to finish or save, so the line
    and status 130 at once. (A KeyboardInterrupt can land in a gc callback or a __del__,
    where Python prints "Exception ignored" and carries on.)"""
    os.write(2, b"error: interrupted (SIGINT)\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)  # before the slow imports

import argparse
import json
from pathlib import Path

import numpy as np

from mha_jax.models import bert

FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what bert.load reads


def similarity_table(sentences: list[str], embeddings: np.ndarray) -> str:
    """The sentences by index, then their cosine similarities, rows and columns labelled by index."""
    similarities = embeddings @ embeddings.T  # unit vectors: dot = cosine
    lines = [f"[{i}] {sentence}" for i, sentence in enumerate(sentences)]
    width = 8
    lines.append("")
    lines.append(" " * 4 + "".join(f"[{j}]".rjust(width) for j in range(len(sentences))))
    for i, row in enumerate(similarities):
        lines.append(f"[{i}]".ljust(4) + "".join(f"{value:{width}.4f}" for value in row))
    return "\n".join(lines)


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
    parser.add_argument("sentences", nargs="*", help="the sentences to embed (one or more)")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"sentences": [...], "embeddings": [[...], ...]} instead of the similarity matrix',
    )
    parser.add_argument("--folder", type=Path, help="an HF BERT folder (default: installed all-MiniLM-L6-v2)")
    args = parser.parse_args(argv)
    if not args.sentences:
        raise ArgumentError('give at least one sentence, e.g. python scripts/embed.py "Hello there."')
    for i, sentence in enumerate(args.sentences):
        undecodable = not_utf8(f"sentence [{i}]", sentence)
        if undecodable:
            raise ArgumentError(undecodable)
    if args.folder is not None:
        if not args.folder.is_dir():
            raise ArgumentError(f"--folder must be a directory (an HF BERT folder); got {args.folder}")
        missing = [name for name in FOLDER_FILES if not (args.folder / name).is_file()]
        if missing:
            expected, lacking = ", ".join(FOLDER_FILES), ", ".join(missing)
            raise ArgumentError(f"--folder must hold {expected}; got {args.folder} without {lacking}")
    return args


def cli(argv: list[str] | None = None) -> int | str:
    """The command line: its exit status, or the one `error: ...` line to exit with. Called
    from Python, Ctrl-C prints its line here and returns 130 (the script stops in
    `_interrupted` instead)."""
    try:
        return embed_sentences(argv)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130


def embed_sentences(argv: list[str] | None) -> int | str:
    try:
        args = parse_args(argv)
    except ArgumentError as error:
        return f"error: {error}"
    try:
        model, tokenizer = bert.load(args.folder)
        ids, lengths = bert.tokenize(tokenizer, args.sentences)
    except (OSError, ValueError, KeyError) as error:  # not installed, or a damaged file
        return "error: " + " ".join(str(error).split())
    embeddings = np.asarray(bert.embed(model, ids, lengths))  # [B, D]
    if args.json:
        print(
            json.dumps({"sentences": args.sentences, "embeddings": embeddings.tolist()}, ensure_ascii=False)
        )
    else:
        print(similarity_table(args.sentences, embeddings))
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
