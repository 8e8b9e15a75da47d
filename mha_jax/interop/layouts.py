"""One attention layer's weights in other frameworks' layouts, to and from `MHAParams`.

Each layout is a table: the source's tensor name, its shape in the legend's
letters, the `MHAParams` fields it holds, and the transform between the two.

    layout      names (after `prefix`)                  prefix in a whole model's state dict
    torch_mha   in_proj_weight, in_proj_bias,           (the module's own state dict)
                out_proj.weight, out_proj.bias
                (q/k/v_proj_weight when kdim or vdim != embed_dim: D_kv != D)
    gpt2        c_attn.weight, c_attn.bias,             GPT2Model: "h.{i}.attn."
                c_proj.weight, c_proj.bias
    bert        attention.self.{query,key,value}.*,     BertModel: "encoder.layer.{i}."
                attention.output.dense.*
    llama       {q,k,v,o}_proj.weight (+ .bias)         LlamaForCausalLM, Gemma3ForCausalLM:
                                                        "model.layers.{i}.self_attn."
    flax        {query,key,value,out}.{kernel,bias}     linen `variables["params"]` of the module;
                                                        nnx `nnx.state(m, nnx.Param).to_pure_dict()`

Conventions that the transforms bridge: torch `nn.Linear` and HF's Linear store
`[out, in]` (we store `[in, out]`); GPT-2's `Conv1D` is already `[in, out]` with
q, k, v side by side in one matrix; torch's `in_proj_weight` stacks them in
rows; Flax keeps the heads as an axis, `[D, H, Dh]`. Head `h` owns features
`h*Dh:(h+1)*Dh` in every one of them, so no layout permutes features. (GGUF
files do: see `mha_jax.interop.gguf`.)

Arrays stay NumPy arrays in their own dtype, so a round trip is exact;
`jax.device_put(params)` moves them. Torch tensors are read with `np.asarray`
(CPU, float32 or float16: call `.float()` on bfloat16 first). Attention sinks
are the llama layout's `sinks` tensor (`[H]`, where gpt-oss keeps them); export
to a layout without one refuses them. Not mapped: QK-norm scales (`q_norm`/`k_norm`:
each model keeps them under its own names, and Gemma stores `w` for a scale of `1 + w`;
export leaves them out), torch's `bias_k`/`bias_v` (`add_bias_kv`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from mha_jax import _checks
from mha_jax.params import PARAM_NAMES, MHAParams, param_shapes

Tensors = Mapping[str, Any]  # name -> array (NumPy, JAX, a CPU torch tensor) or a nested mapping


class Transform(NamedTuple):
    """`to_ours(source, our_shapes) -> our arrays`; `to_source(our arrays, source_shape) -> source`."""

    to_ours: Callable[[np.ndarray, list[tuple[int, ...]]], list[np.ndarray]]
    to_source: Callable[[list[np.ndarray], tuple[int, ...]], np.ndarray]


# The same numbers in another shape (a bias, a Conv1D weight, a Flax [D, H, Dh] kernel).
RESHAPE = Transform(lambda a, shapes: [a.reshape(shapes[0])], lambda ws, shape: ws[0].reshape(shape))
# nn.Linear's [out, in] against our [in, out].
TRANSPOSE = Transform(lambda a, shapes: [a.T], lambda ws, shape: ws[0].T)
# q, k, v side by side on the last axis (GPT-2's c_attn, torch's in_proj_bias).
SPLIT = Transform(lambda a, shapes: np.split(a, 3, axis=-1), lambda ws, shape: np.concatenate(ws, -1))
# q, k, v stacked in rows of an [out, in] matrix (torch's in_proj_weight).
SPLIT_ROWS_T = Transform(
    lambda a, shapes: [w.T for w in np.split(a, 3, axis=0)],
    lambda ws, shape: np.concatenate([w.T for w in ws], axis=0),
)


class Row(NamedTuple):
    source: str  # the source's name, after the prefix
    shape: tuple[str, ...]  # its shape in the legend's letters
    ours: tuple[str, ...]  # the MHAParams fields it holds
    transform: Transform


class Layout(NamedTuple):
    rows: tuple[Row, ...]
    reads: dict[str, tuple[str, int]]  # size -> (source name, axis) that gives it
    requires: tuple[tuple[str, str], ...] = ()  # sizes the source cannot tell apart
    unsupported: tuple[str, ...] = ()  # names we refuse rather than drop silently


# One width for everything and no GQA: what a layout with fused q, k, v can hold.
ONE_WIDTH = (("D_kv", "D"), ("H*Dh", "D"), ("D_out", "D"), ("Hkv", "H"))

TORCH_MHA = Layout(
    rows=(
        Row("in_proj_weight", ("3*H*Dh", "D"), ("w_q", "w_k", "w_v"), SPLIT_ROWS_T),
        Row("in_proj_bias", ("3*H*Dh",), ("b_q", "b_k", "b_v"), SPLIT),
        Row("out_proj.weight", ("D_out", "H*Dh"), ("w_o",), TRANSPOSE),
        Row("out_proj.bias", ("D_out",), ("b_o",), RESHAPE),
    ),
    reads={
        "d_model": ("in_proj_weight", 1),
        "q_features": ("in_proj_weight", 1),
        "d_kv": ("in_proj_weight", 1),
        "d_out": ("out_proj.weight", 0),
    },
    requires=ONE_WIDTH,
    unsupported=("bias_k", "bias_v"),
)

# nn.MultiheadAttention(kdim=..., vdim=...) keeps three matrices; we need kdim == vdim.
TORCH_MHA_KDIM = Layout(
    rows=(
        Row("q_proj_weight", ("H*Dh", "D"), ("w_q",), TRANSPOSE),
        Row("k_proj_weight", ("H*Dh", "D_kv"), ("w_k",), TRANSPOSE),
        Row("v_proj_weight", ("H*Dh", "D_kv"), ("w_v",), TRANSPOSE),
        Row("in_proj_bias", ("3*H*Dh",), ("b_q", "b_k", "b_v"), SPLIT),
        Row("out_proj.weight", ("D_out", "H*Dh"), ("w_o",), TRANSPOSE),
        Row("out_proj.bias", ("D_out",), ("b_o",), RESHAPE),
    ),
    reads={
        "d_model": ("q_proj_weight", 1),
        "q_features": ("q_proj_weight", 0),
        "d_kv": ("k_proj_weight", 1),
        "d_out": ("out_proj.weight", 0),
    },
    requires=(("H*Dh", "D"), ("D_out", "D"), ("Hkv", "H")),
    unsupported=("bias_k", "bias_v"),
)

GPT2 = Layout(
    rows=(
        Row("c_attn.weight", ("D", "3*H*Dh"), ("w_q", "w_k", "w_v"), SPLIT),
        Row("c_attn.bias", ("3*H*Dh",), ("b_q", "b_k", "b_v"), SPLIT),
        Row("c_proj.weight", ("H*Dh", "D_out"), ("w_o",), RESHAPE),
        Row("c_proj.bias", ("D_out",), ("b_o",), RESHAPE),
    ),
    reads={
        "d_model": ("c_attn.weight", 0),
        "q_features": ("c_proj.weight", 0),
        "d_kv": ("c_attn.weight", 0),
        "d_out": ("c_proj.weight", 1),
    },
    requires=ONE_WIDTH,
)

BERT = Layout(
    rows=(
        Row("attention.self.query.weight", ("H*Dh", "D"), ("w_q",), TRANSPOSE),
        Row("attention.self.query.bias", ("H*Dh",), ("b_q",), RESHAPE),
        Row("attention.self.key.weight", ("Hkv*Dh", "D_kv"), ("w_k",), TRANSPOSE),
        Row("attention.self.key.bias", ("Hkv*Dh",), ("b_k",), RESHAPE),
        Row("attention.self.value.weight", ("Hkv*Dh", "D_kv"), ("w_v",), TRANSPOSE),
        Row("attention.self.value.bias", ("Hkv*Dh",), ("b_v",), RESHAPE),
        Row("attention.output.dense.weight", ("D_out", "H*Dh"), ("w_o",), TRANSPOSE),
        Row("attention.output.dense.bias", ("D_out",), ("b_o",), RESHAPE),
    ),
    reads={
        "d_model": ("attention.self.query.weight", 1),
        "q_features": ("attention.self.query.weight", 0),
        "d_kv": ("attention.self.key.weight", 1),
        "d_out": ("attention.output.dense.weight", 0),
    },
    requires=ONE_WIDTH,
)

LLAMA = Layout(
    rows=(
        Row("q_proj.weight", ("H*Dh", "D"), ("w_q",), TRANSPOSE),
        Row("q_proj.bias", ("H*Dh",), ("b_q",), RESHAPE),  # Qwen2-style biases, when present
        Row("k_proj.weight", ("Hkv*Dh", "D_kv"), ("w_k",), TRANSPOSE),
        Row("k_proj.bias", ("Hkv*Dh",), ("b_k",), RESHAPE),
        Row("v_proj.weight", ("Hkv*Dh", "D_kv"), ("w_v",), TRANSPOSE),
        Row("v_proj.bias", ("Hkv*Dh",), ("b_v",), RESHAPE),
        Row("o_proj.weight", ("D_out", "H*Dh"), ("w_o",), TRANSPOSE),
        Row("o_proj.bias", ("D_out",), ("b_o",), RESHAPE),
        Row("sinks", ("H",), ("sinks",), RESHAPE),  # gpt-oss's attention sinks, when present
    ),
    reads={
        "d_model": ("q_proj.weight", 1),
        "q_features": ("q_proj.weight", 0),
        "d_kv": ("k_proj.weight", 1),
        "d_out": ("o_proj.weight", 0),
    },
    requires=(("D_kv", "D"), ("D_out", "D")),  # H*Dh may differ from D (Gemma 3: 4*256 vs 640)
)

FLAX = Layout(
    rows=(
        Row("query.kernel", ("D", "H", "Dh"), ("w_q",), RESHAPE),
        Row("query.bias", ("H", "Dh"), ("b_q",), RESHAPE),
        Row("key.kernel", ("D_kv", "Hkv", "Dh"), ("w_k",), RESHAPE),
        Row("key.bias", ("Hkv", "Dh"), ("b_k",), RESHAPE),
        Row("value.kernel", ("D_kv", "Hkv", "Dh"), ("w_v",), RESHAPE),
        Row("value.bias", ("Hkv", "Dh"), ("b_v",), RESHAPE),
        Row("out.kernel", ("H", "Dh", "D_out"), ("w_o",), RESHAPE),
        Row("out.bias", ("D_out",), ("b_o",), RESHAPE),
    ),
    reads={
        "d_model": ("query.kernel", 0),
        "head_dim": ("query.kernel", 2),
        "d_kv": ("key.kernel", 0),
        "d_out": ("out.kernel", 2),
    },
)

LAYOUTS = {"torch_mha": TORCH_MHA, "gpt2": GPT2, "bert": BERT, "llama": LLAMA, "flax": FLAX}

OUR_LEGEND = dict(
    w_q="[D, H*Dh]",
    b_q="[H*Dh]",
    w_k="[D_kv, Hkv*Dh]",
    b_k="[Hkv*Dh]",
    w_v="[D_kv, Hkv*Dh]",
    b_v="[Hkv*Dh]",
    w_o="[H*Dh, D_out]",
    b_o="[D_out]",
    q_norm="[Dh]",
    k_norm="[Dh]",
    sinks="[H]",
)

# Rows a layer may lack: biases (use_bias=False) and attention sinks (most models).
_optional = lambda name: name.startswith("b_") or name == "sinks"


def import_params(
    layout: str, tensors: Tensors, *, num_heads: int, num_kv_heads: int | None = None, prefix: str = ""
) -> MHAParams:
    """`MHAParams` from one layer's tensors in `layout` (a name in `LAYOUTS`).

    `tensors` may hold a whole model: only `prefix + name` for the table's
    names is read. Nested mappings (Flax params) are flattened with ".".
    A missing bias gives `None`; a missing weight, a shape that disagrees
    with the others or with the head counts raises `ValueError`.
    """
    _checks.check_choice("layout", layout, list(LAYOUTS))
    tensors = flatten(tensors)
    table = _torch_table(layout, kdim=prefix + "in_proj_weight" not in tensors)
    for name in table.unsupported:
        if prefix + name in tensors:
            raise _checks.fail(
                "tensors", "hold only what MHAParams can (torch's add_bias_kv cannot)", f"{prefix + name!r}"
            )
    arrays = {
        row.source: np.asarray(tensors[prefix + row.source])
        for row in table.rows
        if prefix + row.source in tensors
    }
    for row in table.rows:
        if row.source in arrays:
            _checks.check_rank(prefix + row.source, arrays[row.source], len(row.shape), _legend(row))
        elif not _optional(row.ours[0]):
            shown = sorted(tensors)[:8]
            raise _checks.fail(
                "tensors",
                f"contain {prefix + row.source!r} (layout {layout!r})",
                f"keys {shown}{' ...' if len(tensors) > 8 else ''}",
            )
    sizes = _source_sizes(table, arrays, prefix, num_heads, num_kv_heads)
    _check_requires(table, sizes, layout)
    ours = {name: None for name in PARAM_NAMES}
    shapes = param_shapes(**sizes, sinks=prefix + "sinks" in tensors)
    for row in table.rows:
        if row.source in arrays:
            _checks.check_shape(
                prefix + row.source, arrays[row.source], _dims(row.shape, sizes), _legend(row)
            )
            values = row.transform.to_ours(arrays[row.source], [shapes[n] for n in row.ours])
            ours.update(zip(row.ours, values, strict=True))
    return MHAParams(**ours)


def export_params(
    layout: str, params: MHAParams, *, num_heads: int, prefix: str = ""
) -> dict[str, np.ndarray]:
    """A flat `{prefix + source name: NumPy array}` of `params` in `layout`;
    absent biases are left out. Raises `ValueError` when the layout cannot
    hold these sizes (GQA in GPT-2, D_kv != D in BERT, ...)."""
    _checks.check_choice("layout", layout, list(LAYOUTS))
    sizes = our_sizes(params, num_heads)
    table = _torch_table(layout, kdim=sizes["d_kv"] != sizes["d_model"])
    _check_requires(table, sizes, layout)
    if params.sinks is not None and not any(row.ours == ("sinks",) for row in table.rows):
        raise _checks.fail(
            "params.sinks", f"be None for layout {layout!r} (it has no place for attention sinks; "
            "'llama' has)", f"an array of shape {np.shape(params.sinks)}",
        )  # fmt: skip
    tensors = {}
    for row in table.rows:
        values = [getattr(params, name) for name in row.ours]
        if all(v is None for v in values):
            continue  # an absent bias
        for name, value in zip(row.ours, values, strict=True):
            if value is None:
                raise _checks.fail(
                    f"params.{name}",
                    f"be set like params.{row.ours[0]} ({layout!r} keeps them in one {row.source!r})",
                    None,
                )
        source = row.transform.to_source([np.asarray(v) for v in values], _dims(row.shape, sizes))
        tensors[prefix + row.source] = np.ascontiguousarray(source)
    return tensors


def our_sizes(params: MHAParams, num_heads: int) -> dict[str, int]:
    """d_model, num_heads, num_kv_heads, head_dim, d_kv, d_out of `params`, every shape checked."""
    _checks.check_positive("num_heads", num_heads)
    for name in ("w_q", "w_k", "w_o"):
        _checks.check_rank(f"params.{name}", getattr(params, name), 2, OUR_LEGEND[name])
    (d_model, q_features), (d_kv, kv_features) = np.shape(params.w_q), np.shape(params.w_k)
    _checks.check_divides("params.w_q.shape[1] (H*Dh)", q_features, "num_heads", num_heads)
    head_dim = q_features // num_heads
    _checks.check_divides("params.w_k.shape[1] (Hkv*Dh)", kv_features, "Dh", head_dim)
    num_kv_heads = kv_features // head_dim
    _checks.check_divides("num_heads", num_heads, "num_kv_heads", num_kv_heads)
    sizes = dict(
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        d_kv=d_kv,
        d_out=np.shape(params.w_o)[1],
    )
    has = dict(qk_norm=params.q_norm is not None, sinks=params.sinks is not None)
    for name, shape in param_shapes(**sizes, **has).items():
        if getattr(params, name) is not None:
            _checks.check_shape(f"params.{name}", getattr(params, name), shape, OUR_LEGEND[name])
    return sizes


def flatten(tensors: Tensors, prefix: str = "") -> dict[str, Any]:
    """`{"query": {"kernel": a}}` -> `{"query.kernel": a}`; flat mappings pass through."""
    flat = {}
    for name, value in tensors.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def unflatten(tensors: Tensors) -> dict[str, Any]:
    """`{"query.kernel": a}` -> `{"query": {"kernel": a}}`: Flax's nesting."""
    nested: dict[str, Any] = {}
    for name, value in tensors.items():
        *parents, leaf = name.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _torch_table(layout: str, *, kdim: bool) -> Layout:
    """`nn.MultiheadAttention` keeps fused q, k, v weights unless kdim/vdim differ from embed_dim."""
    return TORCH_MHA_KDIM if layout == "torch_mha" and kdim else LAYOUTS[layout]


def _source_sizes(table, arrays, prefix, num_heads, num_kv_heads) -> dict[str, int]:
    _checks.check_positive("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _checks.check_positive("num_kv_heads", num_kv_heads)
    _checks.check_divides("num_heads", num_heads, "num_kv_heads", num_kv_heads)
    got = {size: arrays[source].shape[axis] for size, (source, axis) in table.reads.items()}
    if "q_features" in got:
        source, axis = table.reads["q_features"]
        _checks.check_divides(
            f"{prefix}{source}.shape[{axis}] (H*Dh)", got["q_features"], "num_heads", num_heads
        )
        got["head_dim"] = got.pop("q_features") // num_heads
    return dict(got, num_heads=num_heads, num_kv_heads=num_kv_heads)


def _dims(shape: tuple[str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(_symbols(sizes)[letter] for letter in shape)


def _symbols(sizes: dict[str, int]) -> dict[str, int]:
    heads, kv_heads, head_dim = sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"]
    return {
        "D": sizes["d_model"],
        "D_kv": sizes["d_kv"],
        "D_out": sizes["d_out"],
        "H": heads,
        "Hkv": kv_heads,
        "Dh": head_dim,
        "H*Dh": heads * head_dim,
        "Hkv*Dh": kv_heads * head_dim,
        "3*H*Dh": 3 * heads * head_dim,
    }


def _check_requires(table: Layout, sizes: dict[str, int], layout: str) -> None:
    symbols = _symbols(sizes)
    for size, other in table.requires:
        if symbols[size] != symbols[other]:
            raise _checks.fail(size, f"equal {other}={symbols[other]} in layout {layout!r}", symbols[size])


def _legend(row: Row) -> str:
    return f"[{', '.join(row.shape)}]"
