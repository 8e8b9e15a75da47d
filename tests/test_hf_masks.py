"""The new mask rules against HF transformers 4.57.1's own mask code, on tiny random-weight
attention layers built here (nothing downloads):

- packed sequences: a Qwen2 layer (GQA, q/k/v biases) fed one row of documents with
  `position_ids` restarting at each, which transformers turns into a block-diagonal causal
  mask (`masking_utils.find_packed_sequence_indices`), RoPE at those positions;
- Llama 4's chunked attention: `masking_utils.create_chunked_causal_mask` with
  `attention_chunk_size`;
- PaliGemma's prefix-LM: `PaliGemmaModel._update_causal_mask` in training mode (prefix tokens,
  `token_type_ids == 0`, visible to every query; causal after; padding keys hidden).

Each mask is compared as a mask, then run through the same layer (transformers' eager
attention given transformers' mask, ours given the rule), output against output.

Padded query rows: transformers masks padding as *keys* only, so a padded query row still
attends (to the prefix and the causal keys); with `kv_length` ours does the same (a row is
zeroed only when it may see no key at all), so the rows agree there too.
"""

import types

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from transformers import masking_utils
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.paligemma.modeling_paligemma import PaliGemmaModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

import mha_jax as mj
from mha_jax.interop import import_params

D, H, HKV, DH = 24, 4, 2, 6


def randomized(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=generator)
    return module.eval()


def hidden(seed, length):
    return np.random.default_rng(seed).standard_normal((1, length, D), dtype=np.float32)


def visible(additive: torch.Tensor) -> np.ndarray:
    """transformers' additive float mask (or bool, True = attend) -> bool `[B, Lq, Lk]`."""
    mask = additive if additive.dtype == torch.bool else additive == 0
    return mask[:, 0].numpy()


def ours(structure, length, batch=1) -> np.ndarray:
    return np.stack(
        [np.asarray(structure.allows(jnp.arange(length), jnp.arange(length))) for _ in range(batch)]
    )


def layer_config(cls, **extra):
    config = cls(hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV, head_dim=DH, **extra)
    config._attn_implementation = "eager"
    return config


def test_qwen2_packed_documents_with_restarting_position_ids():
    """Three documents of 5, 1 and 7 tokens in one row of 13: transformers finds them from the
    position ids alone; we are given them as segment ids."""
    lengths = (5, 1, 7)
    config = layer_config(transformers.Qwen2Config, rope_theta=1000.0)
    position_ids = torch.tensor([np.concatenate([np.arange(n) for n in lengths])])  # [1, 13]
    x = hidden(0, 13)
    theirs_mask = masking_utils.create_causal_mask(
        config=config, input_embeds=torch.from_numpy(x), attention_mask=None,
        cache_position=torch.arange(13), past_key_values=None, position_ids=position_ids,
    )  # fmt: skip
    segment_ids = jnp.asarray(np.concatenate([np.full(n, i) for i, n in enumerate(lengths)]))[None]
    structure = mj.Structure(is_causal=True, segment_ids=segment_ids)
    np.testing.assert_array_equal(
        visible(theirs_mask), ours(mj.Structure(is_causal=True, segment_ids=segment_ids[0]), 13)
    )

    layer = randomized(Qwen2Attention(config, layer_idx=0))
    with torch.no_grad():
        cos_sin = Qwen2RotaryEmbedding(config)(torch.from_numpy(x), position_ids)
        theirs = layer(torch.from_numpy(x), cos_sin, theirs_mask)[0].numpy()
    params = import_params("llama", layer.state_dict(), num_heads=H, num_kv_heads=HKV)
    got = mj.batched_attention(params, x, num_heads=H, structure=structure, rope=mj.RoPE(theta=1000.0),
                               positions=jnp.asarray(position_ids.numpy()))  # fmt: skip
    np.testing.assert_allclose(got, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())


def test_llama4_chunked_attention():
    """`attention_chunk_size=4` over 11 tokens, causal inside each chunk of 4 positions."""
    config = layer_config(transformers.Llama4TextConfig, attention_chunk_size=4)
    x = hidden(1, 11)
    theirs_mask = masking_utils.create_chunked_causal_mask(
        config=config, input_embeds=torch.from_numpy(x), attention_mask=None,
        cache_position=torch.arange(11), past_key_values=None, position_ids=None,
    )  # fmt: skip
    structure = mj.Structure(is_causal=True, chunk=4)
    np.testing.assert_array_equal(visible(theirs_mask), ours(structure, 11))

    llama = layer_config(transformers.LlamaConfig)
    layer = randomized(LlamaAttention(llama, layer_idx=0), seed=1)
    positions = torch.arange(11)[None]
    with torch.no_grad():
        cos_sin = LlamaRotaryEmbedding(llama)(torch.from_numpy(x), positions)
        theirs = layer(torch.from_numpy(x), cos_sin, theirs_mask)[0].numpy()
    params = import_params("llama", layer.state_dict(), num_heads=H, num_kv_heads=HKV)
    got = mj.batched_attention(params, x, num_heads=H, structure=structure,
                               rope=mj.RoPE(theta=llama.rope_theta))  # fmt: skip
    np.testing.assert_allclose(got, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())


def test_paligemma_prefix_lm_with_padding():
    """Two rows: 4 prefix tokens (image and prompt, token_type 0) then 5 suffix tokens, the
    second row padded by its last 3 tokens (attention_mask 0)."""
    length, prefix = 9, 4
    token_type_ids = torch.tensor([[0] * prefix + [1] * 5] * 2)
    attention_mask = torch.tensor([[1] * length, [1] * 6 + [0] * 3])
    fake = types.SimpleNamespace(  # what the method reads of the model
        config=types.SimpleNamespace(text_config=types.SimpleNamespace(_attn_implementation="eager")),
        text_config_dtype=torch.float32,
    )
    theirs_mask = PaliGemmaModel._update_causal_mask(
        fake, attention_mask, token_type_ids, None, torch.arange(length), torch.zeros(2, length, D), True
    )
    kv_length = jnp.array([length, 6])
    structure = mj.Structure(is_causal=True, prefix=jnp.array([prefix, prefix]), kv_length=kv_length)
    expected = np.stack([ours(mj.Structure(is_causal=True, prefix=prefix, kv_length=int(n)), length)[0]
                         for n in kv_length])  # fmt: skip
    np.testing.assert_array_equal(visible(theirs_mask), expected)

    llama = layer_config(transformers.LlamaConfig)
    layer = randomized(LlamaAttention(llama, layer_idx=0), seed=2)
    x = np.concatenate([hidden(2, length), hidden(3, length)])
    with torch.no_grad():
        cos_sin = LlamaRotaryEmbedding(llama)(torch.from_numpy(x), torch.arange(length)[None].expand(2, -1))
        theirs = layer(torch.from_numpy(x), cos_sin, theirs_mask)[0].numpy()
    params = import_params("llama", layer.state_dict(), num_heads=H, num_kv_heads=HKV)
    got = mj.batched_attention(
        params, x, num_heads=H, structure=structure, rope=mj.RoPE(theta=llama.rope_theta)
    )
    np.testing.assert_allclose(got, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())  # padded rows too
