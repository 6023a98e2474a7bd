"""Training checkpoints as atomic units: one folder per step, complete or absent.

A checkpoint is written into a temporary folder beside the others; a manifest naming the step
and every file with its size and SHA-256 is written last, the files are flushed to disk, and the
folder is renamed to ``step-00000050``. The rename is the commit: a process killed at any moment
leaves the earlier checkpoints intact and at worst a ``.step-*.tmp`` folder, which the next
:class:`CheckpointDir` removes. Weights and optimizer state can never come from different steps.

Loading verifies the manifest. A checkpoint whose files do not match it (truncated, edited,
bit rot) is moved aside as ``step-*.corrupt`` and the previous one is used; when none is
valid, :class:`CheckpointError` names the bad file.

    ckpts = CheckpointDir(out / "checkpoints", keep=2)
    ckpts.clean()                                  # temporaries of a killed run
    ckpts.save(step, write=model.save_pretrained, objects={"trainer_state.pt": state})
    latest = ckpts.latest()                        # verified, or None
    state = latest.load("trainer_state.pt")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from diffss.core.atomic import atomic_path, remove_stale_temporaries

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "diffss-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; ``path`` is the file or folder that is wrong."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def _digest(path: Path, sync: bool = False) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
        if sync:  # flushes the file's pages whatever mode the descriptor was opened in
            os.fsync(f.fileno())
    return sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


@dataclass(frozen=True)
class Checkpoint:
    """A committed, verified checkpoint folder."""

    path: Path
    step: int
    meta: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no file {name!r}", self.path)
        return path

    def load(self, name: str, map_location: Any = "cpu", weights_only: bool = True) -> Any:
        """An object written with ``save(objects={name: ...})`` (``torch.load``)."""
        import torch

        return torch.load(self.file(name), map_location=map_location, weights_only=weights_only)

    def publish(self, names: list[str] | tuple[str, ...], target: str | os.PathLike) -> None:
        """Place these files in ``target`` (hard link, else copy), each by an atomic rename, in
        the given order (put the file that marks the set as complete last)."""
        target = Path(target)
        for name in names:
            source = self.file(name)
            if (target / name).exists() and os.path.samefile(source, target / name):
                continue  # already linked (rename onto a link of the same file would be a no-op)
            with atomic_path(target / name) as tmp:
                tmp.unlink()
                try:
                    os.link(source, tmp)
                except OSError:  # another filesystem, or no hard links there
                    shutil.copyfile(source, tmp)


class CheckpointDir:
    """The checkpoints of one run under ``root``: ``step-XXXXXXXX/`` folders, the newest ``keep``
    kept. One writer per folder (a second run on the same folder would remove its temporaries)."""

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = int(keep)

    # ---- listing --------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the committed checkpoint folders, ascending (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def path_of(self, step: int) -> Path:
        return self.root / f"step-{int(step):08d}"

    # ---- writing --------------------------------------------------------------------------
    def clean(self) -> int:
        """Remove what a killed ``save`` left (``.step-*.tmp`` folders, atomic-write temporaries);
        returns how many entries were removed."""
        if not self.root.is_dir():
            return 0
        removed = remove_stale_temporaries(self.root, recursive=False)
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith(".step-") and path.name.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed

    def save(self, step: int, write: Callable[[Path], Any] | None = None, *,
             objects: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> Checkpoint:
        """Commit checkpoint ``step``: ``write(folder)`` fills a fresh folder with any files (e.g.
        ``model.save_pretrained``), then each of ``objects`` is written there with ``torch.save``
        under its name; the manifest goes last and the folder is renamed into place. An existing
        checkpoint of the same step is replaced; older ones beyond ``keep`` are removed."""
        step = int(step)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_of(step)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.root))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the committed folder from other readers
            if write is not None:
                write(tmp)
            if objects:
                import torch

                for name, obj in objects.items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    torch.save(obj, tmp / name)
            files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _digest(p, sync=True)}
                     for p in _files(tmp)}
            manifest = {"format": FORMAT, "step": step, "meta": dict(meta or {}), "files": files}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            for sub in sorted({p.parent for p in _files(tmp)}, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(sub)
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step: the old copy goes to a temporary name first
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.root))
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old_step in self.steps()[:-self.keep]:
            shutil.rmtree(self.path_of(old_step), ignore_errors=True)
        return Checkpoint(final, step, dict(meta or {}))

    # ---- reading --------------------------------------------------------------------------
    def verify(self, step: int) -> Checkpoint:
        """The checkpoint of ``step`` if every file matches its manifest, else CheckpointError."""
        folder = self.path_of(step)
        manifest_path = folder / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}", manifest_path) from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"unreadable manifest {manifest_path}: {exc}", manifest_path) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("step") != step:
            raise CheckpointError(f"{manifest_path} is not a {FORMAT} manifest of step {step}", manifest_path)
        listed = manifest.get("files") or {}
        present = {p.relative_to(folder).as_posix() for p in _files(folder)}
        extra = sorted(present - set(listed))
        if extra:
            raise CheckpointError(f"{folder / extra[0]} is not listed in {manifest_path}", folder / extra[0])
        for name, entry in sorted(listed.items()):
            path = folder / name
            if name not in present:
                raise CheckpointError(f"{path} is missing (listed in {manifest_path})", path)
            if path.stat().st_size != entry.get("bytes") or _digest(path) != entry.get("sha256"):
                raise CheckpointError(f"{path} does not match its manifest {manifest_path} "
                                      f"(size or SHA-256 differ: changed after it was written)", path)
        return Checkpoint(folder, step, dict(manifest.get("meta") or {}))

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies. Newer ones that do not are moved aside
        (``step-*.corrupt-<time>``) with a warning: the run resumes from the one before. None if
        there is no checkpoint; CheckpointError (nothing moved) if there are some but none verifies."""
        bad: list[CheckpointError] = []
        for step in reversed(self.steps()):
            try:
                good = self.verify(step)
            except CheckpointError as exc:
                bad.append(exc)
                continue
            for exc in bad:
                folder = self.root / exc.path.relative_to(self.root).parts[0]
                aside = folder.with_name(f"{folder.name}.corrupt-{time.time_ns()}")
                os.replace(folder, aside)
                log.warning("%s; moved to %s, resuming from step %d", exc, aside, good.step)
            return good
        if bad:
            raise CheckpointError(f"no valid checkpoint under {self.root}: {bad[0]} (remove {self.root} "
                                  f"to start over)", bad[0].path)
        return None
