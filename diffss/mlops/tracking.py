"""Run tracking with Weights & Biases, offline by default.

``RunTracker.start(...)`` opens one W&B run and exposes the few things the pipeline logs: metrics,
a per-class IoU table, example images (``wandb.Image``), artifacts (checkpoint folders, ONNX files)
and summary values. Tracking switched off is W&B's own ``mode="disabled"`` (``start_tracker(False)``):
every call is accepted and nothing is written.

Mode (``mode=None``): ``WANDB_MODE`` if set, else ``"online"`` when ``WANDB_API_KEY`` is set, else
``"offline"``. Offline runs are written under ``<dir>/wandb/offline-run-*`` (``dir`` defaults to
``WANDB_DIR``, else the project checkout, else the working directory) and uploaded later with
``wandb sync <run_dir>``; offline and disabled runs never open a network connection.
``read_offline_run(run_dir)`` reads an offline run back with W&B's own reader of its transaction
log (``wandb leet inspect --json``), the public interface to that file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

MODES = ("online", "offline", "disabled")
# Legacy spellings wandb still accepts in WANDB_MODE.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def resolve_mode(mode: str | None = None) -> str:
    """The W&B mode to use: ``mode``, else ``WANDB_MODE``, else online iff ``WANDB_API_KEY`` is set."""
    source = "mode"
    if mode is None and os.environ.get("WANDB_MODE"):
        mode, source = os.environ["WANDB_MODE"], "WANDB_MODE"
    if mode is None:
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    resolved = _MODE_ALIASES.get(mode.strip().lower(), mode.strip().lower())
    if resolved not in MODES:
        raise ValueError(f"{source}={mode!r} is not a W&B mode; use one of {', '.join(MODES)}")
    return resolved


def default_root_dir() -> Path:
    """Folder that holds the ``wandb/`` run folders: ``WANDB_DIR``, else the checkout, else cwd."""
    if os.environ.get("WANDB_DIR"):
        return Path(os.environ["WANDB_DIR"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd()


def _jsonable(value: Any) -> Any:
    # Configs are often dataclasses holding Paths/tuples (TrainConfig); W&B wants JSON-like values.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return value.item()  # numpy / torch scalars
    return value


class RunTracker:
    """One W&B run. Create with :meth:`start`; use as a context manager or call :meth:`finish`."""

    def __init__(self, run: Any, mode: str, root_dir: Path):
        self._run = run
        self.mode = mode
        self.root_dir = root_dir
        real = mode != "disabled"
        self._run_id: str | None = run.id if real else None
        self._run_dir: Path | None = Path(run.settings.sync_dir) if real else None
        # run.url is only meaningful online; offline it just warns.
        self._url: str | None = run.url if mode == "online" else None
        self.finished = False

    @classmethod
    def start(
        cls,
        project: str,
        name: str | None = None,
        config: Mapping[str, Any] | Any | None = None,
        job_type: str | None = None,
        dir: str | os.PathLike | None = None,
        mode: str | None = None,
        tags: Sequence[str] | None = None,
        group: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> "RunTracker":
        """Start a run and log ``config`` (a mapping or a dataclass such as ``TrainConfig``).

        ``dir`` is the folder that will contain ``wandb/`` (as in ``wandb.init(dir=...)``);
        ``settings`` overrides ``wandb.Settings`` fields (console capture is off by default because
        it fights with pytest's and Dagster's own capture).
        """
        import wandb

        if not project:
            raise ValueError("RunTracker.start: project must be a non-empty string")
        resolved = resolve_mode(mode)
        root = Path(dir) if dir is not None else default_root_dir()
        if resolved != "disabled":
            root.mkdir(parents=True, exist_ok=True)
        if resolved != "online":
            # wandb-core reports its own crashes to an error service; nothing may leave the
            # machine when not online.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        run_settings = {"console": "off", "save_code": False, **dict(settings or {})}
        run = wandb.init(
            project=project,
            name=name,
            config=_jsonable(config) if config is not None else None,
            job_type=job_type,
            # A disabled run given a dir still creates it; it needs none.
            dir=str(root) if resolved != "disabled" else None,
            mode=resolved,
            tags=list(tags) if tags else None,
            group=group,
            reinit="create_new",  # several trackers may be open in one process (in-process executor)
            settings=wandb.Settings(**run_settings),
        )
        return cls(run, resolved, root)

    # ----------------------------------------------------------------- identity

    @property
    def run_id(self) -> str | None:
        """W&B run id (None when disabled)."""
        return self._run_id

    @property
    def url(self) -> str | None:
        """Run page URL when online; None offline/disabled (known after ``wandb sync``)."""
        return self._url

    @property
    def run_dir(self) -> Path | None:
        """The run's folder (``.../wandb/offline-run-<time>-<id>``; argument of ``wandb sync``)."""
        return self._run_dir

    # ----------------------------------------------------------------- logging

    def _check_open(self, what: str) -> None:
        if self.finished:
            raise RuntimeError(f"RunTracker.{what}: run {self._run_id} is already finished")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalar metrics (or any wandb-loggable values) at ``step``."""
        self._check_open("log")
        self._run.log(_jsonable(dict(metrics)), step=step)

    def log_table(self, name: str, frame: Any, step: int | None = None) -> None:
        """Log a pandas DataFrame (e.g. ``FewShotMeter.to_frame``) as a W&B table.

        A non-default index (e.g. class names) is kept as a column.
        """
        import pandas as pd
        import wandb

        self._check_open("log_table")
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"log_table({name!r}): expected a pandas.DataFrame, got {type(frame).__name__}")
        if not isinstance(frame.index, pd.RangeIndex):
            frame = frame.reset_index()
        frame = frame.rename(columns=str)
        self._run.log({name: wandb.Table(dataframe=frame)}, step=step)

    def log_images(self, name: str, images: Iterable[Any], step: int | None = None) -> None:
        """Log images: items are ``(image, caption)`` or bare images (anything ``wandb.Image`` takes:
        PIL, HWC array with floats in [0, 1] or uint8, CHW tensor)."""
        import wandb

        self._check_open("log_images")
        logged = []
        for item in images:
            image, caption = item if isinstance(item, tuple) else (item, None)
            logged.append(wandb.Image(image, caption=caption))
        if not logged:
            raise ValueError(f"log_images({name!r}): no images given")
        self._run.log({name: logged}, step=step)

    def log_artifact(
        self,
        path: str | os.PathLike,
        name: str,
        type: str,
        metadata: Mapping[str, Any] | None = None,
        aliases: Sequence[str] | None = None,
    ) -> str:
        """Log a file or folder as an artifact (a copy is staged, so later edits do not leak in).

        Returns ``"<name>"``; the version is assigned by the server when the run is (synced) online.
        """
        import wandb

        self._check_open("log_artifact")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact({name!r}): {path} does not exist")
        if not _ARTIFACT_NAME.match(name):
            raise ValueError(f"log_artifact: artifact name {name!r} may only hold letters, digits, '-', '_' and '.'")
        if self.mode == "disabled":
            return name
        artifact = wandb.Artifact(name, type=type, metadata=_jsonable(dict(metadata or {})))
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact, aliases=list(aliases) if aliases else None)
        return name

    def update_summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary values (final metrics shown in the runs table)."""
        self._check_open("update_summary")
        self._run.summary.update(_jsonable(dict(values)))

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent); offline runs are complete on disk afterwards."""
        if not self.finished:
            self.finished = True
            self._run.finish(exit_code=exit_code)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)


def start_tracker(enabled: bool = True, **kwargs: Any) -> RunTracker:
    """``RunTracker.start(**kwargs)``; with ``enabled=False`` a W&B run in ``mode="disabled"``."""
    return RunTracker.start(**{**kwargs, "mode": kwargs.get("mode") if enabled else "disabled"})


# --------------------------------------------------------------------------- offline run reader


@dataclasses.dataclass
class OfflineRun:
    run_id: str
    project: str
    name: str
    job_type: str
    tags: list[str]
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    artifacts: list[dict[str, str]]


def _leet(run_dir: Path, *flags: str) -> str:
    wandb_cli = Path(sys.executable).with_name("wandb")
    command = [str(wandb_cli) if wandb_cli.is_file() else "wandb", "leet", "inspect", *flags, "--json", str(run_dir)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    if result.returncode != 0:
        raise ValueError(f"read_offline_run: wandb could not read {run_dir}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def read_offline_run(run_dir: str | os.PathLike) -> OfflineRun:
    """Config, history rows, final summary and logged artifacts of an offline run folder, as W&B's
    own reader (``wandb leet inspect``) decodes its ``run-*.wandb`` log. History keys of nested
    values are dotted (``img.count``), as W&B stores them."""
    run_dir = Path(run_dir)
    if not any(run_dir.glob("run-*.wandb")):
        raise FileNotFoundError(f"read_offline_run: no run-*.wandb file in {run_dir}")
    state = json.loads(_leet(run_dir, "--summary"))
    records = [json.loads(line) for line in _leet(run_dir).splitlines() if line.strip()]
    run = next((r["run"] for r in records if r["type"] == "run"), {})
    config = {k: v for k, v in state.get("config", {}).items() if k != "_wandb"}
    return OfflineRun(
        run_id=state.get("run_id", ""), project=state.get("project", ""), name=state.get("name", ""),
        job_type=run.get("job_type", ""), tags=list(state.get("tags") or []), config=config,
        history=[{**r["history"]["item"]} for r in records if r["type"] == "history"],
        summary=state.get("summary", {}),
        artifacts=[{"name": r["artifact"]["name"], "type": r["artifact"]["type"], "digest": r["artifact"]["digest"]}
                   for r in records if r["type"] == "artifact"],
    )
