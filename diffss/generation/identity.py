"""Weights recorded by identity, never by path.

Where generation records which models painted an image (``generation_config.json`` and the
``model_ids`` column of ``auxiliary.parquet``), a path would make two clones of the same data
differ only by where they live, and so every hash built on them (DVC, Dagster data versions).
:func:`model_identity` names a model by what it is instead:

- a local folder or file: ``md5:<hash>``, the DVC-style content hash of its files (relative
  paths and md5s, :func:`diffss.mlops.versioning.data_version`), so the same weights anywhere are one
  identity, and other weights under the same path are another;
- a hub id: ``hub:<id>``, with ``@<commit>`` when the local Hugging Face cache knows which
  revision ``main`` resolved to (read offline from the cache's ``refs/main``).

File hashes are memoised per process by (path, size, mtime), so only the first use hashes.
"""

from __future__ import annotations

import os
from pathlib import Path

IDENTITY_PREFIXES = ("md5:", "hub:")


def hub_revision(repo_id: str) -> str | None:
    """The commit ``main`` of hub model ``repo_id`` resolved to in the local cache, if cached."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() or None if ref.is_file() else None


def model_identity(path_or_id: str | os.PathLike) -> str:
    """``md5:<content hash>`` of a local model folder or file, ``hub:<id>[@<commit>]`` of a hub id;
    an identity (or a name that is neither, which no pipeline can load) is returned unchanged."""
    from diffss.mlops.versioning import data_version

    text = str(path_or_id)
    if text.startswith(IDENTITY_PREFIXES):
        return text
    path = Path(text).expanduser()
    if path.exists():
        return f"md5:{data_version(path)}"
    if not text or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return text  # neither here nor a hub id: loading it will fail and say so; recorded as given
    revision = hub_revision(text)
    return f"hub:{text}@{revision}" if revision else f"hub:{text}"
