"""Line plots of a metric against the loop count (matplotlib, imported only here)."""

from __future__ import annotations

from pathlib import Path


class PlotUnavailable(RuntimeError):
    pass


def plot_against_loops(curves: dict[str, dict[int, float]], path, ylabel: str, title: str = "",
                       reference: dict[str, float] | None = None) -> Path:
    """One line per curve (name -> {K: value}) on a log2 loop axis; ``reference`` draws
    horizontal lines (e.g. the unigram line). Returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable('plots need matplotlib: pip install -e ".[plot]"') from None
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    every_k = sorted({k for values in curves.values() for k in values})
    for name, values in curves.items():
        loops = sorted(values)
        if len(loops) == 1 and len(every_k) > 1:  # a model without loops (dense): its level at every K
            axes.plot([every_k[0], every_k[-1]], [values[loops[0]]] * 2, linestyle=":", label=f"{name} (no loops)")
            continue
        axes.plot(loops, [values[k] for k in loops], marker="o", label=name)
    positive = [v for curve in curves.values() for v in curve.values() if v > 0]
    if positive and max(positive) > 30 * min(positive):  # e.g. an ELBO that explodes: keep the rest readable
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
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
