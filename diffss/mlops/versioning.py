"""Data versioning of the pipeline's ``data/`` folder with DVC, through DVC's command line.

``publish_data`` snapshots ``data/`` into ``data.dvc`` (DVC's content hash of the folder) and pushes
the content to a DVC remote; ``pull_data`` restores ``data/`` byte for byte from ``data.dvc`` on
another clone. ``data_version`` computes the same content hash DVC writes into ``data.dvc`` for any
file or folder, so the orchestrator can use it as a data version without running DVC.

DVC is a tool in its own environment, not a library of diffss: its hydra-core pins an antlr4
runtime that Dagster's asset-selection grammar cannot load, so ``make`` installs it into
``.venv-dvc`` (from ``constraints-dvc.txt``) and links ``dvc`` beside this environment's Python.
:func:`dvc_executable` finds it (``DIFFSS_DVC``, then beside ``sys.executable``, then ``PATH``).
Every call runs the DVC CLI, whose failures are mapped to the named :class:`VersioningError`
subclasses below; analytics are off (``DVC_NO_ANALYTICS``).

Remote resolution (``remote=None``): the ``DIFFSS_DVC_REMOTE`` environment variable, else the
repository's default remote (``core.remote``; the project commits one under the user's cache,
``~/.cache/diffss/dvc-remote``, which DVC expands per user), else that same folder is added as the
default to ``.dvc/config``. Only that built-in folder is created on demand: any other local remote
folder must exist, because a missing one usually means an unmounted share and pushing elsewhere
would lose the data. A remote given as a path or URL is recorded in the uncommitted
``.dvc/config.local`` as ``diffss-override`` (DVC's CLI has no per-call remote URL).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REMOTE_ENV = "DIFFSS_DVC_REMOTE"
DVC_ENV = "DIFFSS_DVC"
DEFAULT_REMOTE_NAME = "diffss-local"
DEFAULT_REMOTE_URL = "~/.cache/diffss/dvc-remote"
_OVERRIDE_REMOTE_NAME = "diffss-override"
# Folders DVC itself never tracks inside an output (its default ignore patterns).
_SKIPPED_DIRS = frozenset({".git", ".hg", ".dvc"})
_CHUNK = 1 << 20
# A temporary file in a shared remote younger than this may belong to another clone's running push.
REMOTE_TMP_MAX_AGE_S = 3600


class VersioningError(RuntimeError):
    """A DVC publish/pull step failed; the message names the file, remote or lock at fault."""


class RemoteUnavailableError(VersioningError):
    """The DVC remote is missing, unreachable, misconfigured, or lacks the requested data."""


class RepoLockedError(VersioningError):
    """Another process holds the DVC repository lock (``.dvc/tmp/lock``)."""


class CorruptCacheError(VersioningError):
    """A DVC cache object's content does not match its hash (it was removed so a retry refetches)."""


class MissingDataError(VersioningError, FileNotFoundError):
    """The data folder, the ``.dvc`` file or cache objects it names do not exist."""


# --------------------------------------------------------------------------- content hashes

# md5 of a file keyed by (path, size, mtime_ns, inode, device): the same trick as DVC's state db,
# so repeated data_version calls on unchanged files do not re-read them. Atomic writes replace the
# inode, so a rewritten file always misses the memo.
_MD5_MEMO: dict[tuple, str] = {}


def file_md5(path: str | os.PathLike, *, memo: bool = True) -> str:
    """Hex md5 of a file's bytes (DVC 3 hashes file content as is, no line-ending normalisation)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if memo and key in _MD5_MEMO:
        return _MD5_MEMO[key]
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fobj:
        while chunk := fobj.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo:
        _MD5_MEMO[key] = value
    return value


def _dir_entries(root: Path, *, memo: bool = True) -> list[dict[str, str]]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for name in filenames:
            if name == ".git":
                continue
            full = Path(dirpath, name)
            entries.append({"md5": file_md5(full, memo=memo), "relpath": full.relative_to(root).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return entries


def _dir_digest(entries: list[dict[str, str]]) -> str:
    # DVC's directory hash: md5 of the JSON list of {md5, relpath} sorted by relpath, plus ".dir".
    payload = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(payload, usedforsecurity=False).hexdigest() + ".dir"


def data_version(path: str | os.PathLike) -> str:
    """Content hash of a file (``<md5>``) or folder (``<md5>.dir``), equal to what DVC records.

    For ``data/`` right after :func:`publish_data` (or :func:`pull_data`) this equals the ``md5``
    in ``data.dvc``; for any sub-folder it is the hash DVC would give it. Depends only on the
    bytes and relative paths of the files (not on mtimes), so a restored folder has the version
    it had when published. ``.dvcignore`` patterns are not applied.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if path.is_dir():
        return _dir_digest(_dir_entries(path))
    raise FileNotFoundError(f"data_version: {path} does not exist")


def published_version(repo_root: str | os.PathLike, data_dir: str = "data") -> str | None:
    """The md5 recorded in ``<data_dir>.dvc`` (the last published version), or None if untracked."""
    dvc_file = Path(repo_root) / f"{data_dir}.dvc"
    if not dvc_file.is_file():
        return None
    return _read_dvc_out(dvc_file)["md5"]


def _read_dvc_out(dvc_file: Path) -> dict[str, Any]:
    import yaml

    try:
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
        return {"md5": str(out["md5"]), "size": out.get("size"), "nfiles": out.get("nfiles")}
    except Exception as exc:  # malformed YAML, missing keys: name the file
        raise VersioningError(f"{dvc_file}: not a valid DVC file with an 'outs[0].md5' entry ({exc})") from exc


# --------------------------------------------------------------------------- the DVC command line


def dvc_executable() -> str:
    """The ``dvc`` of the tool environment: ``DIFFSS_DVC``, beside this Python, or on ``PATH``."""
    candidates = [os.environ.get(DVC_ENV), str(Path(sys.executable).with_name("dvc")), shutil.which("dvc")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise VersioningError(
        "the dvc command was not found: `make install` builds it in .venv-dvc and links it as .venv/bin/dvc "
        f"(or set {DVC_ENV} to a dvc executable)"
    )


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``root``; a failure raises the matching named error."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_IGNORE_ISATTY": "true"}
    result = subprocess.run([dvc_executable(), *args], cwd=root, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise _error_of(root, args, result)
    return result


def _error_of(root: Path, args: tuple[str, ...], result: subprocess.CompletedProcess) -> VersioningError:
    message = " ".join(line.strip() for line in result.stderr.splitlines() if line.strip()
                       and not line.startswith("Having any troubles?"))
    command = f"dvc {' '.join(args)} (in {root})"
    if "Unable to acquire lock" in message:
        lock_file = root / ".dvc" / "tmp" / "lock"
        holder = ""
        with contextlib.suppress(OSError):
            pid = lock_file.read_text().strip()
            holder = f" (held by pid {pid})" if pid else ""
        return RepoLockedError(
            f"DVC repository lock {lock_file} is held by another process{holder}; run one DVC step at a "
            "time (delete the file only if no DVC process is running)"
        )
    if re.search(r"is supported, but requires|Unsupported URL type|failed to (push|pull|fetch)|remote '.*' doesn't exist",
                 message):
        return RemoteUnavailableError(f"{command} failed: {message}")
    return VersioningError(f"{command} failed: {message}")


def _transferred(output: str) -> int:
    """Objects moved by push/fetch, from DVC's summary line ("3 files pushed", "1 file fetched")."""
    match = re.search(r"(\d+) files? (pushed|fetched)", output)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------- repository setup


def default_remote_dir() -> Path:
    """The built-in default remote, ``~/.cache/diffss/dvc-remote`` for the current user."""
    return Path(os.path.expanduser(DEFAULT_REMOTE_URL))


def _git_root_of(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


def ensure_dvc_repo(repo_root: str | os.PathLike) -> Path:
    """Run ``dvc init`` in ``repo_root`` unless ``.dvc/`` exists; returns the absolute root.

    Inside a git work tree DVC stages ``.dvc/config``, ``.dvc/.gitignore`` and ``.dvcignore`` in git
    (``dvc init``'s own behaviour); outside git the repo is created with ``--no-scm``.
    """
    root = Path(repo_root).resolve()
    if not root.is_dir():
        raise MissingDataError(f"repository root {root} is not a directory")
    if not (root / ".dvc").is_dir():
        git_root = _git_root_of(root)
        flags = ["--no-scm"] if git_root is None else (["--subdir"] if git_root != root else [])
        _dvc(root, "init", "--quiet", *flags)
    return root


def _config(root: Path) -> dict[str, str]:
    """DVC's merged configuration (``dvc config --list``: repo, then local; the last value wins)."""
    lines = _dvc(root, "config", "--list").stdout.splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _looks_like_url(remote: str) -> bool:
    return "://" in remote or "/" in remote or os.sep in remote or remote.startswith(("~", "."))


def _normalise_url(remote: str, root: Path) -> str:
    if remote.startswith("file://"):
        remote = remote[len("file://"):]
    if "://" in remote:
        return remote
    path = Path(os.path.expanduser(remote))
    return str(path if path.is_absolute() else (root / path).resolve())


def _resolve_remote(root: Path, remote: str | None) -> tuple[str, str]:
    """(remote name, url) to push to / fetch from; see the module doc for the order."""
    config = _config(root)
    remotes = {key[len("remote."):-len(".url")]: url for key, url in config.items()
               if key.startswith("remote.") and key.endswith(".url")}
    remote = remote or os.environ.get(REMOTE_ENV) or None
    if remote is not None:
        if remote in remotes and not _looks_like_url(remote):
            return remote, remotes[remote]
        if not _looks_like_url(remote):
            raise RemoteUnavailableError(
                f"DVC remote {remote!r} is not configured in {root / '.dvc'} "
                f"(configured: {sorted(remotes) or 'none'}); pass a URL or a local path instead"
            )
        url = _normalise_url(remote, root)
        _dvc(root, "remote", "add", "--local", "--force", _OVERRIDE_REMOTE_NAME, url)
        return _OVERRIDE_REMOTE_NAME, url
    default = config.get("core.remote")
    if default:
        if default not in remotes:
            raise RemoteUnavailableError(f"{root / '.dvc' / 'config'}: core.remote names {default!r}, which is not defined")
        return default, remotes[default]
    _dvc(root, "remote", "add", "--default", DEFAULT_REMOTE_NAME, DEFAULT_REMOTE_URL)
    return DEFAULT_REMOTE_NAME, str(default_remote_dir())


def _check_remote(name: str, url: str, *, for_push: bool) -> None:
    """Fail early if a local remote folder cannot be used (DVC would create a missing one)."""
    if "://" in url:
        return
    path = Path(url)
    if not path.is_dir() and path == default_remote_dir():
        path.mkdir(parents=True, exist_ok=True)  # the built-in default only
    if not path.is_dir():
        raise RemoteUnavailableError(
            f"DVC remote {name!r}: directory {path} does not exist (create it, or set {REMOTE_ENV} / "
            f"pass remote= to use another remote)"
        )
    if for_push and not os.access(path, os.W_OK | os.X_OK):
        raise RemoteUnavailableError(f"DVC remote {name!r}: directory {path} is not writable")


def _cache_dir(root: Path) -> Path:
    configured = _config(root).get("cache.dir")
    return (root / ".dvc" / configured).resolve() if configured else root / ".dvc" / "cache"


# --------------------------------------------------------------------------- temporaries


@contextlib.contextmanager
def _unlocked(root: Path) -> Iterator[bool]:
    """Whether no DVC process holds the repository lock (held by us for the block if so)."""
    lock_file = root / ".dvc" / "tmp" / "lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temporaries(root: str | os.PathLike, remote_url: str | None = None) -> list[Path]:
    """Remove the ``*.tmp`` files a killed DVC left in the cache (and in a local remote folder).

    DVC writes every object to ``<dir>/.<random>.tmp`` and renames it into place; a kill leaves the
    temporary behind forever. Cache temporaries go when no DVC process holds the repository lock;
    those in a local remote (shared by clones) when older than ``REMOTE_TMP_MAX_AGE_S``, so a push
    running elsewhere is never cut short. Returns the removed files.
    """
    root = Path(root).resolve()
    removed: list[Path] = []
    folders: list[tuple[Path, float]] = []
    with _unlocked(root) as free:
        if free:
            folders.append((_cache_dir(root), 0.0))
        if remote_url and "://" not in remote_url:
            folders.append((Path(remote_url), REMOTE_TMP_MAX_AGE_S))
        now = time.time()
        for folder, max_age in folders:
            if not folder.is_dir():
                continue
            for path in folder.rglob("*.tmp"):
                with contextlib.suppress(OSError):
                    if path.is_file() and now - path.stat().st_mtime >= max_age:
                        path.unlink()
                        removed.append(path)
    return removed


# --------------------------------------------------------------------------- cache verification


def _verify_cache(cache: Path, oid: str, *, source: str) -> None:
    """Check every cache object of ``oid`` exists and hashes to its name.

    Corrupt objects are deleted before raising: they are content-addressed copies (of the workspace
    or the remote), so removing them lets a retry recreate them instead of tripping again.
    """
    missing: list[str] = []
    corrupt: list[Path] = []

    def check(object_oid: str, label: str) -> bool:
        path = cache / "files" / "md5" / object_oid[:2] / object_oid[2:]
        if not path.is_file():
            missing.append(f"{label} ({path})")
            return False
        if file_md5(path, memo=False) != object_oid.removesuffix(".dir"):
            corrupt.append(path)
            return False
        return True

    if check(oid, "directory listing") and oid.endswith(".dir"):
        listing = json.loads((cache / "files" / "md5" / oid[:2] / oid[2:]).read_text())
        for entry in listing:
            check(entry["md5"], entry["relpath"])
    if corrupt:
        for path in corrupt:
            with contextlib.suppress(OSError):
                path.chmod(0o644)
                path.unlink()
        shown = ", ".join(str(p) for p in corrupt[:5]) + (" ..." if len(corrupt) > 5 else "")
        raise CorruptCacheError(
            f"{len(corrupt)} DVC cache object(s) do not match their md5 ({shown}); they were removed "
            f"from the cache, the data folder was not touched; retry to recreate them from {source}"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingDataError(f"{len(missing)} object(s) missing from the DVC cache after reading {source}: {shown}")


# --------------------------------------------------------------------------- publish / pull


def _summary(root: Path, dvc_file: Path, name: str, url: str, transferred: int, started: float) -> dict[str, Any]:
    out = _read_dvc_out(dvc_file)
    return {
        "dvc_file": dvc_file.relative_to(root).as_posix(),
        "md5": out["md5"],
        "nfiles": int(out["nfiles"]) if out["nfiles"] is not None else 1,
        "size": int(out["size"]) if out["size"] is not None else None,
        "remote": name,
        "remote_url": url,
        "transferred": int(transferred),
        "seconds": round(time.monotonic() - started, 3),
    }


def publish_data(repo_root: str | os.PathLike, data_dir: str = "data", remote: str | None = None) -> dict[str, Any]:
    """Snapshot ``<repo_root>/<data_dir>`` into ``<data_dir>.dvc`` and push it to a DVC remote.

    Runs ``dvc init`` if needed, resolves the remote (see module doc; ``remote`` may be a configured
    remote name, a local path or a URL such as ``s3://bucket/prefix``), checks the remote is usable
    before anything is written, removes stale DVC temporaries, then runs ``dvc add``, verifies the
    cache objects, and ``dvc push``. Commit ``<data_dir>.dvc`` (and ``.dvc/config``) to git to make
    the version reproducible elsewhere.

    Returns JSON-able metadata: ``dvc_file``, ``md5`` (of the folder, as in the .dvc file),
    ``nfiles``, ``size`` (bytes), ``remote`` (name), ``remote_url``, ``transferred`` (objects
    uploaded this time), ``seconds``.

    Raises :class:`RemoteUnavailableError`, :class:`RepoLockedError`, :class:`CorruptCacheError`,
    :class:`MissingDataError` or :class:`VersioningError`; the data folder is never modified.
    """
    started = time.monotonic()
    root = ensure_dvc_repo(repo_root)
    data_path = root / data_dir
    if not data_path.exists():
        raise MissingDataError(f"publish_data: data folder {data_path} does not exist")
    name, url = _resolve_remote(root, remote)
    _check_remote(name, url, for_push=True)
    remove_stale_temporaries(root, url)
    _dvc(root, "add", data_dir)
    dvc_file = root / f"{data_dir}.dvc"
    _verify_cache(_cache_dir(root), _read_dvc_out(dvc_file)["md5"], source=f"the workspace ({data_path})")
    pushed = _dvc(root, "push", "--remote", name, dvc_file.name)
    return _summary(root, dvc_file, name, url, _transferred(pushed.stdout), started)


def pull_data(
    repo_root: str | os.PathLike, data_dir: str = "data", remote: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Restore ``<repo_root>/<data_dir>`` to the version recorded in ``<data_dir>.dvc``.

    Fetches the objects from the remote into the DVC cache, verifies their md5s, then checks the
    folder out (files not in the version are removed). With ``force=False`` local changes that are
    not in the DVC cache make it fail instead of being overwritten. Afterwards the folder's
    :func:`data_version` is checked against the ``.dvc`` file. Returns the same metadata as
    :func:`publish_data` (``transferred`` = objects downloaded). Errors before the checkout leave
    the data folder untouched.
    """
    started = time.monotonic()
    root = Path(repo_root).resolve()
    dvc_file = root / f"{data_dir}.dvc"
    if not dvc_file.is_file():
        raise MissingDataError(f"pull_data: {dvc_file} does not exist (publish_data writes it; commit it to git)")
    expected = _read_dvc_out(dvc_file)["md5"]
    ensure_dvc_repo(root)
    name, url = _resolve_remote(root, remote)
    _check_remote(name, url, for_push=False)
    remove_stale_temporaries(root, url)
    fetched = _dvc(root, "fetch", "--remote", name, dvc_file.name)
    _verify_cache(_cache_dir(root), expected, source=f"remote {name!r} ({url})")
    try:
        _dvc(root, "checkout", *(["--force"] if force else []), dvc_file.name)
    except RepoLockedError:
        raise
    except VersioningError as exc:
        raise VersioningError(f"{exc} (local changes under {root / data_dir} are kept unless pull_data(force=True))") from exc
    actual = data_version(root / data_dir)
    if actual != expected:
        raise VersioningError(f"{root / data_dir} after pull hashes to {actual}, but {dvc_file.name} records {expected}")
    return _summary(root, dvc_file, name, url, _transferred(fetched.stdout), started)
