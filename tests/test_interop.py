"""mha_jax.interop: every layout round-trips exactly and, loaded into `MHAParams`,
computes what the framework it came from computes (torch, HF transformers'
own attention modules, Flax); safetensors files; GGUF files against
`gguf.GGUFReader` and against transformers' GGUF loader on the real SmolLM2."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download; every oracle here is local

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import nnx
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention

import mha_jax as mj
from mha_jax.interop import checkpoint_path, export_params, files, flatten, import_params, unflatten
from mha_jax.interop import gguf as mgguf

B, Lq, Lk, D, Dkv, H, Dh = 2, 5, 7, 12, 10, 3, 4  # fused layouts: D = H*Dh
G_H, G_HKV, G_DH = 4, 2, 5  # GQA layouts: H*Dh = 20 != D, Hkv*Dh = 10


def randomized(module, seed=0):
    """Every parameter random (biases start at zero in torch and Flax)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=generator)
    return module.eval()


def rand(seed, shape):
    """NumPy normals: no JAX compilation per shape."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def assert_close_at_scale(ours, theirs):
    """Equal to float32 rounding at the outputs' scale: every weight is N(0, 1), so outputs
    reach ~40, and a fixed atol=1e-5 refused 1.9e-5 on an element of 0.83 on some CPUs."""
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())


def to_torch(x):
    return torch.from_numpy(np.array(x))


def causal_additive(length):
    """HF's eager attention adds a [B, 1, Lq, Lk] float mask."""
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    return torch.zeros(length, length).masked_fill(future, torch.finfo(torch.float32).min)[None, None]


def torch_mha(**kwargs):
    return randomized(torch.nn.MultiheadAttention(D, H, batch_first=True, **kwargs))


def gpt2_attention():
    config = transformers.GPT2Config(n_embd=D, n_head=H, n_positions=16, attn_pdrop=0.0, resid_pdrop=0.0)
    config._attn_implementation = "eager"
    return randomized(GPT2Attention(config, layer_idx=0))


def bert_layer(config=None):
    config = config or transformers.BertConfig(
        hidden_size=D, num_attention_heads=H, intermediate_size=8, attention_probs_dropout_prob=0.0
    )
    config._attn_implementation = "eager"
    return randomized(BertLayer(config))


def llama_attention(attention_bias=False, seed=0):
    config = transformers.LlamaConfig(
        hidden_size=D,
        num_attention_heads=G_H,
        num_key_value_heads=G_HKV,
        head_dim=G_DH,
        attention_bias=attention_bias,
    )
    config._attn_implementation = "eager"
    return randomized(LlamaAttention(config, layer_idx=0), seed)


def nnx_attention():
    module = nnx.MultiHeadAttention(
        num_heads=G_H,
        in_features=D,
        qkv_features=G_H * G_DH,
        num_kv_heads=G_HKV,
        in_kv_features=Dkv,
        out_features=9,
        decode=False,
        rngs=nnx.Rngs(0),
    )
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    pure = treedef.unflatten([rand(20 + i, a.shape) for i, a in enumerate(leaves)])
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
    return module, pure


def torch_state(module):
    return {name: value.numpy() for name, value in module.state_dict().items()}


# (layout, source state dict, import sizes): each source made by the framework itself.
SOURCES = {
    "torch_mha": lambda: ("torch_mha", torch_state(torch_mha()), dict(num_heads=H)),
    "torch_mha_kdim": lambda: ("torch_mha", torch_state(torch_mha(kdim=Dkv, vdim=Dkv)), dict(num_heads=H)),
    "torch_mha_no_bias": lambda: ("torch_mha", torch_state(torch_mha(bias=False)), dict(num_heads=H)),
    "gpt2": lambda: ("gpt2", torch_state(gpt2_attention()), dict(num_heads=H)),
    "bert": lambda: ("bert", torch_state(bert_layer()), dict(num_heads=H)),
    "llama": lambda: ("llama", torch_state(llama_attention()), dict(num_heads=G_H, num_kv_heads=G_HKV)),
    "llama_bias": lambda: (
        "llama",
        torch_state(llama_attention(attention_bias=True)),
        dict(num_heads=G_H, num_kv_heads=G_HKV),
    ),
    "flax": lambda: ("flax", nnx_attention()[1], dict(num_heads=G_H, num_kv_heads=G_HKV)),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_round_trip_is_exact(source):
    layout, state, sizes = SOURCES[source]()
    params = import_params(layout, state, **sizes)
    exported = export_params(layout, params, num_heads=sizes["num_heads"])
    flat = flatten(state)
    assert set(exported) <= set(flat)
    left_out = set(flat) - set(exported)  # only BERT's LayerNorm and feed-forward, which are not attention
    assert all(
        name.startswith(("attention.output.LayerNorm.", "intermediate.", "output.")) for name in left_out
    ), left_out
    for name, value in exported.items():
        assert value.dtype == flat[name].dtype
        np.testing.assert_array_equal(value, flat[name], err_msg=name)
    if source.endswith("no_bias") or source == "llama":
        assert params.b_q is None and params.b_o is None


def test_prefix_reads_one_layer_of_a_whole_model():
    layer0, layer1 = torch_state(llama_attention(seed=1)), torch_state(llama_attention(seed=2))
    prefix = "model.layers.{}.self_attn."
    model = {prefix.format(i) + k: v for i, s in enumerate((layer0, layer1)) for k, v in s.items()}
    model["model.embed_tokens.weight"] = np.zeros((3, D), np.float32)
    params = import_params("llama", model, num_heads=G_H, num_kv_heads=G_HKV, prefix=prefix.format(1))
    np.testing.assert_array_equal(params.w_k, layer1["k_proj.weight"].T)
    exported = export_params("llama", params, num_heads=G_H, prefix=prefix.format(1))
    assert set(exported) == {prefix.format(1) + k for k in layer1}


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_torch_multihead_attention_forward(is_causal):
    module = torch_mha()
    params = import_params("torch_mha", module.state_dict(), num_heads=H)
    x = rand(1, (B, Lq, D))
    future = torch.triu(torch.ones(Lq, Lq, dtype=torch.bool), 1) if is_causal else None  # True = hidden
    with torch.no_grad():
        theirs = module(to_torch(x), to_torch(x), to_torch(x), attn_mask=future, need_weights=False)[0]
    ours = mj.batched_attention(params, x, num_heads=H, is_causal=is_causal)
    assert_close_at_scale(ours, theirs.numpy())


def test_torch_multihead_attention_cross_kdim_forward():
    module = torch_mha(kdim=Dkv, vdim=Dkv)
    params = import_params("torch_mha", module.state_dict(), num_heads=H)
    x_q, x_kv = rand(2, (B, Lq, D)), rand(3, (B, Lk, Dkv))
    with torch.no_grad():
        theirs = module(to_torch(x_q), to_torch(x_kv), to_torch(x_kv), need_weights=False)[0]
    ours = mj.batched_attention(params, x_q, x_kv, num_heads=H)
    assert_close_at_scale(ours, theirs.numpy())


def test_hf_gpt2_attention_forward():
    module = gpt2_attention()
    params = import_params("gpt2", module.state_dict(), num_heads=H)
    x = rand(4, (B, Lq, D))
    with torch.no_grad():
        theirs = module(to_torch(x))[0]  # GPT-2's eager attention is causal by itself
    ours = mj.batched_attention(params, x, num_heads=H, is_causal=True)
    assert_close_at_scale(ours, theirs.numpy())


def test_hf_bert_self_attention_and_output_dense_forward():
    layer = bert_layer()
    params = import_params("bert", layer.state_dict(), num_heads=H)
    x = rand(5, (B, Lq, D))
    with torch.no_grad():
        context = layer.attention.self(to_torch(x))[0]
        theirs = layer.attention.output.dense(context)  # before BERT's dropout + LayerNorm(residual)
    ours = mj.batched_attention(params, x, num_heads=H)
    assert_close_at_scale(ours, theirs.numpy())


@pytest.mark.parametrize("attention_bias", [False, True], ids=["llama", "qwen2_bias"])
def test_hf_llama_gqa_attention_forward(attention_bias):
    module = llama_attention(attention_bias)
    params = import_params("llama", module.state_dict(), num_heads=G_H, num_kv_heads=G_HKV)
    x = rand(6, (B, Lq, D))
    no_rotation = (torch.ones(B, Lq, G_DH), torch.zeros(B, Lq, G_DH))  # cos, sin: RoPE left out
    with torch.no_grad():
        theirs = module(to_torch(x), no_rotation, causal_additive(Lq))[0]
    ours = mj.batched_attention(params, x, num_heads=G_H, is_causal=True)
    assert_close_at_scale(ours, theirs.numpy())


def test_flax_nnx_gqa_cross_attention_forward():
    module, pure = nnx_attention()
    params = import_params("flax", pure, num_heads=G_H, num_kv_heads=G_HKV)
    x_q, x_kv = rand(7, (B, Lq, D)), rand(8, (B, Lk, Dkv))
    theirs = module(x_q, x_kv)
    ours = mj.batched_attention(params, x_q, x_kv, num_heads=G_H)
    assert_close_at_scale(ours, theirs)


def test_flax_linen_forward_from_exported_params():
    params = mj.init_params(jax.random.PRNGKey(9), D, H, head_dim=Dh, d_kv=Dkv, d_out=9)
    params = params._replace(
        b_q=rand(10, (H * Dh,)), b_k=rand(11, (H * Dh,)), b_v=rand(12, (H * Dh,)), b_o=rand(13, (9,))
    )
    module = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * Dh, out_features=9)
    x_q, x_kv = rand(14, (B, Lq, D)), rand(15, (B, Lk, Dkv))
    theirs = module.apply({"params": unflatten(export_params("flax", params, num_heads=H))}, x_q, x_kv)
    ours = mj.batched_attention(params, x_q, x_kv, num_heads=H)
    assert_close_at_scale(ours, theirs)


def test_real_minilm_layer_matches_hf_bert_layer():
    path = checkpoint_path("all-minilm-l6-v2")
    tensors = files.load_tensors(path, prefix="encoder.layer.2.")
    params = import_params("bert", tensors, num_heads=12, prefix="encoder.layer.2.")
    assert params.w_q.shape == (384, 384)
    config = transformers.BertConfig.from_json_file(path.parent / "config.json")
    config._attn_implementation = "eager"
    layer = BertLayer(config).eval()
    layer_state = {k.removeprefix("encoder.layer.2."): torch.from_numpy(v) for k, v in tensors.items()}
    assert not layer.load_state_dict(layer_state, strict=False).unexpected_keys
    x = rand(16, (B, Lq, 384))
    with torch.no_grad():
        theirs = layer.attention.output.dense(layer.attention.self(to_torch(x))[0])
    np.testing.assert_allclose(
        mj.batched_attention(params, x, num_heads=12), theirs.numpy(), rtol=1e-5, atol=1e-5
    )
    exported = export_params("bert", params, num_heads=12, prefix="encoder.layer.2.")
    for name, value in exported.items():
        np.testing.assert_array_equal(value, tensors[name])


def test_safetensors_round_trip(tmp_path):
    _, state, sizes = SOURCES["llama_bias"]()
    params = import_params("llama", state, **sizes)
    path = tmp_path / "layer.safetensors"
    tensors = export_params("llama", params, num_heads=G_H, prefix="model.layers.0.self_attn.")
    files.save_tensors(path, tensors, metadata={"source": "test"})
    loaded = files.load_tensors(path)
    again = import_params("llama", loaded, **sizes, prefix="model.layers.0.self_attn.")
    for name in mj.params.PARAM_NAMES:
        np.testing.assert_array_equal(getattr(again, name), getattr(params, name), err_msg=name)
    assert set(files.load_tensors(path, prefix="model.layers.0.self_attn.o_")) == {
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.o_proj.bias",
    }
    with pytest.raises(KeyError, match="names must be tensors in .*; got missing \\['nope'\\]"):
        files.load_tensors(path, ["nope"])


def _llama_state():
    return torch_state(llama_attention())


def _with(state, **changes):
    return {**state, **{name.replace("__", "."): value for name, value in changes.items()}}


# Bad inputs: (call, exception, message regex).
BAD_IMPORTS = {
    "heads_do_not_divide": (
        lambda: import_params("torch_mha", torch_mha().state_dict(), num_heads=5),
        r"in_proj_weight.shape\[1\] \(H\*Dh\) must be divisible by num_heads=5; got 12",
    ),
    "wrong_kv_heads": (
        lambda: import_params("llama", _llama_state(), num_heads=G_H, num_kv_heads=1),
        r"k_proj.weight must have shape \[Hkv\*Dh, D_kv\]=\(5, 12\); got shape \(10, 12\)",
    ),
    "kv_heads_do_not_divide": (
        lambda: import_params("llama", _llama_state(), num_heads=G_H, num_kv_heads=3),
        r"num_heads must be divisible by num_kv_heads=3; got 4",
    ),
    "hidden_size_mismatch": (
        lambda: import_params(
            "bert",
            _with(torch_state(bert_layer()), attention__output__dense__weight=np.zeros((D, 11), np.float32)),
            num_heads=H,
        ),
        r"attention.output.dense.weight must have shape \[D_out, H\*Dh\]=\(12, 12\); got shape \(12, 11\)",
    ),
    "fused_width": (
        lambda: import_params(
            "gpt2",
            _with(torch_state(gpt2_attention()), c_attn__weight=np.zeros((D, 30), np.float32)),
            num_heads=H,
        ),
        r"c_attn.weight must have shape \[D, 3\*H\*Dh\]=\(12, 36\); got shape \(12, 30\)",
    ),
    "gqa_in_torch_mha": (
        lambda: import_params("torch_mha", torch_mha().state_dict(), num_heads=H, num_kv_heads=1),
        r"Hkv must equal H=3 in layout 'torch_mha'; got 1",
    ),
    "flax_head_count": (
        lambda: import_params("flax", nnx_attention()[1], num_heads=5, num_kv_heads=1),
        r"query.kernel must have shape \[D, H, Dh\]=\(12, 5, 5\); got shape \(12, 4, 5\)",
    ),
    "missing_weight_with_prefix": (
        lambda: import_params(
            "gpt2", {"h.0.attn.c_attn.bias": np.zeros(36)}, num_heads=H, prefix="h.0.attn."
        ),
        r"tensors must contain 'h.0.attn.c_attn.weight' \(layout 'gpt2'\); "
        r"got keys \['h.0.attn.c_attn.bias'\]",
    ),
    "rank": (
        lambda: import_params(
            "llama",
            _with(_llama_state(), q_proj__weight=np.zeros(20, np.float32)),
            num_heads=G_H,
            num_kv_heads=G_HKV,
        ),
        r"q_proj.weight must have rank 2 \[H\*Dh, D\]; got shape \(20,\)",
    ),
    "unknown_layout": (lambda: import_params("t5", {}, num_heads=H), r"layout must be one of \['torch_mha'"),
    "torch_bias_kv": (
        lambda: import_params("torch_mha", torch_mha(add_bias_kv=True).state_dict(), num_heads=H),
        r"tensors must hold only what MHAParams can .*; got 'bias_k'",
    ),
}


def _params(**kwargs):
    return mj.init_params(jax.random.PRNGKey(0), D, **kwargs)


BAD_EXPORTS = {
    "gqa_to_gpt2": (
        lambda: export_params("gpt2", _params(num_heads=4, num_kv_heads=2), num_heads=4),
        r"Hkv must equal H=4 in layout 'gpt2'; got 2",
    ),
    "d_kv_to_bert": (
        lambda: export_params("bert", _params(num_heads=H, d_kv=Dkv), num_heads=H),
        r"D_kv must equal D=12 in layout 'bert'; got 10",
    ),
    "wrong_num_heads": (
        lambda: export_params("llama", _params(num_heads=4), num_heads=5),
        r"params.w_q.shape\[1\] \(H\*Dh\) must be divisible by num_heads=5; got 12",
    ),
    "inconsistent_params": (
        lambda: export_params(
            "llama", _params(num_heads=H)._replace(w_v=np.zeros((D, 8), np.float32)), num_heads=H
        ),
        r"params.w_v must have shape \[D_kv, Hkv\*Dh\]=\(12, 12\); got shape \(12, 8\)",
    ),
    "half_fused_bias": (
        lambda: export_params("torch_mha", _params(num_heads=H)._replace(b_k=None), num_heads=H),
        r"params.b_k must be set like params.b_q \('torch_mha' keeps them in one "
        r"'in_proj_bias'\); got None",
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS) + list(BAD_EXPORTS))
def test_bad_input_raises_with_message(case):
    call, pattern = {**BAD_IMPORTS, **BAD_EXPORTS}[case]
    with pytest.raises(ValueError, match=pattern):
        call()


# GGUF


def test_gguf_parser_matches_gguf_reader(tmp_path):
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value, kind in [
        ("u8", 7, "UINT8"),
        ("i8", -7, "INT8"),
        ("u16", 700, "UINT16"),
        ("i16", -700, "INT16"),
        ("u32", 70000, "UINT32"),
        ("i32", -70000, "INT32"),
        ("f32", 0.1, "FLOAT32"),
        ("b", True, "BOOL"),
        ("s", "héllo", "STRING"),
        ("u64", 2**40, "UINT64"),
        ("i64", -(2**40), "INT64"),
        ("f64", 0.1, "FLOAT64"),
    ]:
        writer.add_key_value(f"test.{key}", value, gguf.GGUFValueType[kind])
    writer.add_array("test.strings", ["a", "", "Ġ t", "日本"])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, -1.25])
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(3, 8)).astype(np.float32),
        "f16": rng.normal(size=(2, 3, 4)).astype(np.float16),
    }
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        quantized = gguf.quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), qtype)
        writer.add_tensor(qtype.name, quantized, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader, ours = gguf.GGUFReader(path), mgguf.open_gguf(path)
    assert ours.metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in reader.tensors] == ["f32", "f16", "Q8_0", "Q4_1"]
    for t in reader.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        assert ours.tensors[t.name].shape == tuple(int(n) for n in reversed(t.shape)) == expected.shape
        np.testing.assert_array_equal(mgguf.read_tensor(ours, t.name), expected, err_msg=t.name)
    np.testing.assert_array_equal(mgguf.read_tensor(ours, "f16"), tensors["f16"].astype(np.float32))


def test_permute_interleaves_halves_and_unpermute_inverts():
    rows = np.arange(2 * 6)[:, None] * np.ones((1, 3))  # 2 heads of Dh=6, row value = row index
    permuted = mgguf.permute(rows, num_heads=2)
    np.testing.assert_array_equal(permuted[:, 0], [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])
    np.testing.assert_array_equal(mgguf.unpermute(permuted, num_heads=2), rows)
    pattern = r"weights.shape\[0\] \(heads\*Dh\) must be divisible by 2\*num_heads=10"
    with pytest.raises(ValueError, match=pattern):
        mgguf.unpermute(rows, num_heads=5)


def test_smollm2_metadata():
    config = mgguf.model_config(mgguf.open_gguf(checkpoint_path("smollm2-135m-instruct")).metadata)
    assert config == dict(
        config,
        architecture="llama",
        num_layers=30,
        d_model=576,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        vocab_size=49152,
        tokenizer="gpt2",
        sliding_window=None,
    )
    assert config["norm_eps"] == np.float32(1e-5)  # stored as float32


def test_smollm2_q_and_k_equal_transformers_gguf_loader(tmp_path):
    """Our dequantised, unpermuted Q and K equal what transformers loads from the same bytes.

    transformers' loader opens the whole file with `GGUFReader` and dequantises
    all 272 tensors (24-40 s on 2 busy cores), so it reads a copy holding the
    file's llama.* metadata and block 0's raw Q4_1 `attn_q`/`attn_k` bytes."""
    file = mgguf.open_gguf(checkpoint_path("smollm2-135m-instruct"))
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight"]
    subset = tmp_path / "smollm2-block0-qk.gguf"
    writer = gguf.GGUFWriter(str(subset), arch="llama")
    for key, value in file.metadata.items():
        if key.startswith("llama.") and not isinstance(value, list):
            kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
            writer.add_key_value(key, value, kind)
    for name in names:
        info = file.tensors[name]
        shape = gguf.quants.quant_shape_to_byte_shape(info.shape, info.qtype)
        raw = np.frombuffer(file.buffer, np.uint8, int(np.prod(shape)), info.offset).reshape(shape)
        writer.add_tensor(name, raw, raw_dtype=info.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config = load_gguf_checkpoint(subset, return_tensors=False)["config"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    with torch.device("meta"):
        sizes = {k: v for k, v in config.items() if k != "model_type"}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(sizes, num_hidden_layers=1)))
    theirs = load_gguf_checkpoint(subset, return_tensors=True, model_to_load=model)["tensors"]

    ours, metadata = mgguf.read_gguf(checkpoint_path("smollm2-135m-instruct"), names)
    ours = mgguf.hf_names(ours, "llama")
    assert (
        set(ours)
        == set(theirs)
        == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"}
    )
    for name, value in ours.items():
        assert value.shape == tuple(theirs[name].shape) and value.dtype == np.float32
        np.testing.assert_array_equal(value, theirs[name].numpy(), err_msg=name)
    raw_q = mgguf.read_tensor(file, "blk.0.attn_q.weight")
    assert not np.array_equal(raw_q, ours["model.layers.0.self_attn.q_proj.weight"]), "the file is permuted"
    params = import_params(
        "llama",
        ours
        | {
            "model.layers.0.self_attn.v_proj.weight": np.zeros((192, 576)),
            "model.layers.0.self_attn.o_proj.weight": np.zeros((576, 576)),
        },
        num_heads=9,
        num_kv_heads=3,
        prefix="model.layers.0.self_attn.",
    )
    assert (params.w_q.shape, params.w_k.shape) == ((576, 576), (576, 192))


def test_gemma3_attention_imports_with_gqa_and_wide_heads():
    path = checkpoint_path("gemma3-270m")
    names = [f"blk.0.attn_{n}.weight" for n in ("q", "k", "v", "output", "q_norm")]
    tensors, metadata = mgguf.read_gguf(path, names)
    config = mgguf.model_config(metadata)
    assert config == dict(
        config,
        architecture="gemma3",
        d_model=640,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        sliding_window=512,
        rope_theta=1e6,
        num_layers=18,
    )
    hf = mgguf.hf_names(tensors, "gemma3")
    params = import_params("llama", hf, num_heads=4, num_kv_heads=1, prefix="model.layers.0.self_attn.")
    assert (params.w_q.shape, params.w_k.shape, params.w_o.shape) == ((640, 1024), (640, 256), (1024, 640))
    out = mj.attention(params, rand(17, (Lq, 640)), num_heads=4, is_causal=True)
    assert out.shape == (Lq, 640) and bool(np.isfinite(out).all())
    # GGUF stores Gemma's RMSNorm scale as 1 + w; read_gguf gives HF's w.
    raw = mgguf.read_tensor(mgguf.open_gguf(path), "blk.0.attn_q_norm.weight")
    np.testing.assert_array_equal(hf["model.layers.0.self_attn.q_norm.weight"], raw - 1)
