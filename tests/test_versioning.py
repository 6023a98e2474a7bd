"""DVC publish/pull round trip and its failure modes, on small git repos in tmp folders.

DVC runs as a command in its own tool environment (``.venv-dvc``, linked as ``.venv/bin/dvc``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from diffss.mlops import versioning
from diffss.mlops.versioning import (
    CorruptCacheError,
    MissingDataError,
    RemoteUnavailableError,
    RepoLockedError,
    VersioningError,
    data_version,
    publish_data,
    published_version,
    pull_data,
)

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


@pytest.fixture(autouse=True)
def _isolated_dvc(tmp_path, monkeypatch):
    # DVC's state/index db lives in a "site cache" (/var/tmp/dvc by default) and its global config
    # in ~/.config/dvc; the default remote in ~/.cache: keep all of them inside the test's tmp dir.
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "dvc-system"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(versioning.REMOTE_ENV, raising=False)
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    # Like the project's .gitignore: data/ is never committed to git, only data.dvc.
    (path / ".gitignore").write_text("/data/\n/wandb/\n")
    files = {
        "data/raw/demo/images/a.png": os.urandom(3000),
        "data/raw/demo/masks/a.png": bytes(range(256)) * 4,
        "data/conditions/seg/a.png": os.urandom(500),
        "data/auxiliary/demo/table.parquet": os.urandom(700),
        "data/checkpoints/run1/model.safetensors": os.urandom(5000),
        "data/exports/run1/segmenter.onnx": os.urandom(1200),
        "data/evaluations/run1.json": b'{"miou": 12.5}\r\n',  # CRLF kept as is (md5 of raw bytes)
        "data/empty.txt": b"",
    }
    for rel, content in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return path


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def commit_all(repo: Path) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "data version")


def test_publish_clone_pull_restores_identical_bytes(tmp_path):
    repo = make_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    remote.mkdir()
    before = tree_hashes(repo / "data")

    meta = publish_data(repo, remote=str(remote))

    assert meta["dvc_file"] == "data.dvc"
    assert meta["nfiles"] == len(before)
    assert meta["size"] == sum((repo / "data" / rel).stat().st_size for rel in before)
    assert meta["remote_url"] == str(remote)
    assert meta["transferred"] >= len(before)
    assert meta["md5"].endswith(".dir")
    # data_version reproduces DVC's own folder hash, so the orchestrator can compare them.
    assert data_version(repo / "data") == meta["md5"] == published_version(repo)
    assert tree_hashes(repo / "data") == before  # publishing never touches the data
    assert any(remote.rglob("*")), "nothing was pushed to the remote"
    assert (repo / ".dvc" / "config").is_file()

    commit_all(repo)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "data").exists()
    assert (clone / "data.dvc").is_file()

    pulled = pull_data(clone, remote=str(remote))

    assert tree_hashes(clone / "data") == before
    assert pulled["md5"] == meta["md5"]
    assert pulled["transferred"] >= len(before)
    assert data_version(clone / "data") == meta["md5"]

    # A second version: a changed checkpoint gives a new hash; only the change is uploaded.
    (repo / "data/checkpoints/run1/model.safetensors").write_bytes(os.urandom(5000))
    meta2 = publish_data(repo, remote=str(remote))
    assert meta2["md5"] != meta["md5"]
    assert meta2["transferred"] == 2  # the new file and the new directory listing
    commit_all(repo)
    git(clone, "pull", "-q")
    pull_data(clone, remote=str(remote))
    assert tree_hashes(clone / "data") == tree_hashes(repo / "data")


def test_default_remote_is_committed_and_a_clone_restores_with_plain_dvc_pull(tmp_path):
    repo = make_repo(tmp_path / "repo")
    meta = publish_data(repo)
    default_dir = tmp_path / "home" / ".cache" / "diffss" / "dvc-remote"
    assert meta["remote"] == versioning.DEFAULT_REMOTE_NAME
    assert meta["remote_url"] == str(default_dir)
    assert any(default_dir.rglob("*"))
    # Committed with `~`, which DVC expands for whoever runs it: no machine-specific path.
    config = (repo / ".dvc" / "config").read_text()
    assert "~/.cache/diffss/dvc-remote" in config and str(tmp_path) not in config
    assert not (repo / ".dvc" / "config.local").exists()

    # A second clone on the same machine: `git clone` then DVC's own `dvc pull`, nothing else.
    commit_all(repo)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    result = subprocess.run([versioning.dvc_executable(), "pull"], cwd=clone, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert tree_hashes(clone / "data") == tree_hashes(repo / "data")


def test_stale_dvc_temporaries_are_removed_by_the_next_run(tmp_path):
    """A DVC killed mid-copy leaves ``.<random>.tmp`` files in the cache and the remote; the next
    publish removes them (a remote's young ones may belong to another clone's running push)."""
    repo = make_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    remote.mkdir()
    publish_data(repo, remote=str(remote))
    cache_tmp = repo / ".dvc" / "cache" / "files" / "md5" / "ab" / ".Zq3xkilled.tmp"
    old_remote_tmp = remote / "files" / "md5" / "cd" / ".Yy7killed.tmp"
    young_remote_tmp = remote / "files" / "md5" / "cd" / ".Ww1running.tmp"
    for path in (cache_tmp, old_remote_tmp, young_remote_tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half an object")
    hour_ago = time.time() - versioning.REMOTE_TMP_MAX_AGE_S - 60
    os.utime(old_remote_tmp, (hour_ago, hour_ago))

    meta = publish_data(repo, remote=str(remote))
    assert not cache_tmp.exists() and not old_remote_tmp.exists()
    assert young_remote_tmp.exists()
    assert meta["transferred"] == 0  # nothing else changed

    # While another DVC process holds the repository lock, its temporaries are left alone.
    cache_tmp.write_bytes(b"being written")
    holder = _hold_dvc_lock(repo)
    try:
        assert versioning.remove_stale_temporaries(repo) == []
        assert cache_tmp.exists()
    finally:
        holder.kill()
        holder.wait()
    assert versioning.remove_stale_temporaries(repo) == [cache_tmp.resolve()]


def test_unreachable_remote_raises_and_leaves_data_intact(tmp_path):
    repo = make_repo(tmp_path / "repo")
    before = tree_hashes(repo / "data")
    missing = tmp_path / "no-such-remote"

    with pytest.raises(RemoteUnavailableError, match="no-such-remote.*does not exist"):
        publish_data(repo, remote=str(missing))
    assert not (repo / "data.dvc").exists()  # failed before dvc add
    assert not missing.exists()  # an explicit remote folder is never created

    with pytest.raises(RemoteUnavailableError, match="Unsupported URL type nosuch"):
        publish_data(repo, remote="nosuch://bucket/prefix")
    with pytest.raises(RemoteUnavailableError, match="not configured"):
        publish_data(repo, remote="no-such-remote-name")
    assert tree_hashes(repo / "data") == before

    remote = tmp_path / "remote"
    remote.mkdir()
    publish_data(repo, remote=str(remote))
    commit_all(repo)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    with pytest.raises(RemoteUnavailableError, match="does not exist"):
        pull_data(clone, remote=str(missing))
    assert not (clone / "data").exists()

    # A reachable remote that lacks the objects (e.g. never pushed there): named, nothing written.
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    with pytest.raises(MissingDataError, match="empty-remote"):
        pull_data(clone, remote=str(empty))
    assert not (clone / "data").exists()


def test_corrupt_cache_object_is_reported_removed_and_recovered(tmp_path):
    repo = make_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    remote.mkdir()
    publish_data(repo, remote=str(remote))
    commit_all(repo)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))

    # Fill the clone's cache, then flip bytes of one object, keeping its size and mtime (bit rot
    # that DVC's own mtime-based state cannot notice).
    pull_data(clone, remote=str(remote))
    good = tree_hashes(clone / "data")
    target_md5 = versioning.file_md5(clone / "data/checkpoints/run1/model.safetensors")
    obj = clone / ".dvc" / "cache" / "files" / "md5" / target_md5[:2] / target_md5[2:]
    assert obj.is_file()
    stat = obj.stat()
    obj.chmod(0o644)
    obj.write_bytes(b"\0" * stat.st_size)
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (clone / "data/checkpoints/run1/model.safetensors").unlink()  # force a checkout from cache

    with pytest.raises(CorruptCacheError, match=target_md5[2:]):
        pull_data(clone, remote=str(remote))
    assert not obj.exists()  # removed, so the retry refetches it
    assert not (clone / "data/checkpoints/run1/model.safetensors").exists()  # nothing checked out
    assert (clone / "data/raw/demo/images/a.png").is_file()

    pull_data(clone, remote=str(remote))
    assert tree_hashes(clone / "data") == good


def _hold_dvc_lock(repo: Path) -> subprocess.Popen:
    # DVC's lock is a zc.lockfile (fcntl) lock on .dvc/tmp/lock holding the owner's pid.
    code = (
        "import sys, time, zc.lockfile\n"
        "lock = zc.lockfile.LockFile(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    lock_file = repo / ".dvc" / "tmp" / "lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    # zc.lockfile is DVC's dependency: run the holder in DVC's tool environment.
    dvc_python = Path(versioning.dvc_executable()).resolve().with_name("python")
    proc = subprocess.Popen([str(dvc_python), "-c", code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_held_lock_raises_and_leaves_data_intact(tmp_path):
    repo = make_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    remote.mkdir()
    meta = publish_data(repo, remote=str(remote))
    dvc_file_before = (repo / "data.dvc").read_text()
    (repo / "data/evaluations/run2.json").write_bytes(b"{}")
    before = tree_hashes(repo / "data")

    holder = _hold_dvc_lock(repo)
    try:
        started = time.monotonic()
        with pytest.raises(RepoLockedError, match=rf"lock.*held by pid {holder.pid}"):
            publish_data(repo, remote=str(remote))
        assert time.monotonic() - started < 30  # DVC retries for ~3 s, then gives up
        assert (repo / "data.dvc").read_text() == dvc_file_before
        assert tree_hashes(repo / "data") == before
        with pytest.raises(RepoLockedError):
            pull_data(repo, remote=str(remote), force=True)
        assert tree_hashes(repo / "data") == before
    finally:
        holder.kill()
        holder.wait()

    # Once the other process is gone the same call succeeds.
    assert publish_data(repo, remote=str(remote))["md5"] != meta["md5"]


def test_pull_keeps_local_changes_unless_forced(tmp_path):
    repo = make_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    remote.mkdir()
    meta = publish_data(repo, remote=str(remote))
    (repo / "data/exports/run1/segmenter.onnx").write_bytes(b"local edit")
    with pytest.raises(VersioningError, match="force=True"):
        pull_data(repo, remote=str(remote))
    assert (repo / "data/exports/run1/segmenter.onnx").read_bytes() == b"local edit"
    pull_data(repo, remote=str(remote), force=True)
    assert data_version(repo / "data") == meta["md5"]


def test_data_version_of_files_and_folders(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"abc")
    (folder / "y.txt").write_bytes(b"hello\n")
    v1 = data_version(folder)
    assert data_version(folder / "y.txt") == hashlib.md5(b"hello\n").hexdigest()
    # Content- and path-addressed: copies elsewhere, other mtimes, same version.
    copy = tmp_path / "copy"
    (copy / "sub").mkdir(parents=True)
    (copy / "y.txt").write_bytes(b"hello\n")
    (copy / "sub" / "x.bin").write_bytes(b"abc")
    assert data_version(copy) == v1
    (copy / "sub" / "x.bin").rename(copy / "x.bin")
    assert data_version(copy) != v1
    (folder / "y.txt").write_bytes(b"hello!")
    assert data_version(folder) != v1
    with pytest.raises(FileNotFoundError, match="nope"):
        data_version(tmp_path / "nope")
    with pytest.raises(MissingDataError, match="data.dvc"):
        pull_data(tmp_path)
    with pytest.raises(MissingDataError, match="does not exist"):
        publish_data(tmp_path, data_dir="absent")


def test_corrupt_cache_on_publish_is_not_pushed(tmp_path):
    repo = make_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    remote.mkdir()
    publish_data(repo, remote=str(remote))
    model = repo / "data/checkpoints/run1/model.safetensors"
    md5 = versioning.file_md5(model)
    obj = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    stat = obj.stat()
    obj.chmod(0o644)
    obj.write_bytes(b"\xff" * stat.st_size)
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # A new remote: the corrupt object would be uploaded there if publish did not check.
    remote2 = tmp_path / "remote2"
    remote2.mkdir()
    before = tree_hashes(repo / "data")

    with pytest.raises(CorruptCacheError, match="workspace"):
        publish_data(repo, remote=str(remote2))
    assert tree_hashes(repo / "data") == before
    assert not (remote2 / "files" / "md5" / md5[:2] / md5[2:]).exists()

    # The retry recreates the object from the (intact) workspace and pushes the right bytes.
    publish_data(repo, remote=str(remote2))
    assert versioning.file_md5(remote2 / "files" / "md5" / md5[:2] / md5[2:]) == md5
