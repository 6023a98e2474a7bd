"""ADE20k palette and the class -> ADE20k index tables ControlNet's seg model needs.

ControlNet's segmentation model was trained on ADE20k label maps, so a seg condition must
paint the object in the ADE20k palette colour of the closest ADE20k class. The bundled CSVs
(``tables/``) are the palette and the benchmark mappings DifFSS's generator used.

Classes of the demo or a user folder have no curated mapping; :class:`ClassToAde` resolves
them by name (see :meth:`ClassToAde.index_for`): the ADE20k class of the same name, else the
same name in the benchmark tables, else a word of the name (last word first, since English
puts the head noun last: "police car" -> car), else :data:`FALLBACK_ADE_INDEX`.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path

TABLES_DIR = Path(__file__).resolve().parent / "tables"

#: ADE20k "plaything": the catch-all ControlNet4FSS used for COCO objects without an ADE20k
#: class of their own (kite, teddy bear, fork, ...), so unknown names get the same treatment.
FALLBACK_ADE_INDEX = 108

#: Dataset names (as ``diffss.data`` spells them) with a curated table, keyed by class id
#: (PASCAL, COCO) or by class folder (FSS-1000).
DATASET_TABLES = {
    "pascal5i": ("pascal_to_ade20k.csv", "class_id"),
    "coco20i": ("coco_to_ade20k.csv", "class_id"),
    "fss1000": ("fss1000_to_ade20k.csv", "class_folder"),
}


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"class -> ADE20k table not found: {path}")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        return list(reader)


def _int_field(row: Mapping[str, str], field: str, path: Path, lo: int | None = None, hi: int | None = None) -> int:
    try:
        value = int(str(row[field]).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{path}: field {field!r} is not an integer in row {dict(row)}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{path}: field {field!r}={value} outside [{lo}, {hi}] in row {dict(row)}")
    return value


@functools.lru_cache(maxsize=1)
def ade20k_palette() -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """The 150 ADE20k classes in index order: ``(name, (r, g, b))``."""
    path = TABLES_DIR / "ade20k_palette.csv"
    rows = _read_csv(path, ("ade_index", "ade_class", "r", "g", "b"))
    entries = {}
    for row in rows:
        idx = _int_field(row, "ade_index", path, 0)
        rgb = tuple(_int_field(row, c, path, 0, 255) for c in ("r", "g", "b"))
        entries[idx] = (row["ade_class"].strip(), rgb)
    if sorted(entries) != list(range(len(entries))):
        raise ValueError(f"{path}: ade_index values are not 0..{len(entries) - 1}")
    return tuple(entries[i] for i in range(len(entries)))


def ade_color(ade_index: int) -> tuple[int, int, int]:
    palette = ade20k_palette()
    if not 0 <= int(ade_index) < len(palette):
        raise ValueError(f"ade_index {ade_index} outside [0, {len(palette) - 1}]")
    return palette[int(ade_index)][1]


def _norm(name: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", name.lower()))


@functools.lru_cache(maxsize=1)
def _names_to_ade() -> dict[str, int]:
    """Normalised class name -> ADE index: ADE20k's own names, then PASCAL, COCO, FSS-1000."""
    names: dict[str, int] = {}
    for i, (name, _) in enumerate(ade20k_palette()):
        names.setdefault(_norm(name), i)
    for filename, _key in DATASET_TABLES.values():
        path = TABLES_DIR / filename
        for row in _read_csv(path, ("class_name", "ade_index")):
            if _norm(row["class_name"]) != "background":
                names.setdefault(_norm(row["class_name"]), _int_field(row, "ade_index", path, 0, 149))
    return names


def ade_index_for_name(name: str, fallback: int = FALLBACK_ADE_INDEX) -> int:
    """Best ADE20k index for a free-form class name (rule in the module docstring)."""
    names = _names_to_ade()
    full = _norm(name)
    if full in names:
        return names[full]
    words = full.split()
    for word in reversed(words):
        for candidate in (word, word[:-1] if word.endswith("s") and len(word) > 3 else None):
            if candidate and candidate in names:
                return names[candidate]
    return int(fallback)


class ClassToAde:
    """Maps a (class_id, class_name) to an ADE20k index.

    Sources, most specific first: an explicit mapping keyed by class id (int) or class name
    (str); then name resolution (:func:`ade_index_for_name`) with ``fallback``.
    """

    def __init__(self, by_id: Mapping[int, int] | None = None, by_name: Mapping[str, int] | None = None,
                 fallback: int = FALLBACK_ADE_INDEX, source: str = "names"):
        n = len(ade20k_palette())
        for key, value in {**(by_id or {}), **(by_name or {})}.items():
            if not 0 <= int(value) < n:
                raise ValueError(f"{source}: ADE index {value} for class {key!r} outside [0, {n - 1}]")
        self.by_id = {int(k): int(v) for k, v in (by_id or {}).items()}
        self.by_name = {_norm(k): int(v) for k, v in (by_name or {}).items()}
        self.fallback = int(fallback)
        self.source = source

    def index_for(self, class_id: int, class_name: str) -> int:
        if int(class_id) in self.by_id:
            return self.by_id[int(class_id)]
        if _norm(class_name) in self.by_name:
            return self.by_name[_norm(class_name)]
        return ade_index_for_name(class_name, self.fallback)

    @classmethod
    def for_dataset(cls, dataset_name: str | None) -> "ClassToAde":
        """The curated table of a benchmark, or name resolution for demo/folder datasets."""
        if dataset_name not in DATASET_TABLES:
            return cls(source=f"name resolution ({dataset_name or 'unknown dataset'})")
        filename, key = DATASET_TABLES[dataset_name]
        return cls.from_csv(TABLES_DIR / filename, key=key)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, key: str | None = None) -> "ClassToAde":
        """A CSV with ``ade_index`` and ``class_id`` or ``class_name``/``class_folder`` columns."""
        path = Path(path)
        rows = _read_csv(path, ("ade_index",))
        columns = set(rows[0]) if rows else set()
        if key is None:
            key = next((c for c in ("class_id", "class_folder", "class_name") if c in columns), None)
        if key is None or (rows and key not in columns):
            raise ValueError(f"{path}: needs a class_id, class_folder or class_name column next to ade_index")
        by_id, by_name = {}, {}
        for row in rows:
            ade = _int_field(row, "ade_index", path, 0)
            if key == "class_id":
                by_id[_int_field(row, "class_id", path)] = ade
            else:
                by_name[row[key]] = ade
                # FSS-1000 folders are snake_case ("assult_rifle"); samples may carry either form.
                if "class_name" in row and row["class_name"]:
                    by_name.setdefault(row["class_name"], ade)
        return cls(by_id=by_id, by_name=by_name, source=str(path))

    @classmethod
    def coerce(cls, value: "ClassToAde | Mapping | str | os.PathLike | None",
               dataset_name: str | None = None) -> "ClassToAde":
        """Accepts a ClassToAde, a dict ({class_id: ade} or {class_name: ade}), a CSV path, a
        benchmark name ("pascal5i", "coco20i", "fss1000") or None (the dataset's default)."""
        if value is None:
            return cls.for_dataset(dataset_name)
        if isinstance(value, ClassToAde):
            return value
        if isinstance(value, Mapping):
            by_id = {k: v for k, v in value.items() if isinstance(k, int)}
            by_name = {k: v for k, v in value.items() if isinstance(k, str)}
            if len(by_id) + len(by_name) != len(value):
                raise ValueError("class_to_ade dict keys must be class ids (int) or class names (str)")
            return cls(by_id=by_id, by_name=by_name, source="class_to_ade dict")
        if isinstance(value, str) and value in DATASET_TABLES:
            return cls.for_dataset(value)
        return cls.from_csv(value)
