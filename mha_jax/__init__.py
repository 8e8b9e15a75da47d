"""mha_jax: multi-head attention as readable pure JAX functions, with Flax modules.

Shape legend, used in every signature, comment and message:

    B    batch (added by jax.vmap; the per-example core never sees it)
    L    sequence length; Lq / Lk when query and key/value lengths differ
    D    model width (d_model); D_kv the key/value input width; D_out the output width
    H    query heads        Hkv  key/value heads        G = H // Hkv
    Dh   width of one head
    einsum letters: q=Lq k=Lk h=H (or Hkv) g=G d=Dh

`jax.nn.dot_product_attention` calls our H "N" and our Dh "H".

Conventions: boolean masks, True = may attend; causal masks aligned top-left
(query i sees keys j <= i + q_offset); scale 1/sqrt(Dh); scores and softmax in
float32; a query row with no visible key returns zeros.
"""

from mha_jax import decoding, kernels, masks, parallel
from mha_jax.core import attention, batched_attention
from mha_jax.kernels.blockwise import blockwise_attention
from mha_jax.masks import Structure
from mha_jax.options import IMPLEMENTATIONS, Options
from mha_jax.params import MHAParams, init_params, param_shapes, resolve_sizes
from mha_jax.rope import RoPE
from mha_jax.stages import (
    apply_weights,
    attention_scores,
    attention_weights,
    dropout_weights,
    merge_heads,
    merge_project,
    project,
    project_heads,
    split_heads,
)

__all__ = [
    "IMPLEMENTATIONS",
    "MHAParams",
    "Options",
    "RoPE",
    "Structure",
    "apply_weights",
    "attention",
    "attention_scores",
    "attention_weights",
    "batched_attention",
    "blockwise_attention",
    "decoding",
    "dropout_weights",
    "init_params",
    "kernels",
    "masks",
    "parallel",
    "merge_heads",
    "merge_project",
    "param_shapes",
    "project",
    "project_heads",
    "resolve_sizes",
    "split_heads",
]
