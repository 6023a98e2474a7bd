"""Data versioning of the pipeline's ``data/`` folder with DVC.

``publish_data`` snapshots ``data/`` into ``data.dvc`` (DVC's content hash of the folder) and pushes
the content to a DVC remote; ``pull_data`` restores ``data/`` byte for byte from ``data.dvc`` on
another clone. ``data_version`` computes the same content hash DVC writes into ``data.dvc`` for any
file or folder, so the orchestrator can use it as a data version.

DVC's Python API (``dvc.repo.Repo``) is used in-process rather than the CLI: it raises typed
exceptions (lock held, failed transfers) that are mapped to :class:`VersioningError` subclasses
here, and it never sends the CLI's usage analytics.

Remote resolution (``remote=None``): the ``DIFFSS_DVC_REMOTE`` environment variable, else the
repository's configured default remote (``core.remote`` in ``.dvc/config``/``config.local``), else
a local folder ``$XDG_CACHE_HOME/diffss/dvc-remote`` (``~/.cache/...``), which is then recorded in
``.dvc/config.local`` (machine-specific, not committed) so plain ``dvc push``/``dvc pull`` agree.
Only that built-in default folder is created on demand: any other local remote folder must exist,
because a missing one usually means an unmounted share and pushing elsewhere would lose the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

REMOTE_ENV = "DIFFSS_DVC_REMOTE"
DEFAULT_REMOTE_NAME = "diffss-local"
# Name given to a remote passed as a URL/path: it lives only in memory for the call.
_OVERRIDE_REMOTE_NAME = "diffss-override"
# Folders DVC itself never tracks inside an output (its default ignore patterns).
_SKIPPED_DIRS = frozenset({".git", ".hg", ".dvc"})
_CHUNK = 1 << 20


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
            rel = full.relative_to(root).as_posix()
            entries.append({"md5": file_md5(full, memo=memo), "relpath": rel})
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
    from dvc.utils.serialize import load_yaml

    try:
        doc = load_yaml(str(dvc_file))
        out = doc["outs"][0]
        return {"md5": str(out["md5"]), "size": out.get("size"), "nfiles": out.get("nfiles")}
    except Exception as exc:  # malformed YAML, missing keys: name the file
        raise VersioningError(f"{dvc_file}: not a valid DVC file with an 'outs[0].md5' entry ({exc})") from exc


# --------------------------------------------------------------------------- repository setup


def default_remote_dir() -> Path:
    """Built-in default remote: ``$XDG_CACHE_HOME/diffss/dvc-remote`` (``~/.cache/...``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "diffss" / "dvc-remote"


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
    if (root / ".dvc").is_dir():
        return root
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    git_root = _git_root_of(root)
    try:
        if git_root is None:
            repo = Repo.init(str(root), no_scm=True)
        else:
            repo = Repo.init(str(root), subdir=git_root != root)
        repo.close()
    except DvcException as exc:
        raise VersioningError(f"dvc init in {root} failed: {exc}") from exc
    return root


def _normalise_url(remote: str, root: Path) -> str:
    if remote.startswith("file://"):
        remote = remote[len("file://") :]
    if "://" in remote:
        return remote
    path = Path(os.path.expanduser(remote))
    return str(path if path.is_absolute() else (root / path).resolve())


def _looks_like_url(remote: str) -> bool:
    return "://" in remote or "/" in remote or os.sep in remote or remote.startswith(("~", "."))


def _resolve_remote(root: Path, remote: str | None, *, create_default: bool) -> tuple[str, str, dict | None]:
    """Return (remote name, url, in-memory config override or None)."""
    from dvc.config import ConfigError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            remotes = {name: dict(conf) for name, conf in repo.config["remote"].items()}
            configured_default = repo.config["core"].get("remote")
    except ConfigError as exc:
        raise VersioningError(f"{root / '.dvc' / 'config'}: invalid DVC configuration ({exc})") from exc

    if remote is None:
        remote = os.environ.get(REMOTE_ENV) or None
    if remote is not None:
        if remote in remotes and not _looks_like_url(remote):
            return remote, str(remotes[remote].get("url")), None
        if not _looks_like_url(remote):
            raise RemoteUnavailableError(
                f"DVC remote {remote!r} is not configured in {root / '.dvc'} "
                f"(configured: {sorted(remotes) or 'none'}); pass a URL or a local path instead"
            )
        url = _normalise_url(remote, root)
        override = {"remote": {_OVERRIDE_REMOTE_NAME: {"url": url}}, "core": {"remote": _OVERRIDE_REMOTE_NAME}}
        return _OVERRIDE_REMOTE_NAME, url, override

    if configured_default:
        if configured_default not in remotes:
            raise RemoteUnavailableError(
                f"{root / '.dvc' / 'config'}: core.remote names {configured_default!r}, which is not defined"
            )
        return configured_default, str(remotes[configured_default].get("url")), None

    # No remote anywhere: the built-in local folder, recorded in the uncommitted config.local.
    url = str(default_remote_dir())
    if create_default:
        Path(url).mkdir(parents=True, exist_ok=True)
    with Repo(str(root)) as repo:
        with repo.config.edit("local") as conf:
            conf["remote"][DEFAULT_REMOTE_NAME] = {"url": url}
            conf["core"]["remote"] = DEFAULT_REMOTE_NAME
    return DEFAULT_REMOTE_NAME, url, None


@contextlib.contextmanager
def _open_repo(root: Path, override: dict | None, url: str) -> Iterator[Any]:
    from dvc.config import ConfigError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root), config=override)
    except ConfigError as exc:
        raise RemoteUnavailableError(f"DVC remote URL {url!r} is not usable: {exc}") from exc
    try:
        yield repo
    finally:
        repo.close()


def _check_remote(repo: Any, name: str, url: str, *, for_push: bool) -> str:
    """Fail early if the remote cannot be used; return its effective URL (absolute for folders)."""
    from dvc.exceptions import DvcException
    from dvc_objects.fs.local import LocalFileSystem

    try:
        remote = repo.cloud.get_remote(name)
    except (ImportError, DvcException) as exc:
        # e.g. "s3 is supported, but requires 'dvc-s3' to be installed"
        raise RemoteUnavailableError(f"DVC remote {name!r} ({url}) cannot be used: {exc}") from exc
    if isinstance(remote.fs, LocalFileSystem):
        path = Path(remote.path)
        if not path.is_dir():
            raise RemoteUnavailableError(
                f"DVC remote {name!r}: directory {path} does not exist (create it, or set {REMOTE_ENV} / "
                f"pass remote= to use another remote)"
            )
        if for_push and not os.access(path, os.W_OK | os.X_OK):
            raise RemoteUnavailableError(f"DVC remote {name!r}: directory {path} is not writable")
        return str(path)
    return url


@contextlib.contextmanager
def _repo_lock(repo: Any, root: Path) -> Iterator[None]:
    """Hold DVC's repository lock for a whole multi-step operation (add+verify+push)."""
    from dvc.lock import LockError
    from dvc.repo import lock_repo

    lock_file = root / ".dvc" / "tmp" / "lock"
    try:
        with lock_repo(repo):
            yield
    except LockError as exc:
        holder = ""
        with contextlib.suppress(OSError):
            pid = lock_file.read_text().strip()
            holder = f" (held by pid {pid})" if pid else ""
        raise RepoLockedError(
            f"DVC repository lock {lock_file} is held by another process{holder}; "
            "run one DVC step at a time (delete the file only if no DVC process is running)"
        ) from exc


# --------------------------------------------------------------------------- cache verification


def _cache_object_path(repo: Any, oid: str) -> Path:
    return Path(repo.cache.local.path) / oid[:2] / oid[2:]


def _verify_cache(repo: Any, oid: str, *, source: str) -> None:
    """Check every cache object of ``oid`` exists and hashes to its name.

    Corrupt objects are deleted before raising: they are content-addressed copies (of the workspace
    or the remote), so removing them lets a retry recreate them instead of tripping again.
    """
    missing: list[str] = []
    corrupt: list[Path] = []

    def check(object_oid: str, label: str) -> bool:
        path = _cache_object_path(repo, object_oid)
        if not path.is_file():
            missing.append(f"{label} ({path})")
            return False
        if file_md5(path, memo=False) != object_oid.removesuffix(".dir"):
            corrupt.append(path)
            return False
        return True

    if check(oid, "directory listing") and oid.endswith(".dir"):
        listing = json.loads(_cache_object_path(repo, oid).read_text())
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
    before anything is written, then under DVC's repository lock runs ``dvc add``, verifies the
    cache objects, and ``dvc push``. Commit ``<data_dir>.dvc`` (and ``.dvc/config``) to git to make
    the version reproducible elsewhere.

    Returns JSON-able metadata: ``dvc_file``, ``md5`` (of the folder, as in the .dvc file),
    ``nfiles``, ``size`` (bytes), ``remote`` (name), ``remote_url``, ``transferred`` (objects
    uploaded this time), ``seconds``.

    Raises :class:`RemoteUnavailableError`, :class:`RepoLockedError`, :class:`CorruptCacheError`,
    :class:`MissingDataError` or :class:`VersioningError`; the data folder is never modified.
    """
    from dvc.exceptions import DvcException

    started = time.monotonic()
    root = ensure_dvc_repo(repo_root)
    data_path = root / data_dir
    if not data_path.exists():
        raise MissingDataError(f"publish_data: data folder {data_path} does not exist")
    name, url, override = _resolve_remote(root, remote, create_default=True)
    with _open_repo(root, override, url) as repo:
        url = _check_remote(repo, name, url, for_push=True)
        with _repo_lock(repo, root):
            try:
                stages = repo.add([str(data_path)])
            except DvcException as exc:
                raise VersioningError(f"dvc add {data_path} failed: {exc}") from exc
            stage = stages[0]
            oid = stage.outs[0].hash_info.value
            dvc_file = Path(stage.path)
            _verify_cache(repo, oid, source=f"the workspace ({data_path})")
            try:
                transferred = repo.push(targets=[str(dvc_file)], remote=name)
            except DvcException as exc:
                raise RemoteUnavailableError(f"dvc push of {dvc_file.name} to remote {name!r} ({url}) failed: {exc}") from exc
    return _summary(root, dvc_file, name, url, transferred, started)


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
    from dvc.exceptions import DvcException, DownloadError

    started = time.monotonic()
    root = Path(repo_root).resolve()
    dvc_file = root / f"{data_dir}.dvc"
    if not dvc_file.is_file():
        raise MissingDataError(f"pull_data: {dvc_file} does not exist (publish_data writes it; commit it to git)")
    expected = _read_dvc_out(dvc_file)["md5"]
    ensure_dvc_repo(root)
    name, url, override = _resolve_remote(root, remote, create_default=False)
    with _open_repo(root, override, url) as repo:
        url = _check_remote(repo, name, url, for_push=False)
        with _repo_lock(repo, root):
            try:
                transferred = repo.fetch(targets=[str(dvc_file)], remote=name)
            except DownloadError as exc:
                raise RemoteUnavailableError(f"dvc fetch of {dvc_file.name} from remote {name!r} ({url}) failed: {exc}") from exc
            except DvcException as exc:
                raise VersioningError(f"dvc fetch of {dvc_file.name} failed: {exc}") from exc
            _verify_cache(repo, expected, source=f"remote {name!r} ({url})")
            try:
                repo.checkout(targets=[str(dvc_file)], force=force)
            except DvcException as exc:
                raise VersioningError(
                    f"dvc checkout of {dvc_file.name} into {root / data_dir} failed: {exc} "
                    "(local changes are kept unless pull_data(force=True))"
                ) from exc
    actual = data_version(root / data_dir)
    if actual != expected:
        raise VersioningError(f"{root / data_dir} after pull hashes to {actual}, but {dvc_file.name} records {expected}")
    return _summary(root, dvc_file, name, url, transferred, started)
