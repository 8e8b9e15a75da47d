"""mha_jax.models.gemma: Gemma 3 270M on mha_jax equals HF transformers' Gemma3ForCausalLM loaded
from the same GGUF file (logits, greedy continuation), computed here in torch; cached decoding equals
one causal pass; a tiny random Gemma 3 equals transformers' with a sliding window that matters; the
tokenizer equals llama.cpp's algorithm and reads as transformers' does; the weight tables round-trip.

The HF model takes 45-80 s to load on 2 busy cores (transformers parses the GGUF header with
`gguf.GGUFReader` twice). `hf_oracle` loads it once per run, not once per pytest-xdist worker: the
first worker computes what the tests compare against and saves it as NumPy for the others."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download; the oracle reads the installed file
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import dataclasses
import functools
import heapq

import generate as generate_script
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from filelock import FileLock
from flax import nnx
from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from mha_jax.interop import checkpoint_path, gguf
from mha_jax.models import gemma

PATH = checkpoint_path("gemma3-270m")
PROMPTS = [  # the first is continued greedily; padded to the longest, as one batch
    "The capital of France is",
    "LLM with me.郭同学热爱AI喜欢游戏",
    "def fibonacci(n):\n    ",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def ours():
    return gemma.load(PATH)  # (model, tokenizer)


@pytest.fixture(scope="module")
def metadata():
    return gguf.open_gguf(PATH).metadata


def hf_outputs(prompt_ids: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What the tests compare against, from `Gemma3ForCausalLM.from_pretrained(gguf_file=)`
    in float32 on the CPU: the greedy continuation of the first prompt, and the logits of
    every prompt (the first with its continuation)."""
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        PATH.parent, gguf_file=PATH.name, dtype=torch.float32
    )
    model.eval()
    first = torch.tensor(prompt_ids[0][None], dtype=torch.long)
    with torch.no_grad():
        generated = model.generate(
            first, attention_mask=torch.ones_like(first), max_new_tokens=NEW_TOKENS, do_sample=False
        )[0].numpy()
        sequences = [generated, *prompt_ids[1:]]
        logits = [model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy() for ids in sequences]
    outputs = {"continuation": generated[len(prompt_ids[0]) :]}
    outputs.update({f"ids_{i}": ids for i, ids in enumerate(sequences)})
    outputs.update({f"logits_{i}": values for i, values in enumerate(logits)})
    return outputs


@pytest.fixture(scope="module")
def hf_oracle(ours, tmp_path_factory, worker_id):
    prompt_ids = [gemma.encode(ours[1], prompt) for prompt in PROMPTS]
    if worker_id == "master":  # no xdist
        return hf_outputs(prompt_ids)
    path = tmp_path_factory.getbasetemp().parent / "gemma_hf_oracle.npz"  # this run's, shared by its workers
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            np.savez(path, **hf_outputs(prompt_ids))
        return dict(np.load(path))


@pytest.fixture(scope="module")
def batch(ours, hf_oracle):
    """The oracle's sequences right-padded into one batch [3, L], their lengths, and our logits."""
    sequences = [hf_oracle[f"ids_{i}"] for i in range(len(PROMPTS))]
    lengths = [len(ids) for ids in sequences]
    ids = np.zeros((len(sequences), max(lengths)), np.int32)  # <pad> = 0 after each; causal: unseen
    for row, sequence in zip(ids, sequences, strict=True):
        row[: len(sequence)] = sequence
    return ids, lengths, np.asarray(gemma.forward(ours[0], ids))


# ---- The real model against transformers ----


def test_logits_equal_transformers(batch, hf_oracle):
    ids, lengths, logits = batch
    assert logits.shape == (3, ids.shape[1], 262144) and logits.dtype == np.float32
    errors = [np.abs(logits[i, :n] - hf_oracle[f"logits_{i}"]).max() for i, n in enumerate(lengths)]
    print(f"max |Δ| of the logits per sequence: {[f'{e:.1e}' for e in errors]} (logits up to ~30)")
    assert max(errors) <= 1e-3, errors  # measured 3e-5 to 7e-5: float32 rounding over 18 layers
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(logits[i, :n].argmax(-1), hf_oracle[f"logits_{i}"].argmax(-1))


def test_greedy_continuation_equals_transformers_generate(ours, hf_oracle):
    model, tokenizer = ours
    new = gemma.generate_ids(model, gemma.encode(tokenizer, PROMPTS[0]), NEW_TOKENS)
    np.testing.assert_array_equal(new, hf_oracle["continuation"])
    text = gemma.generate(model, tokenizer, PROMPTS[0], NEW_TOKENS)
    assert text == tokenizer.decode(hf_oracle["continuation"].tolist()) and len(text.split()) > 10
    print(f"{PROMPTS[0]!r} ->{text!r}")


def test_ragged_batch_streams_each_prompts_own_greedy_continuation(ours, hf_oracle):
    model, tokenizer = ours
    prompts = [gemma.encode(tokenizer, text) for text in (PROMPTS[1], PROMPTS[0])]  # row 1 is padded
    ids = np.zeros((2, max(map(len, prompts))), np.int32)
    for row, prompt in zip(ids, prompts, strict=True):
        row[: len(prompt)] = prompt
    steps = gemma.stream_tokens(model, ids, [len(p) for p in prompts], NEW_TOKENS)  # no stop id
    new = np.stack(list(steps), axis=1)  # [2, NEW_TOKENS]
    np.testing.assert_array_equal(new[1], hf_oracle["continuation"])
    alone = gemma.generate_ids(model, prompts[0], NEW_TOKENS)  # row 0, by itself
    np.testing.assert_array_equal(new[0, : len(alone)], alone)


def test_generate_script_model_gemma3_streams_the_greedy_continuation(ours, hf_oracle, monkeypatch, capsys):
    monkeypatch.setattr(generate_script.gemma, "load", lambda path: ours)  # already loaded
    argv = ["--model", "gemma3", "--prompt", PROMPTS[0], "--max-new-tokens", "6"]
    assert generate_script.cli(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == PROMPTS[0] + ours[1].decode(hf_oracle["continuation"][:6].tolist())
    assert printed[1].startswith("mha_jax: prefill 6 tokens in ") and "decode 5 tokens in" in printed[1]
    message = generate_script.cli(argv + ["--chat"])  # the base model's file has no chat template
    assert message.startswith("error: --chat: the gemma3 checkpoint holds no chat template"), message


def test_prefill_then_cached_steps_equal_one_causal_pass(ours, hf_oracle, batch):
    model = ours[0]
    sequence, prompt_length = hf_oracle["ids_0"], len(gemma.encode(ours[1], PROMPTS[0]))
    graphdef, params = nnx.split(model)
    caches = gemma.init_caches(model.config, 1, len(sequence))
    logits, caches = gemma.step(graphdef, params, caches, sequence[None, :prompt_length])  # prefill
    stepped = [logits]  # [1, V] each: the last position's
    for token in sequence[prompt_length:]:  # the same compiled steps as generate_ids
        logits, caches = gemma.step(graphdef, params, caches, jnp.array([[token]], jnp.int32))
        stepped.append(logits)
    assert [int(n) for n in caches[0].length] == [len(sequence)]
    error = np.abs(np.concatenate(stepped) - batch[2][0, prompt_length - 1 : len(sequence)]).max()
    print(f"max |Δ| cached against uncached: {error:.1e}")
    assert error <= 1e-4, error


def test_weight_tables_round_trip_exactly(ours):
    model = ours[0]
    # loaded onto the device once: a NumPy leaf would be copied in on every jitted step
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tensors = gemma.to_state_dict(model)
    from_file = gguf.hf_names(gguf.read_gguf(PATH)[0], "gemma3")  # no lm_head: tied
    assert len(gemma.weight_table(model.config)) == 2 + 9 * 18
    assert set(tensors) == set(from_file) and len(tensors) == 2 + 13 * 18
    for name, value in tensors.items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, from_file[name], err_msg=name)


def test_config_comes_from_the_file_and_transformers_defaults(metadata):
    config = gemma.GemmaConfig.from_gguf(metadata)
    assert config == dataclasses.replace(gemma.GemmaConfig(), norm_eps=float(np.float32(1e-6)))
    hf = transformers.Gemma3TextConfig()  # what the file lacks, from the same defaults HF uses
    assert (config.rope_local_theta, config.query_pre_attn_scalar) == (
        hf.rope_local_base_freq,
        hf.query_pre_attn_scalar,
    )
    assert config.final_logit_softcap is hf.final_logit_softcapping is hf.attn_logit_softcapping is None
    assert hf.hidden_activation == "gelu_pytorch_tanh" and hf.rope_scaling is None
    layer_types = transformers.Gemma3TextConfig(num_hidden_layers=18).layer_types
    assert [config.is_global(i) for i in range(18)] == [kind == "full_attention" for kind in layer_types]
    assert [i for i in range(18) if config.is_global(i)] == [5, 11, 17]


# ---- The tokenizer ----

TEXTS = [
    "The capital of France is",
    "LLM with me.郭同学热爱AI喜欢游戏",
    "Hello world! Café déjà vu — 123 😊",
    "def f(x):\n    return x ** 2  # squares\n\n\tdone",
    "  leading   spaces and trailing  ",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "ẞtraße 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ ﬁ Ⅻ <b>bold</b> <table>",
    "Mississippi aaaaaaaaa ========== 1000000000 ...... 🤗🤗🤗",  # equal pairs side by side
]


def llama_cpp_encode(metadata, text: str) -> list[int]:
    """llama.cpp's "llama" (SentencePiece) tokenizer, the spec: control and user-defined tokens
    are split out of the text first, longest first (`tokenizer_st_partition`); each remaining
    fragment has its spaces escaped to "▁" and is merged pair by pair (`spm_merge`); <bos> first."""
    tokens, kinds = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    specials = [t for t, kind in zip(tokens, kinds, strict=True) if kind in (3, 4) and t in text]
    fragments = [text]  # str: raw text; int: a token already
    for special in sorted(specials, key=len, reverse=True):
        split = []
        for fragment in fragments:
            pieces = [fragment] if isinstance(fragment, int) else fragment.split(special)
            for j, piece in enumerate(pieces):
                split.extend(([vocab[special]] if j else []) + ([piece] if piece != "" else []))
        fragments = split
    ids = [metadata["tokenizer.ggml.bos_token_id"]]
    for fragment in fragments:
        is_token = isinstance(fragment, int)
        ids.extend([fragment] if is_token else spm_merge(fragment.replace(" ", "▁"), vocab, metadata))
    return ids


def spm_merge(text: str, vocab: dict[str, int], metadata) -> list[int]:
    """`llm_tokenizer_spm_session.tokenize`: start from the characters; merge the adjacent pair
    whose concatenation is the highest-scoring token, the leftmost on ties, until none is left;
    pieces outside the vocabulary become <0xNN> byte tokens."""
    scores = metadata["tokenizer.ggml.scores"]
    symbols = list(text)
    following, preceding = [*range(1, len(symbols)), -1], list(range(-1, len(symbols) - 1))
    queue = []  # (-score, left, right, merged length)
    for left, right in [(i - 1, i) for i in range(1, len(symbols))]:
        if (merged := symbols[left] + symbols[right]) in vocab:
            heapq.heappush(queue, (-scores[vocab[merged]], left, right, len(merged)))
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
            continue  # stale: one side has merged since
        symbols[left], symbols[right] = symbols[left] + symbols[right], ""
        following[left] = following[right]
        if following[right] != -1:
            preceding[following[right]] = left
        for a, b in ((preceding[left], left), (left, following[left])):
            if a != -1 and b != -1 and (merged := symbols[a] + symbols[b]) in vocab:
                heapq.heappush(queue, (-scores[vocab[merged]], a, b, len(merged)))
    ids, i = [], 0
    while i != -1:
        piece = symbols[i]
        ids.extend([vocab[piece]] if piece in vocab else [vocab[f"<0x{b:02X}>"] for b in piece.encode()])
        i = following[i]
    return ids


def test_tokenizer_equals_llama_cpp_algorithm(ours, metadata):
    for text in TEXTS:
        assert gemma.encode(ours[1], text).tolist() == llama_cpp_encode(metadata, text), text
    assert gemma.encode(ours[1], "Hello world").tolist() == [2, 9259, 1902]  # <bos> Hello ▁world
    with pytest.raises(ValueError, match=r"text must be a non-empty string; got ''"):
        gemma.encode(ours[1], "")


def test_tokenizer_and_transformers_gguf_tokenizer_decode_each_others_ids(ours, metadata):
    # transformers' own conversion, as AutoTokenizer.from_pretrained(gguf_file=) runs it (its
    # tables, its converter, its class) on the metadata read here, without its 50 s GGUFReader
    # pass: a Unigram model over the BPE ranks, so its ids differ from ours ("▁capital" is one
    # token here, four there; transformers#41494), but both must read the same vocabulary.
    dicts = {  # GGUF key -> transformers' name, for the converter and for the tokenizer class
        part: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in names.items()
            if f"tokenizer.{key}" in metadata
        }
        for part, names in GGUF_TOKENIZER_MAPPING.items()
    }
    converted, extra = convert_gguf_tokenizer("gemma3_text", dicts["tokenizer"])
    theirs = transformers.GemmaTokenizerFast(tokenizer_object=converted, **dicts["tokenizer_config"], **extra)
    decode = functools.partial(ours[1].decode, skip_special_tokens=False)  # keep <start_of_turn>
    for text in TEXTS:
        our_ids, their_ids = gemma.encode(ours[1], text).tolist(), theirs(text)["input_ids"]
        assert our_ids[0] == their_ids[0] == 2  # <bos>
        assert decode(our_ids[1:]) == theirs.decode(our_ids[1:]) == text
        assert decode(their_ids[1:]) == theirs.decode(their_ids[1:]) == text
        assert len(our_ids) <= len(their_ids), text
    chat = gemma.encode(ours[1], TEXTS[5]).tolist()
    assert ours[1].decode(chat) == "user\nHi\nmodel\n"  # by default, control tokens are skipped


# ---- A tiny random Gemma 3 against transformers: the sliding window, both RoPE bases, the scales ----

TINY = gemma.GemmaConfig(
    vocab_size=37, d_model=16, num_layers=4, num_heads=3, num_kv_heads=1, head_dim=8, d_ff=24,
    max_positions=64, sliding_window=4, global_every=2, rope_global_theta=500.0, rope_local_theta=50.0,
    query_pre_attn_scalar=12.0, final_logit_softcap=5.0,
)  # fmt: skip
IDS = np.array(
    [[2, 5, 9, 31, 7, 7, 20, 1, 36, 3, 11, 4], [2, 30, 8, 8, 8, 15, 6, 22, 0, 19, 27, 13]], np.int32
)


@pytest.fixture(scope="module")
def tiny():
    """transformers' Gemma3ForCausalLM with TINY's sizes and every weight random, and ours from it."""
    config = transformers.Gemma3TextConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.d_model, num_hidden_layers=TINY.num_layers,
        num_attention_heads=TINY.num_heads, num_key_value_heads=TINY.num_kv_heads, head_dim=TINY.head_dim,
        intermediate_size=TINY.d_ff, max_position_embeddings=TINY.max_positions,
        sliding_window=TINY.sliding_window, rope_theta=TINY.rope_global_theta,
        rope_local_base_freq=TINY.rope_local_theta, query_pre_attn_scalar=TINY.query_pre_attn_scalar,
        final_logit_softcapping=TINY.final_logit_softcap, rms_norm_eps=TINY.norm_eps,
        layer_types=["full_attention" if TINY.is_global(i) else "sliding_attention" for i in range(4)],
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # bfloat16 values, as in real checkpoints: 1 + w is exact in float32
        for name, param in hf.named_parameters():
            param.copy_((torch.randn_like(param) * (0.5 if "norm" in name else 0.3)).bfloat16())
    tensors = {name: value.numpy() for name, value in hf.state_dict().items()}
    return hf, tensors, gemma.from_state_dict(tensors, TINY)


def test_tiny_logits_equal_transformers_with_the_window_hiding_keys(tiny):
    hf, _, model = tiny
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    ours = np.asarray(gemma.forward(model, IDS))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
    assert np.abs(theirs).max() > 1.0  # soft-capped at 5: not a vacuous match


def test_tiny_window_changes_exactly_the_positions_it_reaches(tiny):
    _, tensors, model = tiny
    wider = gemma.from_state_dict(tensors, dataclasses.replace(TINY, sliding_window=6))
    narrow, wide = np.asarray(gemma.forward(model, IDS)), np.asarray(gemma.forward(wider, IDS))
    # Query i sees keys i-3..i with a window of 4: up to position 3 nothing is hidden either way.
    np.testing.assert_allclose(narrow[:, :4], wide[:, :4], rtol=0, atol=1e-6)
    assert (np.abs(narrow[:, 4:] - wide[:, 4:]).max(axis=-1) > 1e-3).all()


def test_tiny_prefill_then_cached_steps_equal_one_causal_pass(tiny):
    model = tiny[2]
    graphdef, params = nnx.split(model)
    caches = gemma.init_caches(TINY, 2, 16)
    logits, caches = gemma.step(graphdef, params, caches, IDS[:, :6])  # a prompt past the window
    stepped = [logits]  # [B, V] each
    for t in range(6, IDS.shape[1]):
        logits, caches = gemma.step(graphdef, params, caches, IDS[:, t : t + 1])
        stepped.append(logits)
    whole = np.asarray(gemma.forward(model, IDS))
    np.testing.assert_allclose(np.stack(stepped, axis=1), whole[:, 5:], rtol=0, atol=1e-5)
    assert [int(n) for n in caches[-1].length] == [12, 12]


def test_tiny_weight_tables_round_trip_exactly(tiny):
    _, tensors, model = tiny
    back = gemma.to_state_dict(model)
    assert set(back) == set(tensors) - {"lm_head.weight"}  # tied to the embedding
    for name, value in back.items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)
    again = gemma.from_state_dict(back, TINY)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True):
        np.testing.assert_array_equal(a, b)


BAD_INPUTS = {
    "ids_rank_1": (lambda m, t: gemma.forward(m, IDS[0]), ValueError, r"ids must have rank 2 \[B, T\]"),
    "float_ids": (
        lambda m, t: gemma.forward(m, IDS.astype(np.float32)),
        TypeError,
        r"ids must have an integer",
    ),
    "too_long_cache": (
        lambda m, t: gemma.init_caches(TINY, 1, 65),
        ValueError,
        r"capacity must be at most max_positions=64; got 65",
    ),
    "missing_tensor": (
        lambda m, t: gemma.from_state_dict({}, TINY),
        ValueError,
        r"tensors must contain 'model.embed_tokens.weight'",
    ),
    "transposed_tensor": (
        lambda m, t: gemma.from_state_dict(
            t | {"model.layers.1.mlp.down_proj.weight": np.zeros((24, 16), np.float32)}, TINY
        ),
        ValueError,
        r"model.layers.1.mlp.down_proj.weight must have shape blocks.1.down.kernel=\(16, 24\); "
        r"got shape \(24, 16\)",
    ),
    "other_architecture": (
        lambda m, t: gemma.GemmaConfig.from_gguf({"general.architecture": "llama"}),
        ValueError,
        r"general.architecture must be one of \['gemma3'\]",
    ),
    "empty_prompt": (
        lambda m, t: gemma.generate_ids(m, np.zeros(0, np.int32), 4),
        ValueError,
        r"ids must be one non-empty sequence \[L\] of token ids; got shape \(0,\)",
    ),
    "no_new_tokens": (lambda m, t: gemma.generate_ids(m, [2, 5], 0), ValueError, r"max_new_tokens must be"),
    "other_tokenizer": (
        lambda m, t: gemma.load_tokenizer({"tokenizer.ggml.model": "gpt2"}),
        ValueError,
        r"tokenizer.ggml.model must be one of \['llama'\]; got 'gpt2'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_with_a_message(tiny, case):
    call, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        call(tiny[2], tiny[1])
