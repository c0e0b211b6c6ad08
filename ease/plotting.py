"""Shared plotting helpers: one style, two column widths, a colour per layer and per
scheme, and figures saved as PDF + PNG with reproducible metadata."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from .io import atomic_path

STYLE = Path(__file__).with_name("ease.mplstyle")

# Column widths in inches (two-column conference layouts such as NeurIPS/ICML/ACL).
WIDTHS = {"single": 3.25, "double": 6.75}


def use_style() -> None:
    """Apply the EASE style to every figure that follows."""
    plt.style.use(STYLE)


def figure_size(width: str = "single", aspect: float = 0.62) -> tuple[float, float]:
    if width not in WIDTHS:
        raise ValueError(f"width {width!r} must be one of {sorted(WIDTHS)}")
    return WIDTHS[width], WIDTHS[width] * aspect


def figure(width: str = "single", aspect: float = 0.62, nrows: int = 1, ncols: int = 1, **kwargs):
    """plt.subplots in the EASE style at a paper column width."""
    with plt.style.context(STYLE):
        return plt.subplots(nrows, ncols, figsize=figure_size(width, aspect), **kwargs)


def palette(n: int) -> list:
    return sns.color_palette("colorblind", n)


def layer_colors(num_layers: int) -> list:
    """Shallow to deep: light to dark, in a colour-blind-safe sequential map."""
    return sns.color_palette("viridis_r", num_layers + 1)[1:] if num_layers > 1 else palette(1)


def save_figure(fig, name: str, folder: str | Path = "figures") -> list[Path]:
    """Save `fig` as folder/name.pdf and folder/name.png (300 dpi), atomically.

    Creation dates and software versions are left out of the files, so the same figure
    gives the same bytes on every run (git diffs stay quiet)."""
    folder = Path(folder)
    paths = []
    for ext, metadata in (("pdf", {"CreationDate": None, "Producer": None, "Creator": None}),
                          ("png", {"Software": None})):
        path = folder / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, metadata=metadata)
        paths.append(path)
    return paths


__all__ = ["figure", "figure_size", "layer_colors", "palette", "save_figure", "use_style"]
