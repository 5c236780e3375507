"""Pictures: a metric against the loop count, and grids of generated images (matplotlib,
imported only here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import LoopdbError


class PlotUnavailable(LoopdbError):
    """matplotlib is not installed (the message names the extra to install)."""


def plot_against_loops(curves: dict[str, dict[int, float]], path, ylabel: str, title: str = "",
                       reference: dict[str, float] | None = None, log_scale: bool | None = None) -> Path:
    """One line per curve (name -> {K: value}) on a log2 loop axis; ``reference`` draws
    horizontal lines (e.g. the unigram line); ``log_scale`` None: a log y axis when one curve
    explodes. Returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable('plots need matplotlib: pip install -e ".[plot]"') from None
    crowded = len(curves) > 4  # a legend inside would hide lines: put it to the right
    figure, axes = plt.subplots(figsize=(8.4 if crowded else 6.4, 4.2))
    every_k = sorted({k for values in curves.values() for k in values})
    for index, (name, values) in enumerate(curves.items()):
        loops = sorted(values)
        color = f"C{index % 10}"  # past ten curves the colours repeat: dashed lines and squares tell them apart
        if len(loops) == 1 and len(every_k) > 1:  # a model without loops (dense): its level at every K
            axes.plot([every_k[0], every_k[-1]], [values[loops[0]]] * 2, linestyle=":", color=color,
                      label=f"{name} (no loops)")
            continue
        axes.plot(loops, [values[k] for k in loops], marker="o" if index < 10 else "s",
                  linestyle="-" if index < 10 else "--", color=color, label=name)
    positive = [v for curve in curves.values() for v in curve.values() if v > 0]
    if log_scale or (log_scale is None and positive and max(positive) > 30 * min(positive)):  # an exploding ELBO
        axes.set_yscale("log")
    for name, value in (reference or {}).items():
        axes.axhline(value, linestyle="--", color="gray", linewidth=1)
        axes.annotate(name, (1, value), textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("loops K (inference)")
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    if crowded:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def save_grid(images: torch.Tensor, classes: list[str], columns: int, path, title: str = "") -> None:
    """Class-major images -> one PNG, a row per class labelled with its name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable('writing an image grid needs matplotlib: pip install -e ".[vision]"') from None
    channels, size = images.shape[1], images.shape[2]
    pad = 1
    rows = len(classes)
    canvas = np.zeros((rows * (size + pad) + pad, columns * (size + pad) + pad, channels), dtype=np.float32)
    pixels = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        top, left = pad + row * (size + pad), pad + column * (size + pad)
        canvas[top:top + size, left:left + size] = image
    figure, axis = plt.subplots(figsize=(0.35 * columns + 1, 0.35 * rows + 0.6))
    axis.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray_r" if channels == 1 else None,
                vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks([pad + row * (size + pad) + size / 2 for row in range(rows)], classes)
    axis.set_xticks([])
    axis.set_title(title, fontsize=8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
