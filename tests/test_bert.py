"""mha_jax.models.bert: all-MiniLM-L6-v2 on mha_jax equals HF transformers' BertModel with
sentence-transformers' mean pooling and normalisation, computed here in torch from the same folder;
its tokenizer equals transformers'; padding changes nothing; the weight tables round-trip;
scripts/embed.py end to end."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download; the oracle reads the installed folder
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import re

import embed as embed_script
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mha_jax.interop import checkpoint_path, files
from mha_jax.models import bert

FOLDER = checkpoint_path("all-minilm-l6-v2").parent
SENTENCES = [  # six lengths, from 3 to 27 tokens with [CLS] and [SEP]
    "LLM with me.郭同学热爱AI喜欢游戏",
    "Hi",
    "Attention lets every token look at every other token, near or far, in one step.",
    "多头注意力机制",
    "Café DÉJÀ vu: naïve résumé!",
    "Wq, Wk and Wv start random and are learned by gradient descent on the data.",
]


@pytest.fixture(scope="module")
def ours():
    return bert.load(FOLDER)  # (model, tokenizer)


@pytest.fixture(scope="module")
def hf():
    model = transformers.BertModel.from_pretrained(FOLDER).eval()
    return model, transformers.AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def batch(ours):
    model, tokenizer = ours
    ids, lengths = bert.tokenize(tokenizer, SENTENCES)
    return ids, lengths, np.asarray(bert.embed(model, ids, lengths))


def hf_embeddings(model, encoded) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2: mean over the attention mask, then L2 normalisation."""
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state  # [B, L, D]
    mask = encoded["attention_mask"][..., None].float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()


def test_tokenizer_ids_equal_transformers(batch, hf):
    ids, lengths, _ = batch
    encoded = hf[1](SENTENCES, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, encoded["input_ids"])
    np.testing.assert_array_equal(lengths, encoded["attention_mask"].sum(1))
    assert len(set(lengths.tolist())) == len(SENTENCES)  # every sentence pads by a different amount
    assert ids[0, 0] == 101 and ids[0, lengths[0] - 1] == 102 and (ids[0, lengths[0] :] == 0).all()


def test_tokenizer_truncates_to_sentence_transformers_max_length(ours, hf):
    long = " ".join(["attention"] * 300) + " 郭"
    ids, lengths = bert.tokenize(ours[1], [long, "short"])
    assert ids.shape == (2, 256) and lengths.tolist() == [256, 3]
    theirs = hf[1]([long], truncation=True, max_length=256)["input_ids"][0]
    np.testing.assert_array_equal(ids[0], theirs)  # ends with [SEP]


def test_embeddings_equal_transformers_bert_model(batch, hf):
    ids, _, embeddings = batch
    theirs = hf_embeddings(hf[0], hf[1](SENTENCES, padding=True, return_tensors="pt"))
    assert embeddings.shape == (len(SENTENCES), 384) and embeddings.dtype == np.float32
    error = np.abs(embeddings - theirs).max()
    print(f"max |Δ| against BertModel + mean pooling + normalize: {error:.2e}")
    assert error <= 1e-5, error
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_hidden_states_equal_transformers_on_valid_tokens(ours, batch, hf):
    ids, lengths, _ = batch
    hidden = np.asarray(nnx.jit(lambda model, ids, lengths: model(ids, lengths))(ours[0], ids, lengths))
    with torch.no_grad():
        theirs = hf[0](**hf[1](SENTENCES, padding=True, return_tensors="pt")).last_hidden_state.numpy()
    valid = np.arange(ids.shape[1]) < lengths[:, None]
    error = np.abs(hidden - theirs)[valid].max()
    print(f"max |Δ| of the hidden states on valid tokens: {error:.2e}")
    assert error <= 1e-4, error  # pre-pooling activations are O(1) to O(10)


@pytest.mark.parametrize("index", [0, 1])  # the chapter's sentence; the most padded one
def test_padding_changes_nothing(ours, batch, index):
    ids, lengths, embeddings = batch
    length = lengths[index]
    alone = np.asarray(bert.embed(ours[0], ids[index : index + 1, :length], lengths[index : index + 1]))
    np.testing.assert_allclose(alone[0], embeddings[index], rtol=0, atol=1e-5)
    garbage = ids.copy()
    garbage[index, length:] = 7592  # whatever sits in the padding is never seen
    changed = np.asarray(bert.embed(ours[0], garbage, lengths))
    np.testing.assert_allclose(changed, embeddings, rtol=0, atol=1e-6)


def test_weight_tables_round_trip_exactly(ours):
    # loaded onto the device once: a NumPy leaf would be copied in on every jitted call
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(ours[0], nnx.Param)))
    model = ours[0]
    tensors = bert.to_state_dict(model)
    from_file = files.load_tensors(FOLDER / "model.safetensors")
    non_attention = bert.weight_table(model.config)
    assert len(non_attention) == 5 + 8 * 6
    assert set(tensors) == set(from_file) - {
        "embeddings.position_ids",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }
    for name, value in tensors.items():
        assert value.dtype == np.float32 and value.shape == from_file[name].shape, name
        np.testing.assert_array_equal(value, from_file[name], err_msg=name)
    again = bert.from_state_dict(tensors, model.config)
    before, after = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_is_read_from_config_json():
    config = bert.BertConfig.from_json(FOLDER / "config.json")
    assert config == bert.BertConfig()  # the defaults are MiniLM's
    assert (config.d_model, config.num_layers, config.num_heads, config.d_ff) == (384, 6, 12, 1536)
    assert config.layer_norm_eps == 1e-12 and not config.gelu_approximate


def _config_with(tmp_path, **changes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(json.loads((FOLDER / "config.json").read_text()), **changes)))
    return path


BAD_INPUTS = {
    "no_sentences": (
        lambda m, t, tmp: bert.tokenize(t, []),
        ValueError,
        r"sentences must be a non-empty list",
    ),
    "a_bare_string": (
        lambda m, t, tmp: bert.tokenize(t, "hello"),
        ValueError,
        r"sentences must be a non-empty",
    ),
    "ids_rank_1": (
        lambda m, t, tmp: bert.embed(m, np.array([101, 102]), np.array([2])),
        ValueError,
        r"ids must have rank 2 \[B, L\]; got shape \(2,\)",
    ),
    "float_ids": (
        lambda m, t, tmp: bert.embed(m, np.zeros((1, 2), np.float32), np.array([2])),
        TypeError,
        r"ids must have an integer dtype",
    ),
    "lengths_shape": (
        lambda m, t, tmp: bert.embed(m, np.zeros((2, 3), np.int32), np.array([3])),
        ValueError,
        r"lengths must have shape \[B\]=\(2,\); got shape \(1,\)",
    ),
    "too_long": (
        lambda m, t, tmp: bert.embed(m, np.zeros((1, 513), np.int32), np.array([513])),
        ValueError,
        r"ids must have at most max_positions=512 tokens; got 513",
    ),
    "relu_config": (
        lambda m, t, tmp: bert.BertConfig.from_json(_config_with(tmp, hidden_act="relu")),
        ValueError,
        r"hidden_act in .* must be one of",
    ),
    "missing_tensor": (
        lambda m, t, tmp: bert.from_state_dict({}, m.config),
        ValueError,
        r"tensors must contain 'embeddings.word_embeddings.weight'",
    ),
    "transposed_tensor": (
        lambda m, t, tmp: bert.from_state_dict(
            dict(bert.to_state_dict(m), **{"encoder.layer.0.output.dense.weight": np.zeros((1536, 384))}),
            m.config,
        ),
        ValueError,
        r"encoder.layer.0.output.dense.weight must have shape blocks.0.ff_out.kernel=\(384, 1536\); got",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_with_a_message(ours, tmp_path, case):
    call, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        call(*ours, tmp_path)


def test_embed_script_prints_the_similarity_matrix_and_json(capsys):
    assert embed_script.cli(SENTENCES[:4]) == 0
    printed = capsys.readouterr().out
    for i, sentence in enumerate(SENTENCES[:4]):
        assert f"[{i}] {sentence}" in printed
    rows = re.findall(r"^\[(\d)\]((?:\s+-?\d\.\d{4}){4})$", printed, re.MULTILINE)
    assert [int(i) for i, _ in rows] == [0, 1, 2, 3]
    matrix = np.array([[float(v) for v in values.split()] for _, values in rows])
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 1.0)

    assert embed_script.cli(["--json", *SENTENCES[:2]]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sentences"] == SENTENCES[:2]
    embeddings = np.array(result["embeddings"])
    assert embeddings.shape == (2, 384)
    np.testing.assert_allclose(embeddings @ embeddings[0], [1.0, matrix[0, 1]], atol=1e-4)


def test_embed_script_without_sentences_is_an_error_line():
    message = embed_script.cli([])
    assert message.startswith("error: ") and "\n" not in message
