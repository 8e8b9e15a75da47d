"""The house's layering: no module imports one above it (README, "Where things live").

Each module of mha_jax sits on one layer; it may import its own layer and those below. Read
from the source (ast), so a lazy import inside a function counts as much as one at the top.
"""

import ast
import pathlib

import mha_jax

# Lowest first. A package stands for every module in it.
LAYERS = [
    ["mha_jax._checks"],
    [
        "mha_jax.masks",
        "mha_jax.rope",
        "mha_jax.qk_norm",
        "mha_jax.params",
        "mha_jax.stages",
        "mha_jax.alibi",
        "mha_jax.score_mod",
    ],
    ["mha_jax.options"],
    ["mha_jax.kernels"],
    ["mha_jax._validate", "mha_jax.frame"],
    ["mha_jax.core", "mha_jax.decoding"],
    ["mha_jax.parallel"],
    ["mha_jax._module", "mha_jax.nnx", "mha_jax.linen"],
    ["mha_jax.interop"],
    ["mha_jax.models"],
]
ROOT = pathlib.Path(mha_jax.__file__).parent


def layer_of(module: str) -> int | None:
    """The layer of `module` (longest prefix wins); None for the package itself (the top)."""
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (rank, len(name))
    return None if best is None else best[0]


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imported(tree: ast.AST, module: str, is_package: bool):
    """Every mha_jax module a source imports (`from mha_jax.x import y` counts as x.y when
    y is a module, else as x)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("mha_jax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("mha_jax"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                as_module = (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT.parent / candidate.replace(".", "/") / "__init__.py"
                ).exists()
                yield candidate if as_module else base


def test_every_module_has_a_layer():
    unplaced = [name for name, _ in modules() if name != "mha_jax" and layer_of(name) is None]
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_no_module_imports_one_above_it():
    upward = []
    for name, path in modules():
        own = layer_of(name)
        if own is None:  # the package's __init__: the top
            continue
        for target in imported(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            rank = layer_of(target)
            if rank is None or rank > own:
                upward.append(f"{name} (layer {own}) imports {target} (layer {rank})")
    assert not upward, "\n".join(upward)


def test_the_decoding_package_loads_without_a_lazy_import():
    import mha_jax.decoding

    assert not hasattr(mha_jax.decoding, "__getattr__")
    assert callable(mha_jax.decoding.cached_attention)


def test_the_data_path_calls_no_checked_stage(monkeypatch):
    """Validation happens once, at the public boundary: with every checked stage replaced by one
    that fails, the batched call (QK-norm, RoPE, GQA), a decode step and the per-example call
    still run, so none of them checks its stages again on the data path."""
    import sys

    import jax
    import numpy as np

    import mha_jax.qk_norm
    import mha_jax.rope
    import mha_jax.stages
    from mha_jax.decoding import cached_attention, init_cache

    stages, rope, norm = mha_jax.stages, mha_jax.rope, mha_jax.qk_norm
    checked = [(stages, "project_heads"), (stages, "merge_project"), (stages, "split_heads"),
               (stages, "merge_heads"), (rope, "apply_rope"), (norm, "qk_norm"),
               (norm, "rms_norm")]  # fmt: skip
    originals = {id(getattr(module, name)) for module, name in checked}
    params = mha_jax.init_params(jax.random.PRNGKey(0), 16, 4, num_kv_heads=2, qk_norm=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
    options = mha_jax.Options(rope=mha_jax.RoPE())
    expected = mha_jax.batched_attention(params, x, num_heads=4, is_causal=True, options=options)

    def refuse(*args, **kwargs):
        raise AssertionError("a checked stage was called on the data path")

    patched = 0
    for module in [m for n, m in sys.modules.items() if n == "mha_jax" or n.startswith("mha_jax.")]:
        for attribute, value in list(vars(module).items()):
            if callable(value) and id(value) in originals:
                monkeypatch.setattr(module, attribute, refuse)
                patched += 1
    assert patched >= len(checked)
    with jax.disable_jit():  # traced afresh: a cached compilation would hide a call
        got = mha_jax.batched_attention(params, x, num_heads=4, is_causal=True, options=options)
        out, _ = cached_attention(params, x, init_cache(2, 8, 2, 4), num_heads=4, options=options)
        mha_jax.attention(params, x[0], num_heads=4, is_causal=True, options=options)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def uses(word: str) -> set[str]:
    """The files of mha_jax whose code (not docstrings) names `word`: as an attribute, a
    keyword, a name or argument, or a string (a field looked up with getattr). The models
    are the features' users, not their implementation: not counted."""
    found = set()
    root = pathlib.Path(mha_jax.__file__).parent
    for path in sorted(set(root.rglob("*.py")) - set((root / "models").rglob("*.py"))):
        tree = ast.parse(path.read_text())
        bodies = [n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)]
        docs = {id(n.body[0].value) for n in bodies if n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if (
                (isinstance(node, ast.Attribute) and node.attr == word)
                or (isinstance(node, ast.keyword | ast.arg) and node.arg == word)
                or (isinstance(node, ast.Name) and node.id == word)
                or (isinstance(node, ast.Constant) and node.value == word and id(node) not in docs)
            ):
                found.add("mha_jax/" + path.relative_to(pathlib.Path(mha_jax.__file__).parent).as_posix())
                break
    return found


def test_contributing_lists_every_file_a_feature_touches():
    """README, Contributing: "- `softcap` touches: `a.py` (...), `b.py`" lists exactly the files
    whose code names the feature: a new file using it, or a stale entry, fails here."""
    import re

    readme = (pathlib.Path(mha_jax.__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Contributing") :]
    entries = re.findall(r"^- `(\w+)` touches: (.*?)(?=^\S|^- |\n\n)", section, flags=re.M | re.S)
    listed = {word: set(re.findall(r"`(mha_jax/[\w/]+\.py)`", files)) for word, files in entries}
    assert set(listed) == {"softcap", "alibi", "score_mod", "sinks", "chunk", "segment_ids", "mask_mod"}, (
        listed
    )
    for word, files in listed.items():
        assert uses(word) == files, (
            f"{word}: the code names it in {sorted(uses(word))}; README lists {sorted(files)}"
        )
