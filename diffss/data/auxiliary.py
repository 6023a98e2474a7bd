"""Diffusion-generated auxiliary supports, looked up per real support from the generation table."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from .samples import DatasetError

REQUIRED_COLUMNS = ("support_name", "class_id", "aux_index", "path")
#: Why ``max_drift`` (of the training, evaluation and experiment settings) is refused: it filtered
#: auxiliary images by drift at training time; selection now happens where the images are made.
MAX_DRIFT_REPLACED = ("the drift filter was replaced by GenerationConfig.candidates (over-generate and keep the "
                      "best num_aux images per support by appearance); drift stays in the table as a layout score")


class AuxiliarySupports:
    """Map (support name, class id) -> its auxiliary images, in ``aux_index`` order.

    ``root`` is the folder the table's relative paths are resolved against; names returned by
    ``name_of`` are paths relative to it (the aux image's id in episode ``support_names``).
    """

    def __init__(self, entries: Mapping[tuple[str, int], Sequence[Path]], source: str = "<memory>",
                 root: str | os.PathLike | None = None):
        self.source = str(source)
        self.root = Path(root) if root is not None else None
        self._entries = {(str(n), int(c)): [Path(p) for p in paths] for (n, c), paths in entries.items()}

    @classmethod
    def from_table(cls, path: str | os.PathLike, condition: str | Sequence[str] | None = None,
                   dataset: str | None = None) -> "AuxiliarySupports":
        """Read the generation parquet; keep rows of ``condition``(s) and ``dataset``.

        A table with a ``kept`` column (over-generated candidates, see diffss.generation.run) gives
        only its kept rows, best ``rank`` first: the selection is made at generation time
        (``GenerationConfig.candidates``), not here. Older tables give every row in ``aux_index`` order.
        """
        import pandas as pd

        path = Path(path)
        try:
            table = pd.read_parquet(path)
        except FileNotFoundError:
            raise DatasetError(f"missing auxiliary table: {path}", path) from None
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DatasetError(f"unreadable auxiliary table {path}: {exc}", path) from exc
        needed = list(REQUIRED_COLUMNS)
        needed += ["condition"] if condition is not None else []
        needed += ["dataset"] if dataset is not None else []
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise DatasetError(f"auxiliary table {path} lacks column(s) {missing}", path)

        def keep_only(column: str, wanted: Sequence[str]) -> None:
            nonlocal table
            kept = table[table[column].isin(wanted)]
            if kept.empty and not table.empty:
                raise DatasetError(
                    f"auxiliary table {path} has no rows with {column} in {list(wanted)} "
                    f"(it has {sorted(map(str, table[column].unique()))})", path)
            table = kept

        if condition is not None:
            keep_only("condition", [condition] if isinstance(condition, str) else list(condition))
        if dataset is not None:
            keep_only("dataset", [dataset])
        if "kept" in table.columns:
            table = table[table["kept"].astype(bool)]
        first = "rank" if "rank" in table.columns else "aux_index"
        order = [first] + (["condition"] if "condition" in table.columns else []) + ["path"]
        table = table.sort_values(order, kind="stable")

        entries: dict[tuple[str, int], list[Path]] = {}
        for name, class_id, rel in zip(table["support_name"], table["class_id"], table["path"]):
            rel = Path(str(rel))
            entries.setdefault((str(name), int(class_id)), []).append(rel if rel.is_absolute() else path.parent / rel)
        return cls(entries, source=str(path), root=path.parent)

    def for_support(self, support_name: str, class_id: int) -> list[Path]:
        """Aux image paths of one real support (empty if it has none)."""
        return list(self._entries.get((str(support_name), int(class_id)), ()))

    def name_of(self, path: Path) -> str:
        """Stable id of an aux image: its path relative to the table's folder."""
        if self.root is not None:
            try:
                return Path(path).relative_to(self.root).as_posix()
            except ValueError:
                pass
        return Path(path).as_posix()

    def require(self, support_name: str, class_id: int, count: int) -> list[Path]:
        """The first ``count`` aux images of a support, or a DatasetError naming it and the table."""
        paths = self.for_support(support_name, class_id)
        if len(paths) < count:
            raise DatasetError(
                f"support {support_name!r} (class {class_id}) has {len(paths)} auxiliary image(s) in "
                f"{self.source}, {count} needed", self.source)
        return paths[:count]

    @staticmethod
    def needed_per_support(aux_shot: int, shot: int, position: int) -> int:
        """How many aux images the real support at ``position`` (0..shot-1) contributes."""
        return aux_shot // shot + (1 if position < aux_shot % shot else 0)

    @staticmethod
    def max_needed(aux_shot: int, shot: int) -> int:
        return math.ceil(aux_shot / shot)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def __repr__(self) -> str:
        return f"AuxiliarySupports({len(self)} supports, {self.num_images} images, source={self.source!r})"
