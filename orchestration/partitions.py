"""Partitions: one ``split`` per (dataset, fold), crossed with ``condition`` where it applies.

Dagster multi-partitions have at most two dimensions, so dataset and fold share one
dimension whose keys read ``<dataset>_fold<k>`` (``demo_fold0``, ``pascal5i_fold3``).
Fold-level assets (raw data, splits, the baseline checkpoint, the evaluation table) are
partitioned by ``split`` alone; condition-level assets (conditions, auxiliary supports,
the checkpoint trained with them, the X-shot study) by ``split`` x ``condition``. Dagster
maps between the two through the shared ``split`` dimension.
"""

from __future__ import annotations

import re

import dagster as dg

# Folds each dataset defines (PASCAL-5i and COCO-20i: 4 folds; FSS-1000 has one fixed split;
# the embedded demo has four, like PASCAL-5i).
DATASET_FOLDS: dict[str, tuple[int, ...]] = {
    "demo": (0, 1, 2, 3),
    "pascal5i": (0, 1, 2, 3),
    "coco20i": (0, 1, 2, 3),
    "fss1000": (0,),
    "folder": (0,),
}
CONDITIONS: tuple[str, ...] = ("seg", "hed", "scribble")

DEMO_SPLIT = "demo_fold0"

_SPLIT_KEY = re.compile(r"^(?P<dataset>[a-z0-9]+)_fold(?P<fold>\d+)$")


def split_key(dataset: str, fold: int) -> str:
    return f"{dataset}_fold{fold}"


def parse_split_key(key: str) -> tuple[str, int]:
    """``"pascal5i_fold2"`` -> ``("pascal5i", 2)``."""
    match = _SPLIT_KEY.match(key)
    if not match or match["dataset"] not in DATASET_FOLDS:
        raise ValueError(f"partition key {key!r} is not <dataset>_fold<k> with dataset in {sorted(DATASET_FOLDS)}")
    return match["dataset"], int(match["fold"])


SPLIT_KEYS = [split_key(name, fold) for name, folds in DATASET_FOLDS.items() for fold in folds]

split_partitions = dg.StaticPartitionsDefinition(SPLIT_KEYS)
condition_partitions = dg.StaticPartitionsDefinition(list(CONDITIONS))
split_condition_partitions = dg.MultiPartitionsDefinition({"split": split_partitions, "condition": condition_partitions})


def condition_key(split: str, condition: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"split": split, "condition": condition})


def keys_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> tuple[str, str | None]:
    """(split, condition or None) of the partition being materialised or checked."""
    key = context.partition_key
    if isinstance(key, dg.MultiPartitionKey):
        return key.keys_by_dimension["split"], key.keys_by_dimension["condition"]
    if "|" in key:  # a multi-partition key that arrived as its string form
        parts = split_condition_partitions.get_partition_key_from_str(key)
        return parts.keys_by_dimension["split"], parts.keys_by_dimension["condition"]
    return key, None
