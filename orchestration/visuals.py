"""Pictures and tables for the Dagster UI: image grids, line/bar plots, markdown.

Images are written as PNG files under ``data/`` (linked with ``MetadataValue.path``) and,
scaled down, inlined as base64 markdown so the asset page shows them. Plots use matplotlib
when it is installed and a small PIL renderer otherwise (the project does not depend on
matplotlib).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence

import dagster as dg
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from diffss.atomic import atomic_path

# Inline previews stay small: event-log rows hold the base64 text.
PREVIEW_MAX_SIDE = 512

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def image_markdown(image: Image.Image, caption: str = "") -> str:
    preview = image.copy()
    preview.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    buffer = io.BytesIO()
    preview.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    text = f"![{caption}](data:image/png;base64,{data})"
    return f"{text}\n\n{caption}" if caption else text


def image_metadata(name: str, image: Image.Image, path: Path, caption: str = "") -> dict[str, dg.MetadataValue]:
    """``<name>``: the picture inline; ``<name>_path``: the PNG file on disk."""
    save_png(image, path)
    return {name: dg.MetadataValue.md(image_markdown(image, caption)), f"{name}_path": dg.MetadataValue.path(str(path))}


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def labelled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], column_labels: Sequence[str], tile: int = 96) -> Image.Image:
    """Rows of tiles (e.g. support | condition | aux 1 ... aux X) with labels on top and left."""
    columns = max((len(r) for r in rows), default=0)
    label_w, label_h = 110, 16
    grid = Image.new("RGB", (label_w + columns * tile, label_h + len(rows) * tile), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for j, label in enumerate(column_labels[:columns]):
        draw.text((label_w + j * tile + 3, 2), label[:16], fill="black", font=font)
    for i, row in enumerate(rows):
        draw.text((3, label_h + i * tile + tile // 2 - 6), row_labels[i][:18], fill="black", font=font)
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((tile, tile)), (label_w + j * tile, label_h + i * tile))
    return grid


def stack_vertically(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (0, y))
        y += im.height + gap
    return canvas


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _matplotlib_to_image(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class _Axes:
    """Maps data coordinates to pixels of a PIL canvas with a margin for ticks and labels."""

    def __init__(self, width: int, height: int, y_max: float, title: str, y_label: str):
        self.image = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = _font()
        self.left, self.right, self.top, self.bottom = 50, width - 15, 28, height - 40
        self.y_max = y_max if y_max > 0 else 1.0
        self.draw.text(((self.left + self.right) // 2 - 3 * len(title), 6), title, fill="black", font=self.font)
        self.draw.text((4, 6), y_label, fill="black", font=self.font)
        self.draw.line([(self.left, self.top), (self.left, self.bottom), (self.right, self.bottom)], fill="black")
        for k in range(5):
            value = self.y_max * k / 4
            y = self.y(value)
            self.draw.line([(self.left - 3, y), (self.right, y)], fill=(225, 225, 225))
            self.draw.text((6, y - 6), f"{value:.0f}", fill="black", font=self.font)

    def y(self, value: float) -> float:
        return self.bottom - (self.bottom - self.top) * max(value, 0.0) / self.y_max


def line_plot(x: Sequence[float], series: dict[str, Sequence[float]], title: str, x_label: str, y_label: str) -> Image.Image:
    """One line per series over shared x values (the X-shot curve)."""
    if _have_matplotlib():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, ys in series.items():
            ax.plot(list(x), list(ys), marker="o", label=name)
        ax.set(title=title, xlabel=x_label, ylabel=y_label)
        ax.grid(alpha=0.3)
        ax.legend()
        return _matplotlib_to_image(fig)
    y_max = max((max(ys) for ys in series.values() if len(ys)), default=1.0) * 1.15
    axes = _Axes(480, 320, y_max, title, y_label)
    xs = list(x)
    span = (max(xs) - min(xs)) or 1
    px = [axes.left + 20 + (axes.right - axes.left - 40) * (v - min(xs)) / span for v in xs]
    for v, p in zip(xs, px):
        axes.draw.text((p - 3, axes.bottom + 4), f"{v:g}", fill="black", font=axes.font)
    axes.draw.text(((axes.left + axes.right) // 2 - 20, axes.bottom + 20), x_label, fill="black", font=axes.font)
    for k, (name, ys) in enumerate(series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        points = [(p, axes.y(v)) for p, v in zip(px, ys)]
        if len(points) > 1:
            axes.draw.line(points, fill=color, width=2)
        for p, q in points:
            axes.draw.ellipse([p - 3, q - 3, p + 3, q + 3], fill=color)
        axes.draw.text((axes.right - 120, axes.top + 4 + 16 * k), f"- {name}", fill=color, font=axes.font)
    return axes.image


def grouped_bar_plot(groups: Sequence[str], series: dict[str, Sequence[float]], title: str, y_label: str) -> Image.Image:
    """Bars per group, one colour per series (mIoU without / with auxiliary supports per condition)."""
    if _have_matplotlib():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        width = 0.8 / max(len(series), 1)
        for k, (name, values) in enumerate(series.items()):
            ax.bar([i + k * width for i in range(len(groups))], list(values), width=width, label=name)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], list(groups))
        ax.set(title=title, ylabel=y_label)
        ax.legend()
        return _matplotlib_to_image(fig)
    # Headroom above the tallest bar for its value label and the legend rows.
    y_max = max((max(v) for v in series.values() if len(v)), default=1.0) * (1.15 + 0.15 * len(series))
    axes = _Axes(480, 320, y_max, title, y_label)
    group_w = (axes.right - axes.left - 20) / max(len(groups), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    for i, group in enumerate(groups):
        x0 = axes.left + 10 + i * group_w
        axes.draw.text((x0 + 4, axes.bottom + 4), group[:14], fill="black", font=axes.font)
        for k, values in enumerate(series.values()):
            left = x0 + k * bar_w
            axes.draw.rectangle([left, axes.y(values[i]), left + bar_w - 2, axes.bottom], fill=_PALETTE[k % len(_PALETTE)])
            axes.draw.text((left, axes.y(values[i]) - 12), f"{values[i]:.1f}", fill="black", font=axes.font)
    for k, name in enumerate(series):
        axes.draw.text((axes.right - 150, axes.top + 4 + 16 * k), f"# {name}", fill=_PALETTE[k % len(_PALETTE)], font=axes.font)
    return axes.image


def table_markdown(frame: pd.DataFrame, float_format: str = ".2f") -> str:
    """A pandas frame as a markdown table (tabulate is a pandas optional dependency)."""
    try:
        return frame.to_markdown(index=False, floatfmt=float_format)
    except ImportError:
        header = "| " + " | ".join(map(str, frame.columns)) + " |"
        rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
        cells = [
            "| " + " | ".join(format(v, float_format) if isinstance(v, float) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)
        ]
        return "\n".join([header, rule, *cells])
