"""Lowering a call for a GPU or a TPU from this CPU machine, and reading what came out.

    with cuda_target((9, 0)):                               # jax's cuDNN checks answered
        text = lower(f, x, platform="gpu")                   # StableHLO for ("cuda",)
    kernels_in(text)   # {"cudnn PADDING_CAUSAL window 0", "triton mha_forward", "tpu splash_mha_fwd", ...}

jax lowers every GPU and TPU attention kernel without a device; what stops it is Python
checks of the installed CUDA libraries (`fused_attention_stablehlo.check_cudnn_version` and
`check_compute_capability`). `cuda_target` answers them as a machine with cuDNN 9.10 and the
given compute capability would: the kernel's own limits (dtypes, head dims) still apply.
"""

import contextlib
import re
import types
from unittest import mock

import jax
from jax._src.cudnn import fused_attention_stablehlo as cudnn_lowering

LOWERING_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}
CUDNN_VERSION = 91000


@contextlib.contextmanager
def cuda_target(capability: tuple[int, int] = (8, 0)):
    """jax's cuDNN checks answered as on a GPU of `capability` with cuDNN 9.10."""
    parse = lambda text: tuple(int(part) for part in text.split("."))
    versions = types.SimpleNamespace(cudnn_get_version=lambda: CUDNN_VERSION)
    with (
        mock.patch.object(cudnn_lowering, "cuda_versions", versions),
        mock.patch.object(cudnn_lowering, "check_compute_capability", lambda c: capability >= parse(c)),
        mock.patch.object(
            cudnn_lowering, "is_cuda_compute_capability_equal", lambda c: capability == parse(c)
        ),
    ):
        yield


def lower(f, *args, platform: str) -> str:
    """The StableHLO text of `jax.jit(f)(*args)` lowered for `platform` ("cpu", "gpu", "tpu")."""
    return jax.jit(f).trace(*args).lower(lowering_platforms=(LOWERING_PLATFORM[platform],)).as_text()


def kernels_in(text: str) -> set[str]:
    """The attention kernels a lowered module calls, each with its configuration:
    "cudnn <mask_type> window <sliding_window_length>" (and "cudnn backward ..."),
    "triton <kernel name>", "tpu <kernel name>"; empty for plain XLA ops."""
    found = set()
    for line in text.splitlines():
        call = re.search(r"custom_call @([\w$.]+)", line)
        if call is None:
            continue
        target = call.group(1)
        if target.startswith("__cudnn$fmha"):
            mask = re.search(r"mask_type\\22: \\22(\w+)", line)
            window = re.search(r"sliding_window_length\\22: (\d+)", line)
            kind = "cudnn backward" if "Backward" in target else "cudnn"
            found.add(f"{kind} {mask.group(1) if mask else '?'} window {window.group(1) if window else '?'}")
        elif target == "__gpu$xla.gpu.triton":
            found.add("triton " + re.search(r'name = "(\w+)"', line).group(1))
        elif target == "tpu_custom_call":
            found.add("tpu " + re.search(r'kernel_name = "(\w+)"', line).group(1))
    return found
