"""The GPU and TPU paths, lowered from this CPU for ("cuda",) and ("tpu",) (tests/lowering.py):
which kernel `implementation="auto"` picks for each target (`Options(platform=...)`), the
custom call it lowers to and its configuration, forward and gradient; the cuDNN padded-batch
bug; mha_jax's cuDNN refusals against jax's own; the exported artifacts serialize.

The README's table "what auto picks" is this file's `TABLE`, written out by
`MHA_JAX_WRITE_TABLE=1 pytest tests/test_lowering.py -k table` and compared here.
"""

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mha_jax as mj
from mha_jax import kernels
from mha_jax.kernels import jax_nn
from mha_jax.kernels.request import Request
from mha_jax.masks import Structure
from mha_jax.nnx import MultiHeadAttention
from tests.lowering import cuda_target, kernels_in, lower

B, L, D, H = 2, 256, 256, 4  # Dh = 64
TARGETS = {  # column -> (platform, compute capability)
    "cpu": ("cpu", None),
    "gpu Ampere (8.0)": ("gpu", (8, 0)),
    "gpu Hopper (9.0)": ("gpu", (9, 0)),
    "tpu": ("tpu", None),
}


def call(*, dtype=jnp.bfloat16, d_model=D, heads=H, kv_heads=None, length=L, sinks=False, **settings):
    """(f(x) -> out, x): one `batched_attention` layer of random weights with `settings`."""
    params = mj.init_params(jax.random.PRNGKey(0), d_model, heads, num_kv_heads=kv_heads, sinks=sinks)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    x = jnp.zeros((B, length, d_model), dtype)
    return (
        lambda x, options: mj.batched_attention(params, x, num_heads=heads, options=options, **settings)
    ), x


SEGMENTS = jnp.repeat(jnp.arange(2), L // 2)[None].repeat(B, 0)  # [B, L]: two documents a row
CASES = {
    "causal": dict(is_causal=True),
    "not causal": dict(),
    "causal, padded (kv_length)": dict(is_causal=True, kv_length=jnp.array([200, L])),
    "causal, window (127, 0)": dict(is_causal=True, window=(127, 0)),
    "causal, GQA 4/2 heads": dict(is_causal=True, kv_heads=2),
    "causal, segment ids": dict(structure=Structure(is_causal=True, segment_ids=SEGMENTS)),
    "causal, soft-cap": dict(is_causal=True, options_extra=dict(softcap=30.0)),
    "causal, sinks": dict(is_causal=True, sinks=True),
    "causal, float32": dict(is_causal=True, dtype=jnp.float32),
    "causal, padded, float16": dict(is_causal=True, kv_length=jnp.array([200, L]), dtype=jnp.float16),
    "causal, head dim 256": dict(is_causal=True, d_model=512, heads=2),
    "causal, L=200": dict(is_causal=True, length=200),
}

# What "auto" must lower to: the kernel mha_jax chose, and the custom calls of the forward;
# "-" where it must fall back to mha_jax's own kernels (plain XLA ops).
CUDNN_CAUSAL = "cudnn: cudnn CAUSAL window 0"
CUDNN_WINDOW = "cudnn: cudnn CAUSAL window 128"  # cuDNN's sliding_window_length is left + 1
TRITON = "pallas: triton mha_forward"
FLASH_TPU = "pallas: tpu _flash_attention_kernel"
EXPECTED = {
    "causal": ("reference: -", CUDNN_CAUSAL, CUDNN_CAUSAL, FLASH_TPU),
    "not causal": ("reference: -", "cudnn: cudnn NO_MASK window 0", "cudnn: cudnn NO_MASK window 0",
                   "pallas: tpu _flash_attention_kernel"),
    "causal, padded (kv_length)": ("reference: -", "cudnn: cudnn PADDING_CAUSAL window 0",
                                   "cudnn: cudnn PADDING_CAUSAL window 0", "reference: -"),
    "causal, window (127, 0)": ("reference: -", CUDNN_WINDOW, CUDNN_WINDOW, "reference: -"),
    "causal, GQA 4/2 heads": ("reference: -", CUDNN_CAUSAL, CUDNN_CAUSAL, FLASH_TPU),
    "causal, segment ids": ("reference: -", TRITON, TRITON, "reference: -"),
    "causal, soft-cap": ("reference: -", "reference: -", "reference: -", "reference: -"),
    "causal, sinks": ("reference: -", "reference: -", "reference: -", "reference: -"),
    "causal, float32": ("reference: -", TRITON, TRITON, FLASH_TPU),
    "causal, padded, float16": ("reference: -", "cudnn: cudnn PADDING_CAUSAL window 0",
                                "cudnn: cudnn PADDING_CAUSAL window 0", "reference: -"),
    "causal, head dim 256": ("reference: -", TRITON, CUDNN_CAUSAL, FLASH_TPU),
    "causal, L=200": ("reference: -", CUDNN_CAUSAL, CUDNN_CAUSAL, "reference: -"),
}  # fmt: skip


def lowered(case: dict, target: str, monkeypatch, *, gradient: bool = False) -> str:
    """ "<kernel auto chose>: <custom calls>" for `case` lowered for `target`."""
    case = dict(case)
    platform, capability = TARGETS[target]
    options = mj.Options(platform=platform, compute_capability=capability, **case.pop("options_extra", {}))
    f, x = call(**case)
    forward = lambda x: f(x, options)
    fn = jax.grad(lambda x: forward(x).astype(jnp.float32).sum()) if gradient else forward
    chosen = []
    real = kernels.choose
    monkeypatch.setattr(kernels, "choose", lambda *a: chosen.append(real(*a)) or chosen[-1])
    jax.clear_caches()  # batched_attention's own jit would not trace again
    with cuda_target(capability or (8, 0)):
        found = kernels_in(lower(fn, x, platform=platform))
    monkeypatch.setattr(kernels, "choose", real)
    names = sorted({kernel.name for kernel in chosen})
    return f"{', '.join(names)}: {', '.join(sorted(found)) or '-'}"


@pytest.fixture(scope="module")
def table():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return {name: tuple(lowered(case, t, monkeypatch) for t in TARGETS) for name, case in CASES.items()}


def test_auto_lowers_to_the_expected_kernel_on_every_target(table):
    for name, row in table.items():
        assert row == EXPECTED[name], name


@pytest.mark.parametrize(
    "name, target, want",
    [
        ("causal", "gpu Ampere (8.0)", "cudnn: cudnn CAUSAL window 0, cudnn backward CAUSAL window 0"),
        ("causal, padded (kv_length)", "gpu Hopper (9.0)",
         "cudnn: cudnn PADDING_CAUSAL window 0, cudnn backward PADDING_CAUSAL window 0"),
        ("causal, float32", "gpu Ampere (8.0)",
         "pallas: triton mha_backward, triton mha_forward, triton mha_preprocess_backward"),
        ("causal", "tpu", "pallas: tpu _flash_attention_dkv_kernel, tpu _flash_attention_dq_kernel, "
                          "tpu _flash_attention_kernel"),
        ("causal, segment ids", "gpu Hopper (9.0)",
         "pallas: triton mha_backward, triton mha_forward, triton mha_preprocess_backward"),
        ("causal, soft-cap", "gpu Hopper (9.0)", "reference: -"),  # L=256: below the blockwise size
    ],
)  # fmt: skip
def test_the_gradient_lowers_to_the_kernels_backward(name, target, want, monkeypatch):
    got = lowered(CASES[name], target, monkeypatch, gradient=True)
    assert got == want


def test_cudnn_takes_a_padded_batch():
    """jax 0.10.2's cuDNN batching rule failed at trace time on `kv_length` with B >= 2
    (`cannot reshape array of shape (1,) into shape (2,)`): the query lengths were unbatched."""
    f, x = call(is_causal=True, kv_length=jnp.array([100, L]))
    options = mj.Options(platform="gpu", implementation="cudnn")
    with cuda_target():
        forward = kernels_in(lower(lambda x: f(x, options), x, platform="gpu"))
        gradient = kernels_in(
            lower(jax.grad(lambda x: f(x, options).astype(jnp.float32).sum()), x, platform="gpu")
        )
    assert forward == {"cudnn PADDING_CAUSAL window 0"}
    assert gradient == forward | {"cudnn backward PADDING_CAUSAL window 0"}


def test_the_nnx_module_lowers_for_gpu_and_tpu():
    for platform, want in (("gpu", "cudnn CAUSAL window 0"), ("tpu", "tpu _flash_attention_kernel")):
        module = MultiHeadAttention(
            D, H, dtype=jnp.bfloat16, options=mj.Options(platform=platform), rngs=nnx.Rngs(0)
        )
        graphdef, state = nnx.split(module)
        x = jnp.zeros((B, L, D), jnp.bfloat16)
        with cuda_target():
            run = lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x, is_causal=True)
            found = kernels_in(lower(run, state, x, platform=platform))
        assert found == {want}, platform


@pytest.mark.parametrize(
    "dtype, head_dim, capability, window",
    [
        (jnp.bfloat16, 64, (8, 0), None),
        (jnp.float32, 64, (8, 0), None),
        (jnp.float16, 256, (8, 0), None),
        (jnp.float16, 256, (9, 0), None),
        (jnp.bfloat16, 72, (8, 0), None),
        (jnp.bfloat16, 64, (8, 0), (8, 8)),
    ],
)
def test_the_cudnn_refusals_are_jaxs(dtype, head_dim, capability, window):
    """mha_jax refuses a cuDNN call exactly when lowering jax's cuDNN kernel for it fails
    (not causal, so a window's right side is what it is)."""
    q = jnp.zeros((1, 128, 2, head_dim), dtype)
    request = Request(backend="gpu", dtype=jnp.dtype(dtype), length_q=128, length_k=128, head_dim=head_dim,
                      structure=Structure(window=window), has_mask=False, has_bias=False, dropout_rate=0.0,
                      return_weights=False, gpu_capability=capability)  # fmt: skip
    refused = bool(jax_nn.cudnn_cannot(request))
    direct = lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn", local_window_size=window)
    try:
        with cuda_target(capability):
            lower(direct, q, platform="gpu")
        fails = False
    except (ValueError, NotImplementedError, TypeError):
        fails = True
    assert refused == fails, jax_nn.cudnn_cannot(request)


def test_the_exported_artifacts_serialize():
    f, x = call(is_causal=True, kv_length=jnp.array([200, L]))
    for platform, targets in (("gpu", ["__cudnn$fmhaSoftmax"]), ("tpu", ["tpu_custom_call"])):
        options = mj.Options(platform=platform) if platform == "gpu" else mj.Options(platform="tpu")
        g = jax.jit(lambda x, options=options: f(x, options))
        checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
        with cuda_target():
            exported = jax.export.export(g, platforms=(platform if platform == "tpu" else "cuda",),
                                         disabled_checks=checks)(x)  # fmt: skip
        blob = exported.serialize()
        assert jax.export.deserialize(blob).platforms == exported.platforms
        assert len(blob) > 1000


def table_markdown(table) -> str:
    lines = ["| call (bf16, B=2, L=256, 4 heads of 64, self-attention) | " + " | ".join(TARGETS) + " |",
             "|---|" + "---|" * len(TARGETS)]  # fmt: skip
    for name, row in table.items():
        cells = [re.sub(r"^(\w+): -$", r"\1", cell).replace(": ", " → ") for cell in row]
        lines.append(f"| {name} | " + " | ".join(f"`{c}`" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def test_the_readme_table_is_the_generated_one(table):
    path = pathlib.Path(__file__).parent.parent / "docs" / "auto_kernels.md"
    markdown = table_markdown(table)
    if os.environ.get("MHA_JAX_WRITE_TABLE"):
        path.write_text(markdown)
    readme = (path.parent.parent / "README.md").read_text()
    assert path.read_text() == markdown, "run MHA_JAX_WRITE_TABLE=1 pytest tests/test_lowering.py -k table"
    assert markdown in readme, "the README's table of what auto picks is docs/auto_kernels.md's"
