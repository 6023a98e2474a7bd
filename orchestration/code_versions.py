"""Code versions derived from the code an asset runs, never listed by hand.

An asset names its library entry points (the ``diffss`` functions its body calls, e.g.
``diffss.experiment.train_checkpoint``). The code it runs is the modules those functions live in
and everything they import, transitively, as grimp reads the import graph of ``diffss`` from the
source (imports inside functions included). Two rules complete the set:

- a module's parent packages run their ``__init__`` whenever it is imported, so their source
  counts (what an ``__init__`` imports does not, unless an entry point's code imports it too);
- a package's data files (shipped weights, class tables, split lists: every non-Python file in its
  folder outside its subpackages) are read by its code, so they count with the package.

:func:`code_version` hashes these files' bytes with the settings that decide the asset's output.
Editing one module changes the version of exactly the assets whose entry points reach it; the
granularity is the module (see docs/orchestration.md for what that means for settings modules).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import grimp

import diffss

PACKAGE = "diffss"
LIBRARY = Path(diffss.__file__).parent  # where sources are read (a test points it at an edited copy)


@functools.cache
def import_graph() -> grimp.ImportGraph:
    """The import graph of ``diffss`` (read once per process; only library modules, no externals)."""
    return grimp.build_graph(PACKAGE, cache_dir=None)


def entry_module(entry: Callable | str) -> str:
    """The module an entry point (a library function, or a module name) lives in."""
    name = entry if isinstance(entry, str) else getattr(entry, "__module__", None)
    if not name or not (name == PACKAGE or name.startswith(PACKAGE + ".")):
        raise ValueError(f"code version: {entry!r} is not a function or module of {PACKAGE}")
    if name not in import_graph().modules:
        raise ValueError(f"code version: module {name} is not in {PACKAGE}'s import graph")
    return name


def modules_run_by(entries: Iterable[Callable | str]) -> list[str]:
    """Every ``diffss`` module the entry points run: theirs, what those import transitively,
    and the parent packages of each (their ``__init__`` runs on import)."""
    graph = import_graph()
    modules: set[str] = set()
    for entry in entries:
        name = entry_module(entry)
        modules |= {name, *graph.find_upstream_modules(name)}
    for name in list(modules):
        parts = name.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return sorted(modules)


def module_files(module: str, library: Path) -> list[Path]:
    """The files whose bytes stand for ``module``: its source, and for a package its data files."""
    path = library.joinpath(*module.split(".")[1:])
    if not (path / "__init__.py").is_file():  # a plain module (conditions/tables.py beside a data folder tables/)
        return [path.with_suffix(".py")]
    files = [path / "__init__.py"]
    for file in sorted(path.rglob("*")):
        inner = file.relative_to(path).parts
        in_subpackage = any((path.joinpath(*inner[:i]) / "__init__.py").is_file() for i in range(1, len(inner)))
        if file.is_file() and file.suffix not in (".py", ".pyc") and "__pycache__" not in inner and not in_subpackage:
            files.append(file)
    return files


@functools.lru_cache(maxsize=4096)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_digest(modules: Iterable[str], library: Path | None = None) -> str:
    """sha256 over the relative path and bytes of every file standing for ``modules``."""
    library = library or LIBRARY
    digest = hashlib.sha256()
    for module in sorted(set(modules)):
        for file in module_files(module, library):
            if not file.is_file():
                raise FileNotFoundError(f"code version: {file} (module {module}) does not exist under {library}")
            stat = file.stat()
            digest.update(file.relative_to(library).as_posix().encode() + b"\0"
                          + _file_digest(file, stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


def code_version(entries: Iterable[Callable | str], settings: dict[str, Any]) -> str:
    """The code the entry points run and the settings that decide the output, as one short hash."""
    payload = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256((source_digest(modules_run_by(entries)) + payload).encode()).hexdigest()[:16]
