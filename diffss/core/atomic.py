"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A process killed at any moment leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The temporary name keeps the suffix so writers that infer the format from it (PIL,
    pandas, safetensors) work unchanged. On error the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(root: str | os.PathLike, recursive: bool = True) -> int:
    """Delete temporaries of :func:`atomic_path` under ``root`` (or, with ``recursive=False``,
    directly in it).

    A SIGKILL between creating the temporary and renaming it leaves ``.<name>.<random>.tmp<ext>``
    behind; a rerun (one writer per folder) removes them. Returns how many were removed.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    for path in (root.rglob if recursive else root.glob)(".*.tmp*"):
        if path.is_file() and ".tmp" in path.name:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
