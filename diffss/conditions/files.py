"""File helpers shared by condition and auxiliary-image writers: stable names, atomic PNG
writes, validity checks (for resuming) and removal of temporaries a killed run left behind."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from diffss.core.atomic import atomic_path, remove_stale_temporaries  # noqa: F401 - re-exported

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """A file-name-safe, collision-free form of a sample name.

    Names made only of ``[A-Za-z0-9._-]`` are kept ("2007_000033"); others have unsafe
    characters replaced by "_" plus a short hash of the original, so "taxi/3" and "taxi_3"
    stay distinct ("taxi_3-<hash>" vs "taxi_3").
    """
    name = str(name)
    if not name:
        raise ValueError("sample name is empty")
    cleaned = _UNSAFE.sub("_", name)
    if cleaned == name and not name.startswith("."):
        return name
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=4).hexdigest()
    return f"{cleaned.lstrip('.')}-{digest}"


def save_png_atomic(image: Image.Image | np.ndarray, target: str | os.PathLike) -> Path:
    """Write a PNG through a temporary file so a killed process never leaves a partial image."""
    target = Path(target)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return target


def is_valid_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> bool:
    """True when ``path`` exists, passes PIL's verify and fully decodes (and has ``size``)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            if size is not None and tuple(im.size) != tuple(size):
                return False
    except Exception:  # noqa: BLE001 - any decode failure means "regenerate"
        return False
    return True
