"""One base class for configs (training and generation), and one "is this folder the same run?" check.

Every config (segmenter, base learner, generator training, generation) is a dataclass (pydantic or plain)
deriving from :class:`JsonConfig`: ``from_dict(cfg.to_dict()) == cfg`` and the JSON file a run
writes is ``to_dict()``. ``RUNTIME_FIELDS`` name the fields that change where or how fast a run
goes, not its result; ``RESUMABLE_FIELDS`` the ones a rerun into the same folder may change
(``steps``: a finished run continues to the larger count). Two configs describe the same run when
they differ in those fields only (:meth:`JsonConfig.same_run_as`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from diffss.core.atomic import write_text_atomic


class JsonConfig:
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ()
    RESUMABLE_FIELDS: ClassVar[tuple[str, ...]] = ("steps",)
    # How to_json orders keys. Generation settings are written sorted (the files beside earlier
    # images are, and their bytes are hashed into data versions); training configs in field order.
    SORT_KEYS: ClassVar[bool] = False
    # Settings that were removed: name -> what replaced it. Files written before may still hold
    # them (drop_removed_fields): at null they did nothing and are dropped, any other value is refused.
    REMOVED_FIELDS: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON gives them back (tuples as lists), so a dict read from the run's
        file compares equal to one of a live config."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None):
        data = drop_removed_fields(data, cls.REMOVED_FIELDS, source or cls.__name__)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source or cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**cls._coerce(dict(data)))

    @classmethod
    def _coerce(cls, data: dict[str, Any]) -> dict[str, Any]:
        """JSON values to field types where the dataclass does not convert them itself."""
        return data

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike):
        """From a JSON file, or from JSON text (a string that starts with ``{``); every error
        names the file (or says the text was given)."""
        if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
            text, source = path_or_text, f"{cls.__name__} JSON"
        else:
            path = Path(path_or_text)
            source = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"{cls.__name__} file not found: {path}")
            try:
                text = path.read_text()
            except (OSError, ValueError) as exc:  # ValueError: not UTF-8
                raise ValueError(f"{path}: cannot read {cls.__name__} ({exc})") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{source}: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a {cls.__name__} file holds a JSON object, not {type(data).__name__}")
        return cls.from_dict(data, source=source)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON text (``SORT_KEYS``: keys in name order, else in field order); with ``path``
        also written there atomically, with a final newline."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=self.SORT_KEYS)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    def output_settings(self) -> dict[str, Any]:
        """The fields that determine the result (everything but ``RUNTIME_FIELDS``)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}

    def differences(self, other: "JsonConfig | dict[str, Any]") -> list[str]:
        """Result-deciding fields whose values differ from ``other``'s: neither ``RUNTIME_FIELDS``
        (a run may resume on another device, from a moved folder) nor ``RESUMABLE_FIELDS``."""
        mine = self.to_dict()
        theirs = other.to_dict() if isinstance(other, JsonConfig) else json.loads(json.dumps(other))
        return sorted(k for k in set(mine) | set(theirs)
                      if k not in self.RESUMABLE_FIELDS and k not in self.RUNTIME_FIELDS and mine.get(k) != theirs.get(k))

    def same_run_as(self, other: "JsonConfig | dict[str, Any]") -> bool:
        return not self.differences(other)


def drop_removed_fields(data: dict[str, Any], removed: dict[str, str], source: str) -> dict[str, Any]:
    """``data`` without the ``removed`` settings an older file may still hold: one left at null
    (it did nothing) is dropped silently; any other value is refused, naming ``source`` and saying
    what replaced it (a setting that no longer acts must not be ignored silently)."""
    for name in sorted(set(removed) & set(data)):
        if data[name] is not None:
            raise ValueError(f"{source}: {name}={data[name]!r} is no longer a setting: {removed[name]}; "
                             f"remove it (null is accepted and ignored)")
    return {k: v for k, v in data.items() if k not in removed}


def check_same_run(config: JsonConfig, saved: Path, out: Path) -> None:
    """Refuse to continue the run in ``out`` (its config file ``saved``) with other settings."""
    previous = type(config).from_json(saved)
    changed = config.differences(previous)
    if changed:
        detail = ", ".join(f"{k}: {previous.to_dict().get(k)!r} -> {config.to_dict().get(k)!r}" for k in changed[:5])
        raise ValueError(f"{out} holds a run with a different {type(config).__name__} (other settings: {detail}); "
                         f"use a new output_dir or delete {out}")
