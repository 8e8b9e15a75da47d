"""Toy tasks that only attention can solve, each with its data, model and metrics.

recall   N (key, value) pairs and Q query keys; answer each query with its value.
         Cross-attention: queries are the query keys, keys/values are the pairs.
         Wq learns "what am I looking for", Wk "what can be found here",
         Wv "what is handed over": the chapter's three roles, exactly.
teacher  a random attention layer makes targets; the student fits Wq, Wk, Wv, Wo.
reverse  output the input sequence backwards; the attention map learns the
         anti-diagonal from positional embeddings alone.

Data come from `jax.random` keyed by (seed, step): nothing is downloaded, and
a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mha_jax
import mha_jax.nnx
import mha_jax.parallel

Batch = dict[str, jax.Array]


def attention_layer(cfg, rngs: nnx.Rngs, flax_reference: bool = False) -> nnx.Module:
    """Our NNX layer (on a device mesh when the config splits sequences or heads), or
    (for `bench.py --train-step`) Flax's own, behind one interface."""
    if flax_reference:
        return FlaxAttention(cfg.d_model, cfg.num_heads, rngs=rngs)
    if cfg.mesh_seq * cfg.mesh_heads > 1:
        return MeshAttention(cfg, rngs=rngs)
    return mha_jax.nnx.MultiHeadAttention(
        cfg.d_model, cfg.num_heads, implementation=cfg.implementation, rngs=rngs
    )


def toy_mesh(cfg) -> jax.sharding.Mesh:
    """The config's device mesh, axes ("data", "seq", "heads"); mesh_data=0 takes the
    devices the other two leave (toy_config.check_mesh checks the sizes)."""
    data = cfg.mesh_data or jax.device_count() // (cfg.mesh_seq * cfg.mesh_heads)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh((data, cfg.mesh_seq, cfg.mesh_heads), ("data", "seq", "heads"), axis_types=auto)


class MeshAttention(mha_jax.nnx.MultiHeadAttention):
    """Our NNX layer, called through `mha_jax.parallel.mesh_attention` on the config's mesh:
    batch over "data", sequence over "seq" (by `cfg.context_parallel`), heads over
    "heads". The parameters are the plain layer's (same names and shapes), so a
    checkpoint moves between mesh shapes; the attention weights for the heatmaps come
    from the plain layer's call."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg.d_model, cfg.num_heads, implementation=cfg.implementation, rngs=rngs)
        self.mesh, self.context = toy_mesh(cfg), cfg.context_parallel  # static

    def __call__(self, x_q, x_kv=None, *, return_weights=False, **_):
        if return_weights:
            return super().__call__(x_q, x_kv, return_weights=True)
        axes = dict(data_axis="data", seq_axis="seq", heads_axis="heads")
        return mha_jax.parallel.mesh_attention(
            self.params, x_q, x_kv, num_heads=self.num_heads, mesh=self.mesh, context=self.context, **axes
        )


class FlaxAttention(nnx.Module):
    """`flax.nnx.MultiHeadAttention` called like ours (for throughput comparisons)."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.inner = nnx.MultiHeadAttention(num_heads, d_model, decode=False, rngs=rngs)

    def __call__(self, x_q, x_kv=None, *, return_weights=False, **_):
        x_kv = x_q if x_kv is None else x_kv
        return self.inner(x_q, x_kv, x_kv)


# ---------------------------------------------------------------------------
# recall


class RecallModel(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs, flax_reference: bool = False):
        self.key_embed = nnx.Embed(cfg.num_keys, cfg.d_model, rngs=rngs)
        self.value_embed = nnx.Embed(cfg.num_values, cfg.d_model, rngs=rngs)
        self.attention = attention_layer(cfg, rngs, flax_reference)
        self.readout = nnx.Linear(cfg.d_model, cfg.num_values, rngs=rngs)

    def __call__(self, batch: Batch, return_weights: bool = False):
        x_kv = self.key_embed(batch["keys"]) + self.value_embed(batch["values"])  # [B, N, D]
        x_q = self.key_embed(batch["queries"])  # [B, Q, D]
        out = self.attention(x_q, x_kv, return_weights=return_weights)
        out, weights = out if return_weights else (out, None)
        return self.readout(out), weights  # logits [B, Q, num_values]


def recall_batch(cfg, rng, batch_size: int) -> Batch:
    rng_keys, rng_values, rng_pick = jax.random.split(rng, 3)
    # distinct keys per sequence: the first N of a random permutation of the key vocabulary
    keys = jax.vmap(lambda r: jax.random.permutation(r, cfg.num_keys)[: cfg.num_pairs])(
        jax.random.split(rng_keys, batch_size)
    )
    values = jax.random.randint(rng_values, (batch_size, cfg.num_pairs), 0, cfg.num_values)
    picks = jax.vmap(lambda r: jax.random.permutation(r, cfg.num_pairs)[: cfg.num_queries])(
        jax.random.split(rng_pick, batch_size)
    )
    take = jax.vmap(lambda row, idx: row[idx])
    return dict(keys=keys, values=values, queries=take(keys, picks), targets=take(values, picks))


def recall_labels(cfg, batch: Batch, b: int):
    rows = [f"k{int(k)}?" for k in batch["queries"][b]]
    cols = [f"k{int(k)}→v{int(v)}" for k, v in zip(batch["keys"][b], batch["values"][b], strict=True)]
    return rows, cols


# ---------------------------------------------------------------------------
# reverse


class ReverseModel(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs, flax_reference: bool = False):
        self.token_embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.position_embed = nnx.Embed(cfg.seq_len, cfg.d_model, rngs=rngs)
        self.attention = attention_layer(cfg, rngs, flax_reference)
        self.readout = nnx.Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)

    def __call__(self, batch: Batch, return_weights: bool = False):
        positions = jnp.arange(batch["tokens"].shape[1])
        x = self.token_embed(batch["tokens"]) + self.position_embed(positions)  # [B, L, D]
        out = self.attention(x, return_weights=return_weights)
        out, weights = out if return_weights else (out, None)
        return self.readout(out), weights  # logits [B, L, vocab]


def reverse_batch(cfg, rng, batch_size: int) -> Batch:
    tokens = jax.random.randint(rng, (batch_size, cfg.seq_len), 0, cfg.vocab_size)
    return dict(tokens=tokens, targets=tokens[:, ::-1])


def reverse_labels(cfg, batch: Batch, b: int):
    labels = [f"{i}:{int(t)}" for i, t in enumerate(batch["tokens"][b])]
    return labels, labels


# ---------------------------------------------------------------------------
# teacher


class TeacherModel(nnx.Module):
    """Only the attention layer: its Wq, Wk, Wv, Wo are what is learned."""

    def __init__(self, cfg, rngs: nnx.Rngs, flax_reference: bool = False):
        self.attention = attention_layer(cfg, rngs, flax_reference)

    def __call__(self, batch: Batch, return_weights: bool = False):
        out = self.attention(batch["x"], return_weights=return_weights)
        return out if return_weights else (out, None)


def teacher_params(cfg) -> mha_jax.MHAParams:
    return mha_jax.init_params(jax.random.PRNGKey(cfg.seed + 10_000), cfg.d_model, cfg.num_heads)


def teacher_batch(cfg, rng, batch_size: int) -> Batch:
    x = jax.random.normal(rng, (batch_size, cfg.seq_len, cfg.d_model))
    targets = mha_jax.batched_attention(teacher_params(cfg), x, num_heads=cfg.num_heads)
    return dict(x=x, targets=targets)


def teacher_labels(cfg, batch: Batch, b: int):
    labels = [str(i) for i in range(cfg.seq_len)]
    return labels, labels


# ---------------------------------------------------------------------------
# Losses and metrics (classification for recall/reverse, regression for teacher)


def loss_and_metrics(task: str, outputs, batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    if task == "teacher":
        error = outputs - batch["targets"]
        loss = jnp.mean(error**2)
        relative = jnp.linalg.norm(error) / jnp.linalg.norm(batch["targets"])
        return loss, dict(loss=loss, relative_error=relative)
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["targets"]).mean()
    accuracy = jnp.mean(outputs.argmax(-1) == batch["targets"])
    return loss, dict(loss=loss, accuracy=accuracy)


TASKS = {
    "recall": (RecallModel, recall_batch, recall_labels),
    "reverse": (ReverseModel, reverse_batch, reverse_labels),
    "teacher": (TeacherModel, teacher_batch, teacher_labels),
}
