"""Sentence embeddings with all-MiniLM-L6-v2 running on mha_jax: their cosine similarities.

    python scripts/embed.py "LLM with me.郭同学热爱AI喜欢游戏" "I like games." "今天天气很好"
    python scripts/embed.py --json "one sentence" "another"      (about 5 s on 2 CPU cores)

Prints the sentences by index, then the cosine-similarity matrix of their
mean-pooled, L2-normalised embeddings (4 decimals). With `--json` it prints one
JSON object instead: {"sentences": [...], "embeddings": [[384 floats], ...]}.
The checkpoint is the one the Makefile installs (`--folder` reads another HF folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mha_jax.models import bert


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="*", help="the sentences to embed (one or more)")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"sentences": [...], "embeddings": [[...], ...]} instead of the similarity matrix',
    )
    parser.add_argument("--folder", type=Path, help="an HF BERT folder (default: installed all-MiniLM-L6-v2)")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int | str:
    """The command line: its exit status, or the one `error: ...` line to exit with."""
    args = parse_args(argv)
    if not args.sentences:
        return 'error: give at least one sentence, e.g. python scripts/embed.py "Hello there."'
    try:
        model, tokenizer = bert.load(args.folder)
        ids, lengths = bert.tokenize(tokenizer, args.sentences)
    except (OSError, ValueError, KeyError) as error:
        return "error: " + " ".join(str(error).split())
    embeddings = np.asarray(bert.embed(model, ids, lengths))  # [B, D]
    if args.json:
        print(
            json.dumps({"sentences": args.sentences, "embeddings": embeddings.tolist()}, ensure_ascii=False)
        )
    else:
        print(similarity_table(args.sentences, embeddings))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
