"""The training loop and the output folder every trainer shares.

A run's folder holds ``<config_name>`` (the config, written before the first step),
``checkpoints/step-XXXXXXXX/`` (atomic checkpoints: the model files and ``trainer_state.pt``,
see :mod:`diffss.core.checkpoint`), the newest checkpoint's model files published at the top
(hard links, each placed by an atomic rename, weights before the ``.json`` that marks them
whole) and ``history.csv``. Rerunning into the same folder with the same settings resumes from the
newest checkpoint that verifies; a larger ``steps`` continues a finished run; other settings are
refused (:func:`diffss.core.config.check_same_run`).

Exact resume rests on two rules the trainers follow: every random draw of step ``s`` comes from
generators seeded by (seed, s) or (seed, epoch), never from state carried across steps, and the
model, optimizer, schedule (and gradient scaler) are saved together in one step folder.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from tqdm.auto import tqdm

from diffss.core.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from diffss.core.checkpoint import Checkpoint, CheckpointDir, CheckpointError
from diffss.core.config import JsonConfig, check_same_run
from diffss.core.distributed import BatchPart, World

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # step folders under the run's folder
KEEP_CHECKPOINTS = 2  # the newest and one to fall back to if it fails verification
STATE_NAME = "trainer_state.pt"
HISTORY_NAME = "history.csv"
HISTORY_COLUMNS = ("step", "loss", "lr")


def _publish_order(name: str) -> tuple[bool, str]:
    # weights first, the index files (config.json, model_index.json, tokenizer files) last: a
    # reader that finds the index finds the weights it names
    return (Path(name).suffix in (".json", ".txt"), name)


class TrainingRun:
    """The output folder of one training run (see the module docstring). Only the writer (rank 0
    under ``torchrun``) changes files; every rank reads the same checkpoint to resume."""

    def __init__(self, config: JsonConfig, out: str | os.PathLike, config_name: str, *,
                 legacy_state: str | None = None, world: World | None = None):
        self.config = config
        self.out = Path(out)
        self.saved_config = self.out / config_name
        self.checkpoints = CheckpointDir(self.out / CHECKPOINTS, keep=KEEP_CHECKPOINTS)
        self.legacy_state = self.out / legacy_state if legacy_state else None
        self.world = world or World.single()

    # ---- before the first write ------------------------------------------------------------
    def has_legacy_state(self) -> bool:
        return self.legacy_state is not None and self.legacy_state.is_file() and not self.checkpoints.steps()

    def check_same_run(self) -> None:
        """The one "same run except for steps?" check: refuses other settings in this folder."""
        started = self.checkpoints.steps() or (self.legacy_state is not None and self.legacy_state.is_file())
        if self.saved_config.is_file() and started:
            check_same_run(self.config, self.saved_config, self.out)

    def prepare(self) -> None:
        """Create the folder, remove what a killed run left (atomic-write temporaries, half-written
        step folders) and write the config. Call after every input has been checked."""
        if self.world.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(self.out, recursive=True) + self.checkpoints.clean()
            if removed:
                log.info("%s: removed %d temporary file(s) of an interrupted run", self.out, removed)
            write_text_atomic(self.saved_config, self.config.to_json())
        self.world.barrier()

    # ---- resume ------------------------------------------------------------------------------
    def latest(self) -> tuple[Checkpoint | None, dict[str, Any] | None]:
        """The newest verified checkpoint and its trainer state (None, None: start from step 0)."""
        if self.world.is_writer:
            latest = self.checkpoints.latest()  # moves a corrupt newest one aside
        self.world.barrier()
        if not self.world.is_writer:
            latest = self.checkpoints.latest()
        if latest is None:
            return None, None
        state = latest.load(STATE_NAME, map_location="cpu", weights_only=False)
        if int(state["step"]) != latest.step:
            raise CheckpointError(f"{latest.file(STATE_NAME)} is at step {state['step']}, its checkpoint at "
                                  f"step {latest.step}", latest.path)
        return latest, state

    def load_legacy_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.legacy_state, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - name the file, do not restart silently
            raise ValueError(f"{self.legacy_state}: cannot read the training state of the old layout ({exc}); "
                             f"delete {self.out} to start over") from exc

    # ---- saving --------------------------------------------------------------------------------
    def save(self, step: int, write: Callable[[Path], Any], state: dict[str, Any], history: list[dict]) -> None:
        """Checkpoint ``step``: ``write(folder)`` puts the model files, ``state`` (optimizer,
        schedule, ... ; ``step`` and ``history`` are added) goes beside them; the folder is
        committed atomically, then published. Rank 0 writes, every rank waits for it."""
        if self.world.is_writer:
            checkpoint = self.checkpoints.save(step, write=write,
                                               objects={STATE_NAME: {**state, "step": step, "history": history}})
            self.publish(checkpoint, history)
            if self.legacy_state is not None and self.legacy_state.is_file():
                self.legacy_state.unlink()  # superseded by the step folders
        self.world.barrier()

    def publish(self, checkpoint: Checkpoint, history: list[dict]) -> None:
        """The checkpoint's model files at the top of the run's folder (what ``from_pretrained`` /
        ``load_model`` read) and the loss history as ``history.csv``."""
        if not self.world.is_writer:
            return
        names = sorted((p.relative_to(checkpoint.path).as_posix() for p in checkpoint.path.rglob("*")
                        if p.is_file() and p.name not in (STATE_NAME, "manifest.json")), key=_publish_order)
        checkpoint.publish(names, self.out)
        with atomic_path(self.out / HISTORY_NAME) as tmp:
            pd.DataFrame(history, columns=list(HISTORY_COLUMNS)).to_csv(tmp, index=False)


def run_steps(*, start_step: int, steps: int, history: list[dict], train_step: Callable[[int], tuple[float, float]],
              save: Callable[[int], None], checkpoint_every: int, tracker: Any = None, metric_prefix: str = "train",
              callback: Callable[[int, float], None] | None = None, progress: bool = True, desc: str = "train",
              unit: str = "it") -> int:
    """Steps ``start_step + 1 .. steps``: ``train_step(step)`` runs one optimizer step and returns
    (loss, learning rate); every ``checkpoint_every`` steps and at the last one ``save(step)``.
    Returns the step reached."""
    step = start_step
    bar = tqdm(total=steps, initial=step, desc=desc, unit=unit, disable=not progress)
    while step < steps:
        loss, lr = train_step(step)
        step += 1
        history.append({"step": step, "loss": loss, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if tracker is not None:
            tracker.log({f"{metric_prefix}/loss": loss, f"{metric_prefix}/lr": lr}, step=step)
        if callback is not None:
            callback(step, loss)
        if step % checkpoint_every == 0 or step == steps:
            save(step)
    bar.close()
    return step


class _IndexOnly(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def epoch_order(n: int, batch_size: int, generator_seed: int) -> list[list[int]]:
    """The global batches of one epoch: exactly the indices ``DataLoader(shuffle=True,
    generator=Generator().manual_seed(generator_seed))`` draws (the same calls on the same
    generator, over an index-only dataset, so no sample is read)."""
    loader = torch.utils.data.DataLoader(_IndexOnly(n), batch_size=batch_size, shuffle=True, drop_last=False,
                                         generator=torch.Generator().manual_seed(generator_seed))
    return [batch.tolist() for batch in loader]


def epoch_batches(dataset, batch_size: int, seed: int, start_step: int, num_workers: int = 0,
                  world: World | None = None, collate_fn: Callable | None = None) -> Iterator[tuple[Any, BatchPart]]:
    """Batches from step ``start_step`` on, for ever: epoch ``e`` shuffles with a generator seeded
    by (seed, e) and calls ``dataset.set_epoch(e)``, so a resumed run continues on the batches an
    uninterrupted one would have seen. Under ``torchrun`` each global batch of ``batch_size`` is
    split into one contiguous part per rank (a distributed sampler over episodes: each rank sees
    different ones, an epoch covers the set once). Yields (this rank's batch, its
    :class:`~diffss.core.distributed.BatchPart`)."""
    world = world or World.single()
    batches_per_epoch = math.ceil(len(dataset) / batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, batches_per_epoch)
        dataset.set_epoch(epoch)
        order = epoch_order(len(dataset), batch_size, seed * 100_003 + epoch)[offset:]
        parts = [world.part(batch) for batch in order]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(p.indices) for p in parts],
                                             num_workers=num_workers,
                                             collate_fn=collate_fn,
                                             generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for batch, part in zip(loader, parts):
            yield batch, part
            step += 1
