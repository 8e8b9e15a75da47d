"""Pictures shared by the scripts: attention heatmaps with token labels (CJK
included) and training curves. Matplotlib only; the library never imports this."""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402


def use_cjk_font() -> str:
    """Register Noto Sans SC (shipped by `pylopdf-fonts-zh-cn`) as a fallback
    after DejaVu Sans, so Chinese labels render as text, not empty boxes."""
    path = importlib.resources.files("pylopdf_fonts_zh_cn") / "NotoSansSC-Regular.otf"
    font_manager.fontManager.addfont(str(path))
    name = font_manager.FontProperties(fname=str(path)).get_name()
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", name]
    return name


def heatmap(weights, row_labels: Sequence[str], col_labels: Sequence[str], title: str, path: Path) -> Path:
    """`weights [Lq, Lk]` as an image: row i = how query token i spreads its attention."""
    use_cjk_font()
    width = max(4.0, 0.42 * len(col_labels) + 3.0)
    height = max(3.0, 0.42 * len(row_labels) + 2.2)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=90)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("key token (attended to)")
    ax.set_ylabel("query token (attending)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(history: Sequence[dict], keys: Sequence[str], path: Path, title: str) -> Path:
    """One panel per metric against the step."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        if key.endswith("loss") and points and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
