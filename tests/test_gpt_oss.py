"""mha_jax.models.gpt_oss: a tiny random-weight gpt-oss built here in transformers 4.57.1
(`GptOssForCausalLM`: sinks, sliding and full layers, GQA, biases, YaRN past its original
context, a mixture of 4 experts, top 2) and loaded into ours equals it: the logits of a
right-padded batch, and greedy generation, ours cached (prefill + one step per token) and
uncached (the whole forward again per token), theirs one prompt at a time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mha_jax.models import gpt_oss

V, D, LAYERS, H, HKV, DH, F, E, K, WINDOW = 96, 32, 4, 4, 2, 8, 24, 4, 2, 3
PROMPTS = [[5, 17, 3, 88, 41, 9, 60, 2, 33], [71, 12, 45, 6]]  # 9 and 4 tokens: one ragged batch
NEW_TOKENS = 10  # positions up to 18, past the YaRN original context of 8


YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 8,
}


def hf_config():
    return transformers.GptOssConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H, num_key_value_heads=HKV,
        head_dim=DH, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2), rope_theta=500.0,
        rope_scaling=YARN,
        max_position_embeddings=32, attention_bias=True, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def models():
    config = hf_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # HF's init (std 0.02, zero biases) makes every logit ~0: widen it
        for name, p in theirs.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.5 if "sinks" in name or "bias" in name else 0.3)
    ours = gpt_oss.from_state_dict(theirs.state_dict(), gpt_oss.GptOssConfig.from_hf(config.to_dict()))
    return ours, theirs


def padded(prompts):
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    return ids, lengths


def test_config_reads_the_hf_config():
    config = gpt_oss.GptOssConfig.from_hf(hf_config().to_dict())
    assert (config.num_experts, config.experts_per_token, config.d_ff, config.sliding_window) == (
        E,
        K,
        F,
        WINDOW,
    )
    assert config.layer_types == ("sliding_attention", "full_attention") * 2
    assert config.rope_scaling == gpt_oss.YarnScaling(
        factor=4.0, original_max_position_embeddings=8, truncate=False
    )
    assert gpt_oss.GptOssConfig.from_hf(transformers.GptOssConfig().to_dict()) == gpt_oss.GptOssConfig()


def test_logits_equal_transformers_on_a_padded_batch(models):
    ours, theirs = models
    ids, lengths = padded(PROMPTS)
    with torch.no_grad():
        mask = torch.from_numpy((np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64))
        expected = theirs(torch.from_numpy(ids).long(), attention_mask=mask).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(lengths)))
    assert np.abs(expected).max() > 1.0  # the weights are wide enough for the logits to mean something
    for row, n in enumerate(lengths):  # the padded positions' logits are nobody's
        np.testing.assert_allclose(
            got[row, :n], expected[row, :n], rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )


def test_greedy_generation_equals_transformers_cached_and_uncached(models):
    ours, theirs = models
    expected = []
    for prompt in PROMPTS:  # theirs one prompt at a time: no padding for HF to get wrong
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  min_new_tokens=NEW_TOKENS)  # fmt: skip
        expected.append(out[0, len(prompt) :].numpy())
    expected = np.stack(expected)  # [B, NEW_TOKENS]

    ids, lengths = padded(PROMPTS)
    cached = np.stack(list(gpt_oss.generate(ours, ids, lengths, NEW_TOKENS)), axis=1)  # [B, NEW_TOKENS]
    np.testing.assert_array_equal(cached, expected)

    # uncached: each step runs the whole forward over a buffer of fixed width (one compile)
    width = lengths.max() + NEW_TOKENS
    buffer = np.zeros((len(PROMPTS), width), np.int32)
    buffer[:, : ids.shape[1]] = ids
    forward = jax.jit(lambda ids, lengths: ours(ids, lengths))
    current = lengths.copy()
    uncached = []
    for _ in range(NEW_TOKENS):
        logits = np.asarray(forward(jnp.asarray(buffer), jnp.asarray(current)))
        token = logits[np.arange(len(PROMPTS)), current - 1].argmax(-1)
        uncached.append(token)
        buffer[np.arange(len(PROMPTS)), current] = token
        current += 1
    np.testing.assert_array_equal(np.stack(uncached, axis=1), expected)
    assert len({tuple(row) for row in expected}) == 2 and len(set(expected[0])) > 2  # not one repeated token


def test_the_experts_equal_a_loop_over_tokens(models):
    """The grouped-matmul mixture against its definition written per token in NumPy."""
    ours, _ = models
    experts = ours.blocks[1].experts
    x = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
    names = ("gate_up", "gate_up_bias", "down", "down_bias")
    p = {name: np.asarray(getattr(experts, name)[...], np.float64) for name in names}
    router_w, router_b = (
        np.asarray(experts.router.kernel[...], np.float64),
        np.asarray(experts.router.bias[...]),
    )
    expected = np.zeros_like(x, np.float64)
    for b in range(2):
        for t in range(5):
            logits = x[b, t] @ router_w + router_b
            top = np.argsort(-logits)[:K]
            share = np.exp(logits[top] - logits[top].max())
            share /= share.sum()
            for e, s in zip(top, share, strict=True):
                gate_up = x[b, t] @ p["gate_up"][e] + p["gate_up_bias"][e]
                gate, up = np.minimum(gate_up[::2], 7.0), np.clip(gate_up[1::2], -7.0, 7.0)
                hidden = (up + 1) * gate / (1 + np.exp(-1.702 * gate))
                expected[b, t] += s * (hidden @ p["down"][e] + p["down_bias"][e])
    np.testing.assert_allclose(
        experts(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="llama"), r"model_type must be one of \['gpt_oss'\]"),
        (dict(tie_word_embeddings=True), r"tie_word_embeddings must be False"),
        (dict(layer_types=["sliding_attention"] * 3), r"layer_types must have one entry per layer \(4\)"),
        (dict(layer_types=["chunked_attention"] * 4), r"layer_types\[i\] must be one of"),
        (dict(num_experts_per_tok=5), r"experts_per_token must be in 1 ... num_experts=4"),
    ],
)
def test_bad_configs_raise_with_a_message(change, message):
    with pytest.raises(ValueError, match=message):
        gpt_oss.GptOssConfig.from_hf({**hf_config().to_dict(), **change})


def test_a_state_dict_missing_a_tensor_is_refused_by_name(models):
    _, theirs = models
    tensors = {k: v for k, v in theirs.state_dict().items() if k != "model.layers.2.mlp.experts.down_proj"}
    config = dataclasses.replace(gpt_oss.GptOssConfig.from_hf(hf_config().to_dict()))
    with pytest.raises(ValueError, match=r"'model.layers.2.mlp.experts.down_proj'"):
        gpt_oss.from_state_dict(tensors, config)
