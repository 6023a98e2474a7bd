"""Stamps: what an asset partition's files were made from, kept beside them under ``data/``.

Dagster remembers versions in its instance (the event log), which a second clone of the
repository does not have. A stamp carries the same facts with the data, so they travel with
``dvc push`` / ``dvc pull``: ``<partition folder>/stamps/<asset>.json`` records

- ``code_version``: the asset's ``code_version`` (bumped when its logic changes),
- ``config``: the settings that determine the outputs (resources' relevant fields and the run
  config; not where things live or how fast they run: no paths, devices, dtypes, workers),
- ``inputs``: the data versions of the upstream assets it read, as their stamps record them,
- ``outputs``: ``diffss.versioning.data_version`` of the files it wrote (DVC's content hash,
  so byte-identical files restored by ``dvc pull`` have the same version),
- ``data_version``: the version reported to Dagster (the outputs' hash unless the asset
  says otherwise) and ``metadata``: the JSON-able part of the materialisation's metadata.

A materialisation whose stamp matches on all of these and whose outputs still hash to the
recorded version does no work: it reports the same data version with ``reused: True``.
The stamp is written last, after every output, so a crash leaves an old stamp whose output
hash no longer matches (and the work is redone), never a stamp for half-written files.
Each asset verifies its own outputs; an upstream's version is taken from its stamp, as
Dagster takes it from the upstream's last materialisation.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from PIL import Image

from diffss.atomic import write_text_atomic
from diffss.versioning import data_version

STAMP_FORMAT = 1
STAMP_DIR = "stamps"

# Settings that change where or how fast a step runs, not what it writes.
RUNTIME_FIELDS = frozenset({
    "root", "output_dir", "auxiliary_table", "device", "dtype", "num_workers", "supports_per_call",
    "local_files_only", "checkpoint_every",
})

_REQUIRED = frozenset({"code_version", "config", "config_digest", "inputs", "outputs", "data_version"})
_IMAGE_MARKDOWN = re.compile(r"^!\[(?P<caption>[^\]]*)\]\(data:image/")


def as_json(value: Any) -> Any:
    """``value`` as it reads back from a stamp (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_digest(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def effective(settings: dict[str, Any], drop: frozenset[str] | set[str] = RUNTIME_FIELDS) -> dict[str, Any]:
    """``settings`` without the runtime-only fields (paths, devices, workers)."""
    return {k: v for k, v in settings.items() if k not in drop}


def weights_identity(value: str | None) -> str | None:
    """A weights setting as it affects outputs: a local file by its content, anything else as given."""
    if value and Path(value).expanduser().is_file():
        return f"md5:{data_version(Path(value).expanduser())}"
    return value or None


def outputs_version(paths: list[Path], root: Path, optional: list[Path] = ()) -> str | None:
    """DVC content hash of one output, or of several (md5 of their hashes by path); None if one
    of ``paths`` is missing (``optional`` ones may be: an absent one counts as such)."""
    versions: dict[str, str | None] = {}
    for path in paths:
        if not path.exists():
            return None
        versions[_relative(path, root)] = data_version(path)
    for path in optional:
        versions[_relative(path, root)] = data_version(path) if path.exists() else None
    if len(versions) == 1 and not optional:
        return next(iter(versions.values()))
    return hashlib.md5(json.dumps(versions, sort_keys=True).encode(), usedforsecurity=False).hexdigest()


def read_stamp(path: Path) -> dict[str, Any] | None:
    """The stamp at ``path``, or None when there is none or it cannot be used (then the work is redone)."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT or not _REQUIRED <= set(stamp):
        return None
    return stamp


def stamped_version(path: Path) -> str | None:
    """The data version an upstream's stamp records (None: never stamped)."""
    stamp = read_stamp(path)
    return stamp.get("data_version") if stamp else None


# --------------------------------------------------------------------------- metadata


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _encode_path(value: str, root: Path) -> dict[str, str]:
    """A path under the data root relative to it (``data_path``), any other as it was (``path``)."""
    try:
        return {"data_path": Path(value).resolve().relative_to(root.resolve()).as_posix()}
    except ValueError:
        return {"path": value}


def _decode_path(entry: dict[str, str], root: Path) -> str:
    return str(root / entry["data_path"]) if "data_path" in entry else entry["path"]


def encode_metadata(metadata: dict[str, Any], root: Path) -> dict[str, Any]:
    """The JSON-able part of ``metadata``: numbers, text, JSON, tables as markdown, paths relative
    to the data root (so they resolve in another clone) and inline images by caption (they are
    read back from their PNG file)."""
    stored: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, dg.MetadataValue):
            raw = value.value
            if isinstance(value, dg.PathMetadataValue):
                stored[key] = _encode_path(str(raw), root)
            elif isinstance(value, dg.MarkdownMetadataValue):
                match = _IMAGE_MARKDOWN.match(raw or "")
                stored[key] = {"image": match["caption"]} if match else {"md": raw}
            elif isinstance(value, dg.JsonMetadataValue):
                stored[key] = {"json": raw}
            elif isinstance(value, (dg.TextMetadataValue, dg.IntMetadataValue, dg.FloatMetadataValue, dg.BoolMetadataValue)):
                stored[key] = {"value": raw}
        elif isinstance(value, (bool, int, float, str)):
            stored[key] = {"value": value}
    return stored


def decode_metadata(stored: dict[str, Any], root: Path) -> dict[str, Any]:
    from orchestration.visuals import image_markdown

    metadata: dict[str, Any] = {}
    for key, entry in stored.items():
        if "value" in entry:
            metadata[key] = entry["value"]
        elif "path" in entry or "data_path" in entry:
            metadata[key] = dg.MetadataValue.path(_decode_path(entry, root))
        elif "md" in entry:
            metadata[key] = dg.MetadataValue.md(entry["md"])
        elif "json" in entry:
            metadata[key] = dg.MetadataValue.json(entry["json"])
        elif "image" in entry:
            png = stored.get(f"{key}_path")
            if isinstance(png, dict) and ("path" in png or "data_path" in png) and Path(_decode_path(png, root)).is_file():
                with Image.open(_decode_path(png, root)) as image:
                    metadata[key] = dg.MetadataValue.md(image_markdown(image.convert("RGB"), entry["image"]))
    return metadata


# --------------------------------------------------------------------------- the check


@dataclass
class Provenance:
    """What one materialisation of an asset partition depends on, and where its stamp lives.

    ``config``: the effective settings (JSON-able); ``inputs``: ``{upstream: data version}``
    (None when the upstream was never stamped: then nothing is reused); ``outputs``: the files
    and folders this asset writes (``optional``: those it writes only sometimes, e.g. a preview
    of an empty selection); ``root``: the data root (stamp paths are relative to it).
    """

    context: Any
    stamp_path: Path
    root: Path
    config: dict[str, Any]
    inputs: dict[str, str | None] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    optional: list[Path] = field(default_factory=list)
    reason: str = ""

    @property
    def code_version(self) -> str | None:
        assets_def = self.context.assets_def
        return assets_def.code_versions_by_key.get(self.context.asset_key)

    def why_not_reusable(self) -> str | None:
        """None when the stamp matches and the outputs are intact, else the reason in words."""
        stamp = read_stamp(self.stamp_path)
        if stamp is None:
            return f"no stamp at {self.stamp_path.name} (first materialisation, or made before stamps)"
        if stamp.get("code_version") != self.code_version:
            return f"code version changed ({stamp.get('code_version')} -> {self.code_version})"
        if stamp.get("config_digest") != config_digest(self.config):
            old, new = stamp.get("config") or {}, as_json(self.config)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            return f"config changed: {', '.join(changed) or 'digest differs'}"
        missing = sorted(k for k, v in self.inputs.items() if v is None)
        if missing:
            return f"input(s) never stamped: {', '.join(missing)}"
        recorded = stamp.get("inputs") or {}
        changed = sorted(k for k in set(recorded) | set(self.inputs) if recorded.get(k) != self.inputs.get(k))
        if changed:
            return f"input(s) changed: {', '.join(changed)}"
        current = outputs_version(self.outputs, self.root, self.optional)
        if current is None:
            return "output(s) missing"
        if current != stamp.get("outputs"):
            return "outputs differ from what the stamp recorded (modified or incomplete)"
        return None

    def reused(self, force: bool = False) -> dg.MaterializeResult | None:
        """The result of reusing the existing outputs, or None when the work must be done."""
        self.reason = "forced by the run config" if force else (self.why_not_reusable() or "")
        if self.reason:
            self.context.log.info(f"materialising: {self.reason}")
            return None
        stamp = read_stamp(self.stamp_path)
        self.context.log.info(f"outputs are up to date (stamp {self.stamp_path}): reused, nothing recomputed")
        metadata = decode_metadata(stamp.get("metadata") or {}, self.root)
        metadata.update({"reused": True, "stamp": dg.MetadataValue.path(str(self.stamp_path))})
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(stamp["data_version"]))

    def record(self, metadata: dict[str, Any], data_version_: str | None = None, reused: bool = False) -> dg.MaterializeResult:
        """Write the stamp (after every output) and return the materialisation result.

        ``reused``: the step ran but found nothing to do (incremental assets that only fill gaps).
        """
        produced = outputs_version(self.outputs, self.root, self.optional)
        if produced is None:
            missing = [str(p) for p in self.outputs if not p.exists()]
            raise FileNotFoundError(f"{self.context.asset_key.to_user_string()}: output(s) {missing} were not written")
        version = data_version_ or produced
        metadata = {k: v for k, v in metadata.items() if k not in ("reused", "stamp", "reuse_check")}
        stamp = {
            "format": STAMP_FORMAT,
            "asset": self.context.asset_key.to_user_string(),
            "partition": str(self.context.partition_key) if self.context.has_partition_key else None,
            "code_version": self.code_version,
            "config": as_json(self.config),
            "config_digest": config_digest(self.config),
            "inputs": self.inputs,
            "outputs": produced,
            "data_version": version,
            "metadata": encode_metadata(metadata, self.root),
        }
        write_text_atomic(self.stamp_path, json.dumps(stamp, indent=2, sort_keys=True, default=str) + "\n")
        return dg.MaterializeResult(
            metadata={**metadata, "reused": reused, "reuse_check": self.reason or "not checked",
                      "stamp": dg.MetadataValue.path(str(self.stamp_path))},
            data_version=dg.DataVersion(version),
        )
