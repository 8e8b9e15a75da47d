"""mha_jax.models.llama: SmolLM2-135M-Instruct from its GGUF on mha_jax equals HF transformers'
LlamaForCausalLM loaded from the same file, computed here in torch: last-position logits and
greedy continuations (ours as one ragged batch, theirs one prompt at a time); prefill + cached
decode equals the uncached forward; the two RoPE layouts agree; the tokenizer and chat
template built from the GGUF metadata equal transformers'; the weight table round-trips."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download; the oracle reads the installed file
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import dataclasses

import generate as generate_script
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mha_jax.interop import checkpoint_path, gguf
from mha_jax.models import llama, sampling

PATH = checkpoint_path("smollm2-135m-instruct")
METADATA = gguf.open_gguf(PATH).metadata
CHAT = llama.chat_prompt(
    METADATA["tokenizer.chat_template"], [{"role": "user", "content": "What is attention?"}]
)
PROMPTS = [  # 30, 1, 5 and 34 tokens: one ragged batch
    "LLM with me.郭同学热爱AI喜欢游戏",
    "Hi",
    "The capital of France is",
    CHAT,
]
NEW_TOKENS = 32
MORE_TEXTS = [  # for the tokenizer only: digits, whitespace runs, accents, emoji, code
    "SmolLM2 has 135M parameters; 3.14159 ≠ 22/7.",
    "  two  spaces\tand a tab\n\nnew lines",
    "Café DÉJÀ vu: naïve résumé! 🤖👍",
    "def f(x):\n    return x ** 2  # <|im_end|> inside text",
]


@pytest.fixture(scope="module")
def ours():
    return llama.load(PATH)  # (model, tokenizer), rope_layout="half"


@pytest.fixture(scope="module")
def hf():
    # transformers parses the GGUF header once per call (~5 s each here): the config, passed on,
    # spares the model's loader a second parse. One torch thread: on 2 shared cores, two threads
    # made a 32-token generate 6x slower (OpenMP waits for a busy core).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = transformers.AutoConfig.from_pretrained(PATH.parent, gguf_file=PATH.name)
    model = transformers.LlamaForCausalLM.from_pretrained(
        PATH.parent, gguf_file=PATH.name, config=config, dtype=torch.float32
    )
    yield model.eval(), transformers.AutoTokenizer.from_pretrained(PATH.parent, gguf_file=PATH.name)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(ours):
    return llama.tokenize(ours[1], PROMPTS)  # ids [4, 34], lengths [4]


@pytest.fixture(scope="module")
def hf_runs(hf, prompts):
    """Per prompt, alone (no padding): the last position's logits and the greedy continuation."""
    model, (ids, lengths) = hf[0], prompts
    runs = []
    for row, length in zip(ids, lengths, strict=True):
        prompt = torch.tensor(row[None, :length].astype(np.int64))
        with torch.no_grad():
            last = model(prompt).logits[0, -1].numpy()
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
                eos_token_id=None, pad_token_id=2,
            )  # fmt: skip
        runs.append((last, out[0, length:].numpy()))
    return runs


@pytest.fixture(scope="module")
def continuation(ours, prompts):
    """Our greedy continuation of the batch, no stop token: tokens [B, NEW_TOKENS]."""
    return np.stack(list(llama.generate(ours[0], *prompts, NEW_TOKENS)), axis=1)


@pytest.fixture(scope="module")
def full(ours, prompts, continuation):
    """Prompt + continuation per example, right-padded, and one uncached forward over them."""
    (ids, lengths), batch = prompts, len(PROMPTS)
    full_ids = np.full((batch, ids.shape[1] + NEW_TOKENS), 2, np.int32)
    for b in range(batch):
        full_ids[b, : lengths[b] + NEW_TOKENS] = np.concatenate([ids[b, : lengths[b]], continuation[b]])
    full_lengths = lengths + NEW_TOKENS
    logits = nnx.jit(lambda model, ids, lengths: model(ids, lengths))(ours[0], full_ids, full_lengths)
    return full_ids, full_lengths, np.asarray(logits)  # [B, L + 32, V]


def test_tokenizer_ids_equal_transformers(ours, hf, prompts):
    ids, lengths = prompts
    assert lengths.tolist() == [30, 1, 5, 34] and ids.shape == (4, 34)
    for text in PROMPTS + MORE_TEXTS:
        # transformers' GGUF tokenizer prepends tokens[bos_token_id] = <|im_start|>; SmolLM2 adds none
        theirs = hf[1](text, add_special_tokens=False)["input_ids"]
        encoded = ours[1].encode(text, add_special_tokens=False)
        assert encoded.ids == theirs, text
        assert ours[1].decode(encoded.ids, skip_special_tokens=False) == text
    assert ids[3, :3].tolist() == [1, 9690, 198]  # <|im_start|> system \n: a special token is one id


def test_chat_template_renders_as_transformers(hf):
    for messages in (
        [{"role": "user", "content": "What is attention?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "LLM with me.郭同学"}],
    ):
        theirs = hf[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert llama.chat_prompt(METADATA["tokenizer.chat_template"], messages) == theirs


def test_last_position_logits_equal_transformers(full, prompts, hf_runs):
    _, _, logits = full
    lengths = prompts[1]
    errors = [np.abs(logits[b, lengths[b] - 1] - last).max() for b, (last, _) in enumerate(hf_runs)]
    print(f"max |Δ| of the last-position logits against LlamaForCausalLM, per prompt: {errors}")
    assert max(errors) <= 1e-3, errors


def test_greedy_continuation_equals_transformers_generate(continuation, hf_runs):
    for b, (_, theirs) in enumerate(hf_runs):
        np.testing.assert_array_equal(continuation[b], theirs, err_msg=PROMPTS[b])


def test_prefill_and_cached_decode_equal_the_uncached_forward(ours, prompts, continuation, full):
    """The steps `generate` makes, replayed, against the one causal forward over the same tokens."""
    (ids, lengths), (_, _, logits) = prompts, full
    batch = len(PROMPTS)
    graphdef, params = nnx.split(ours[0])
    step = llama.decode_step(graphdef)
    capacity = llama.cache_capacity(ids.shape[1] + NEW_TOKENS - 1)
    caches = llama.init_caches(ours[0].config, batch, capacity)
    step_logits, caches = step(params, caches, jnp.asarray(ids), jnp.asarray(lengths))
    errors = [np.abs(np.asarray(step_logits) - logits[np.arange(batch), lengths - 1]).max()]
    ones = jnp.ones((batch,), jnp.int32)
    for t in range(NEW_TOKENS - 1):
        step_logits, caches = step(params, caches, continuation[:, t : t + 1], ones)
        errors.append(np.abs(np.asarray(step_logits) - logits[np.arange(batch), lengths + t]).max())
    # float32 through 30 layers, two kernels (scan for the steps, blockwise for the forward):
    # rounding, relative to the logits' size (this CPU or that one's summation order).
    scale = float(np.abs(logits).max())
    print(f"max |Δ| cached against uncached logits: {max(errors):.2e} (logits up to {scale:.1f})")
    assert max(errors) <= 1e-5 * scale, errors
    assert [int(c.length[0]) for c in caches[:1]] == [lengths[0] + NEW_TOKENS - 1]


@pytest.fixture(scope="module")
def raw():
    """The file's tensors as stored (dequantised; Q and K rows in llama.cpp's interleaved order)."""
    file = gguf.open_gguf(PATH)
    return {name: gguf.read_tensor(file, name) for name in file.tensors}


@pytest.fixture(scope="module")
def interleaved(ours, raw):
    """The same file with Q and K rows kept in the file's order, and RoPE pairs (2i, 2i+1)."""
    return llama.from_tensors(raw, dataclasses.replace(ours[0].config, rope_layout="interleaved"))


def test_rope_layouts_file_order_interleaved_equals_unpermuted_half(ours, interleaved, full):
    w_q = lambda model: np.asarray(model.blocks[0].attention.w_q[...])
    assert not np.array_equal(w_q(interleaved), w_q(ours[0]))  # the features really are in another order
    full_ids, full_lengths, logits = full
    forward = nnx.jit(lambda model, ids, lengths: model(ids, lengths))
    theirs = np.asarray(forward(interleaved, full_ids, full_lengths))
    valid = np.arange(full_ids.shape[1]) < full_lengths[:, None]
    error = np.abs(theirs - logits)[valid].max()
    print(f"max |Δ| between the RoPE layouts' logits: {error:.2e}")
    assert error <= 5e-4, error  # float32 sums in another order, through 30 blocks; logits reach ~30
    assert (theirs[valid].argmax(-1) == logits[valid].argmax(-1)).all()


def test_weight_table_round_trips_to_the_file_exactly(ours, interleaved, raw):
    # loaded onto the device once: a NumPy leaf would be copied in on every jitted step
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(ours[0], nnx.Param)))
    assert len(llama.weight_table(ours[0].config)) == len(raw) == 2 + 9 * 30
    for model in (ours[0], interleaved):  # Q and K rows permuted back for "half"; as read for "interleaved"
        tensors = llama.to_tensors(model)
        assert set(tensors) == set(raw)
        for name, value in tensors.items():
            np.testing.assert_array_equal(value, raw[name], err_msg=name)


def test_config_is_read_from_the_gguf_metadata():
    config = llama.LlamaConfig.from_gguf(METADATA)
    assert config == llama.LlamaConfig(norm_eps=METADATA["llama.attention.layer_norm_rms_epsilon"])
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)


def test_sampling_settings():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
    greedy = np.asarray(sampling.sample(logits, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(greedy, np.asarray(logits).argmax(-1))
    for settings in (dict(top_k=1), dict(top_p=1e-6)):  # one candidate left: the argmax
        drawn = sampling.sample(logits, jax.random.PRNGKey(1), temperature=0.8, **settings)
        np.testing.assert_array_equal(drawn, greedy)
    draws = np.stack(
        [sampling.sample(logits, jax.random.PRNGKey(i), temperature=1.0, top_k=3) for i in range(40)]
    )
    top3 = np.argsort(np.asarray(logits), -1)[:, -3:]
    assert all(set(draws[:, b]) <= set(top3[b]) for b in range(3)) and len(set(draws[:, 0])) > 1


BAD_INPUTS = {
    "ids_rank_1": (lambda m, t: m(jnp.zeros((3,), jnp.int32)), ValueError, r"ids must have rank 2 \[B, T\]"),
    "float_ids": (lambda m, t: m(jnp.zeros((1, 3))), TypeError, r"ids must have an integer dtype"),
    "lengths_shape": (
        lambda m, t: m(jnp.zeros((2, 3), jnp.int32), jnp.array([3])),
        ValueError,
        r"lengths must have shape \[B\]=\(2,\); got shape \(1,\)",
    ),
    "no_texts": (lambda m, t: llama.tokenize(t, []), ValueError, r"texts must be a non-empty list"),
    "empty_text": (lambda m, t: llama.tokenize(t, ["a", ""]), ValueError, r"texts must each give at least"),
    "capacity": (
        lambda m, t: llama.init_caches(m.config, 1, 9000),
        ValueError,
        r"capacity must be at most max_positions=8192; got 9000",
    ),
    "gemma_file": (
        lambda m, t: llama.LlamaConfig.from_gguf(dict(METADATA, **{"general.architecture": "gemma3"})),
        ValueError,
        r"general.architecture must be one of \['llama'\]; got 'gemma3'",
    ),
    "untied_output": (
        lambda m, t: llama.from_tensors({"output.weight": np.zeros((1, 1))}, m.config),
        ValueError,
        r"tensors must hold only the tensors of a tied-embedding Llama; got also \['output.weight'\]",
    ),
    "missing_tensor": (
        lambda m, t: llama.from_tensors({}, m.config),
        ValueError,
        r"tensors must contain 'token_embd.weight'",
    ),
    "max_new_tokens": (
        lambda m, t: next(llama.generate(m, [[1]], [1], 0)),
        ValueError,
        r"max_new_tokens must be a positive integer; got 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_with_a_message(ours, case):
    call, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        call(*ours)


def test_generate_script_streams_the_greedy_continuation(ours, hf_runs, monkeypatch, capsys):
    monkeypatch.setattr(generate_script.llama, "load", lambda path: ours)  # already loaded
    assert generate_script.cli(["--prompt", "Hi", "--max-new-tokens", "4"]) == 0  # "Hi" is one token
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "Hi" + ours[1].decode(hf_runs[1][1][:4].tolist())  # transformers' 4 tokens
    assert printed[1].startswith("mha_jax: prefill 1 tokens in ") and "decode 3 tokens in" in printed[1]


def test_text_stream_hands_out_whole_characters(ours):
    ids = ours[1].encode("郭同 LLM").ids  # 郭 and 同 are 3 and 2 byte-level tokens
    stream = generate_script.TextStream(ours[1])
    pieces = [stream.add(token) for token in ids]
    assert pieces[:5] == ["", "", "郭", "", "同"] and "".join(pieces) == "郭同 LLM"


@pytest.mark.parametrize(
    "argv",
    [
        ["--prompt", "x", "--max-new-tokens", "0"],
        ["--prompt", " "],
        ["--prompt", "x", "--top-p", "0.9"],
        ["--prompt", "x", "--temperature", "0.7", "--top-k", "0"],
        ["--prompt", "x", "--model", "gpt5"],
        ["--prompt", "x", "--compare", "--temperature", "0.7"],
        [],
    ],
)
def test_generate_script_bad_arguments_are_one_error_line(argv):
    message = generate_script.cli(argv)
    assert message.startswith("error: ") and "\n" not in message, message
