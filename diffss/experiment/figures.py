"""Pictures of a run, saved as PNG files beside its outputs: image grids and result plots.

Grids are torchvision's ``make_grid`` over equally sized tiles (rows of support | condition |
auxiliary images, or prediction panels); plots are matplotlib figures (Agg backend). The PNGs are
written atomically and carry no timestamp or software version, so the same inputs give the same
bytes (they live under ``data/`` and are versioned with it).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from diffss.core.atomic import write_bytes_atomic


def save_png(image: Image.Image, path: str | Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def image_grid(rows: Sequence[Sequence[Image.Image]], tile: int = 96, padding: int = 2) -> Image.Image:
    """Rows of images as one grid (``make_grid``), each resized to ``tile`` x ``tile``; short rows
    are padded with white tiles."""
    import torch
    from torchvision.utils import make_grid

    columns = max((len(r) for r in rows), default=1)
    blank = Image.new("RGB", (tile, tile), "white")
    tiles = [im for row in rows for im in (*row, *[blank] * (columns - len(row)))]
    batch = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((tile, tile)))).permute(2, 0, 1)
                         for im in tiles])
    grid = make_grid(batch, nrow=columns, padding=padding, pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def stack_panels(panels: Sequence[Image.Image], padding: int = 4) -> Image.Image:
    """Panels of one size (e.g. support | query | ground truth | prediction) one under another."""
    import torch
    from torchvision.utils import make_grid

    batch = torch.stack([torch.from_numpy(np.array(p.convert("RGB"))).permute(2, 0, 1) for p in panels])
    return Image.fromarray(make_grid(batch, nrow=1, padding=padding, pad_value=255).permute(1, 2, 0).numpy())


def _figure_png(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def _axes(title: str, x_label: str, y_label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(alpha=0.3)
    return fig, ax


def line_plot(x: Sequence[float], series: dict[str, Sequence[float]], title: str, x_label: str, y_label: str,
              path: str | Path) -> Path:
    """One line per series over shared x values (the X-shot curve)."""
    fig, ax = _axes(title, x_label, y_label)
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    ax.set_xticks(list(x))
    ax.legend()
    return _figure_png(fig, path)


def bar_plot(groups: Sequence[str], series: dict[str, Sequence[float]], title: str, y_label: str,
             path: str | Path) -> Path:
    """Bars per group, one colour per series (mIoU without / with auxiliary supports per condition)."""
    fig, ax = _axes(title, "", y_label)
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        bars = ax.bar([i + k * width for i in range(len(groups))], list(values), width=width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], list(groups))
    ax.set_ylim(0, max(1.0, *(max(v) for v in series.values() if len(v))) * 1.25)
    ax.legend(loc="upper right", ncols=len(series))
    return _figure_png(fig, path)
