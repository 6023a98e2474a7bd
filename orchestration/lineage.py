"""Dagster's own lineage travels with the data, so a clone's ``dvc pull`` is up to date in Dagster.

Dagster keeps each materialisation's data version, code version and input data versions in its
instance (the event log), which another clone does not have. Before ``dvc add``, ``dvc_snapshot``
writes them to ``data/lineage.json`` (:func:`export_lineage`: only entries whose folder still
hashes to the recorded data version; no run ids, times or paths). In a fresh instance,
:func:`import_lineage` reports each entry whose folder hashes to its data version as a runless
materialisation with those same tags: the provenance Dagster records (:class:`dagster.DataProvenance`)
is then what the origin recorded, and :func:`unsynced` reads from it, with Dagster's public API and
Dagster's staleness rules, what is up to date (or Unsynced where this checkout's code or settings
differ, or the observed raw files changed); :func:`out_of_date` selects what to run from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg

from diffss.core.atomic import write_text_atomic
from diffss.mlops.versioning import data_version, published_version

LINEAGE_FILE = "lineage.json"
SNAPSHOT = dg.AssetKey("dvc_snapshot")
_KEPT_TAGS = ("dagster/data_version", "dagster/code_version", "dagster/input_data_version/",
              "dagster/data_version_is_user_provided")
_POINTER = "dagster/input_event_pointer/"


def asset_folder(data_root: Path, key: dg.AssetKey, partition: str | None) -> Path:
    """The folder an asset writes (the convention of ``orchestration.assets``)."""
    return Path(data_root, *([partition] if partition else []), *key.path)


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    return records[0] if records else None


def export_lineage(instance: dg.DagsterInstance, data_root: str | Path, snapshot: dict[str, Any]) -> Path:
    """Write ``<data_root>/lineage.json``: the latest materialisation's version tags of every asset
    partition whose folder under ``data_root`` holds exactly what it reported, and the code version
    and inputs of ``dvc_snapshot`` itself (``snapshot``; its data version is the md5 of data.dvc)."""
    data_root = Path(data_root)
    entries = []
    for key in sorted(instance.get_asset_keys(), key=lambda k: k.to_user_string()):
        if key == SNAPSHOT:
            continue
        for partition in sorted(instance.get_materialized_partitions(key)) or [None]:
            record = _latest(instance, key, partition)
            folder = asset_folder(data_root, key, partition)
            tags = dict(record.asset_materialization.tags or {}) if record else {}
            if record is None or not folder.is_dir() or data_version(folder) != tags.get("dagster/data_version"):
                continue
            entries.append({"asset": key.to_user_string(), "partition": partition,
                            "tags": {k: v for k, v in sorted(tags.items()) if k.startswith(_KEPT_TAGS)}})
    path = data_root / LINEAGE_FILE
    text = json.dumps({"assets": entries, SNAPSHOT.to_user_string(): snapshot}, indent=1, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:  # an unchanged record is not rewritten
        write_text_atomic(path, text)
    return path


def import_lineage(instance: dg.DagsterInstance, data_root: str | Path, repo_root: str | Path | None = None) -> list[str]:
    """Report the materialisations ``<data_root>/lineage.json`` records whose folders hash to their
    data version (and that this instance does not already have); with ``repo_root``, also
    ``dvc_snapshot`` when ``data/`` hashes to the version ``data.dvc`` records. Returns what it reported."""
    data_root = Path(data_root)
    path = data_root / LINEAGE_FILE
    lineage = json.loads(path.read_text()) if path.is_file() else {}
    entries = lineage.get("assets", [])
    known = {(e["asset"], e["partition"]) for e in entries}
    done: set[tuple[str, str | None]] = set()
    reported = []

    def deps(entry) -> list[tuple[str, str | None]]:
        names = [t[len("dagster/input_data_version/"):] for t in entry["tags"] if t.startswith("dagster/input_data_version/")]
        return [(n, entry["partition"]) if (n, entry["partition"]) in known else (n, None) for n in names]

    pending = list(entries)
    while pending:  # upstream first: a pointer names the storage id of the input's record in this instance
        ready = [e for e in pending if all(d in done or d not in known for d in deps(e))] or pending[:1]
        for entry in ready:
            pending.remove(entry)
            done.add((entry["asset"], entry["partition"]))
            key, partition, tags = dg.AssetKey.from_user_string(entry["asset"]), entry["partition"], dict(entry["tags"])
            latest = _latest(instance, key, partition)
            current = dict(latest.asset_materialization.tags or {}) if latest else {}
            if all(current.get(t) == tags.get(t) for t in ("dagster/data_version", "dagster/code_version")):
                continue
            folder = asset_folder(data_root, key, partition)
            if not folder.is_dir() or data_version(folder) != tags["dagster/data_version"]:
                continue  # not these bytes: Dagster will see it as missing or unsynced
            for dep, dep_partition in deps(entry):
                record = _latest(instance, dg.AssetKey.from_user_string(dep), dep_partition)
                if record is not None:
                    tags[_POINTER + dep] = str(record.storage_id)
            instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key=key, partition=partition, tags=tags,
                metadata={"restored": dg.MetadataValue.path(str(folder)), "from": "data/lineage.json"}))
            reported.append(f"{entry['asset']}[{partition}]" if partition else entry["asset"])
    snapshot = lineage.get(SNAPSHOT.to_user_string())
    if repo_root is not None and snapshot and _latest(instance, SNAPSHOT, None) is None and data_root.is_dir():
        published = published_version(repo_root, data_root.resolve().relative_to(Path(repo_root).resolve()).as_posix())
        if published is not None and data_version(data_root) == published:
            tags = {"dagster/data_version": published, "dagster/code_version": snapshot["code_version"]}
            for dep in snapshot["inputs"]:  # its inputs are every fold's: point at their latest records
                records = instance.fetch_materializations(dg.AssetKey.from_user_string(dep), limit=1).records
                if records:
                    tags[f"dagster/input_data_version/{dep}"] = records[0].asset_materialization.tags["dagster/data_version"]
                    tags[_POINTER + dep] = str(records[0].storage_id)
            instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key=SNAPSHOT, tags=tags, metadata={"md5": published, "from": "data.dvc"}))
            reported.append(SNAPSHOT.to_user_string())
    return reported


def _data_version(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> str | None:
    """The data version the latest materialisation (an observation, for a source asset) reported."""
    record = _latest(instance, key, partition)
    if record is not None:
        return (record.asset_materialization.tags or {}).get("dagster/data_version")
    observations = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    return observations[0].asset_observation.tags.get("dagster/data_version") if observations else None


def _same_version(recorded: str, current: str) -> bool:
    """Dagster records an unpartitioned input's data version as is, and a partitioned input's as
    the sha256 of its partitions' versions joined (one partition here: sha256 of the version)."""
    return recorded == current or recorded == hashlib.sha256(current.encode()).hexdigest()


def unsynced(defs: dg.Definitions, instance: dg.DagsterInstance, partition: str) -> dict[dg.AssetKey, str]:
    """The materialisable assets of ``partition`` (and the shared ones) whose latest materialisation
    does not match the definitions, with the cause, read from the provenance Dagster recorded
    (:class:`dagster.DataProvenance`: the code version it ran and its inputs' data versions):
    ``missing``, ``code version changed``, ``input changed: <asset>``, or ``upstream: <asset>``
    (an input that is itself unsynced). These are the rules of Dagster's own stale status; an input
    Dagster recorded no version for, or whose version this instance does not know (a source not
    observed yet), is not compared."""
    graph = defs.resolve_asset_graph()
    causes: dict[dg.AssetKey, str] = {}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable:
            continue
        record = _latest(instance, key, partition if node.is_partitioned else None)
        provenance = dg.DataProvenance.from_tags(record.asset_materialization.tags or {}) if record else None
        if record is None:
            causes[key] = "missing"
        elif provenance is None or provenance.code_version != node.code_version:
            causes[key] = "code version changed"
        else:
            for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
                # an unpartitioned asset reads its partitioned inputs' latest materialisations
                parent_partition = partition if graph.get(parent).is_partitioned and node.is_partitioned else None
                if parent in causes:
                    causes[key] = f"upstream: {parent.to_user_string()}"
                    break
                recorded = provenance.input_data_versions.get(parent)
                current = _data_version(instance, parent, parent_partition)
                if recorded is not None and current is not None and not _same_version(recorded.value, current):
                    causes[key] = f"input changed: {parent.to_user_string()}"
                    break
    return causes


def out_of_date(defs: dg.Definitions, instance: dg.DagsterInstance, partition: str) -> list[dg.AssetKey]:
    """The assets of ``partition`` (and the shared ones) that are missing or Unsynced
    (:func:`unsynced`), and everything downstream of them (their outputs will change), in graph order."""
    graph = defs.resolve_asset_graph()
    stale = unsynced(defs, instance, partition)
    selected: set[dg.AssetKey] = set()
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if node.is_materializable and (key in stale or selected & set(node.parent_keys)):
            selected.add(key)
    return [key for key in graph.toposorted_asset_keys if key in selected]


def main() -> int:
    """``python -m orchestration.lineage``: after ``dvc pull``, record the restored assets in the
    instance of ``DAGSTER_HOME`` (what ``make demo`` does first), for ``dagster dev`` users."""
    import os

    from diffss.experiment import ExperimentConfig

    settings = ExperimentConfig.from_yaml(os.environ.get("DIFFSS_CONFIG"))
    with dg.DagsterInstance.get() as instance:
        reported = import_lineage(instance, settings.data_root, ".")
    print(f"restored in Dagster ({os.environ.get('DAGSTER_HOME')}): {len(reported)} asset partitions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
