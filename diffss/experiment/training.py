"""Training and evaluation of one condition's segmenter (``baseline``: real supports only)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from diffss.experiment.config import BASELINE, ExperimentConfig, Fold, fresh, write_csv, write_json
from diffss.training.segmenter import CHECKPOINTS, TrainConfig


def train_checkpoint(settings: ExperimentConfig, fold: Fold, condition: str, auxiliary: Path | None, out: Path,
                     tracker: Any = None, resume: bool = True, processes: int = 1) -> dict[str, Any]:
    """Train the ``condition``'s segmenter (``baseline``: real supports only) into ``<out>.partial``,
    then swap it onto ``out``: readers never see half a checkpoint. With ``resume`` an interrupted
    training of the same settings continues where it stopped; otherwise it starts over.
    ``processes`` > 1: data-parallel under ``torchrun`` (see :func:`run_data_parallel`)."""
    from diffss.experiment.figures import line_plot
    from diffss.training.segmenter import train

    partial = out.with_name(out.name + ".partial")
    cfg = settings.train_config(fold, condition, auxiliary, partial)
    saved = partial / "train_config.json"
    if partial.exists() and not (resume and saved.is_file() and cfg.same_run_as(TrainConfig.from_json(saved))):
        shutil.rmtree(partial)
    if processes > 1:
        run_data_parallel("train", cfg, processes, tracker, "train")
    else:
        train(cfg, tracker=tracker, progress=False)
    write_json(partial / "train_config.json", dataclasses.replace(cfg, output_dir=str(out)).to_dict())
    # The optimizer state only serves resuming the partial run; torch.save also records the name of
    # the (random) temporary file it wrote, which would make two identical trainings differ.
    (partial / "trainer_state.pt").unlink(missing_ok=True)
    history = pd.read_csv(partial / "history.csv")
    line_plot(history["step"].tolist(), {"loss": history["loss"].tolist()}, "training loss", "step", "loss",
              partial / "loss.png")
    # Step folders (optimizer state, manifests) only serve resuming; the top-level files are the model.
    shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)
    swap_in(partial, out)
    return {"steps": int(history["step"].iloc[-1]), "final_loss": float(history["loss"].iloc[-1]), "aux_shot": cfg.aux_shot,
            "train_config": cfg.output_settings(), "loss_curve": out / "loss.png"}


def train_base_learner(settings: ExperimentConfig, fold: Fold, out: Path, tracker: Any = None,
                       resume: bool = True, processes: int = 1) -> dict[str, Any]:
    """BAM's first stage for ``fold``: the base learner (PSPNet on the fold's base classes), trained in
    ``<out>.partial`` (resumed if its settings match) and swapped onto ``out`` when finished."""
    from diffss.training.base_learner import BaseTrainConfig, train_base

    partial = out.with_name(out.name + ".partial")
    cfg = settings.base_train_config(fold, partial)
    saved = partial / "base_train_config.json"
    if partial.exists() and not (resume and saved.is_file() and cfg.same_run_as(BaseTrainConfig.from_json(saved))):
        shutil.rmtree(partial)
    if processes > 1:
        run_data_parallel("train-base", cfg, processes, tracker, "base")
    else:
        train_base(cfg, tracker=tracker, progress=False)
    history = pd.read_csv(partial / "history.csv")
    (partial / "trainer_state.pt").unlink(missing_ok=True)
    shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)
    swap_in(partial, out)
    return {"steps": int(history["step"].iloc[-1]), "final_loss": float(history["loss"].iloc[-1]),
            "base_train_config": cfg.output_settings()}


def run_data_parallel(command: str, cfg: Any, processes: int, tracker: Any, metric_prefix: str) -> None:
    """``diffss <command> --config ...`` as ``processes`` data-parallel processes (``torchrun
    --standalone``: this machine, a free port; NCCL on GPUs, gloo on CPUs). The tracker stays in
    this process: the loss history the run wrote is logged to it once, after the run."""
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(cfg.to_json())
    try:
        launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", str(processes), "-m", "diffss.cli", "--quiet", command,
                                   "--config", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if launched.returncode != 0:
        raise RuntimeError(f"torchrun --nproc-per-node {processes} diffss {command} failed "
                           f"(exit {launched.returncode}): {launched.stderr[-2000:]}")
    if tracker is not None:
        for row in pd.read_csv(Path(cfg.output_dir) / "history.csv").itertuples():
            tracker.log({f"{metric_prefix}/loss": row.loss, f"{metric_prefix}/lr": row.lr}, step=int(row.step))


def swap_in(partial: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``partial`` folder (readers see the old or the new one)."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def evaluate_checkpoint(settings: ExperimentConfig, fold: Fold, condition: str, checkpoint: Path,
                        auxiliary: Path | None, out: Path, tracker: Any = None) -> dict[str, Any]:
    """mIoU / FB-IoU on the fold's fixed test episodes (``eval_aux_shot`` auxiliary supports per
    episode for a condition): ``summary.json``, ``per_class.csv`` and prediction panels."""
    from diffss.experiment.figures import save_png, stack_panels
    from diffss.evaluation.reproduce import evaluate_episodes

    cfg = settings.eval_config(fold, condition, auxiliary)
    # diffss.evaluation.evaluate.evaluate's result, plus each episode's counts: the paper table's interval over episodes
    result, episodes = evaluate_episodes(checkpoint, cfg, tracker=tracker, progress=False)
    out = fresh(out)
    write_csv(result.per_class, out / "per_class.csv")
    write_csv(episodes, out / "episodes.csv")
    write_json(out / "summary.json", {
        "miou": result.miou, "fbiou": result.fbiou, "per_seed": result.per_seed, "label": condition,
        "checkpoint": checkpoint.relative_to(settings.data_root).as_posix(), "aux_shot": cfg.aux_shot,
        "shot": cfg.shot, "protocol": result.protocol})
    info = {"miou": result.miou, "fbiou": result.fbiou, "per_class_iou": result.per_class}
    if result.examples:
        info["predictions"] = save_png(stack_panels(result.examples), out / "predictions.png")
    return info


def real_shot_gain(settings: ExperimentConfig, fold: Fold, checkpoint: Path, evaluation: Path,
                   shots: int = 5) -> dict[str, Any]:
    """Does the benchmark need its supports? The baseline checkpoint on the same test episodes with
    ``shots`` real supports instead of 1: the mIoU gain over its 1-shot ``evaluation``."""
    import json

    from diffss.evaluation.evaluate import evaluate

    one_shot = json.loads((evaluation / "summary.json").read_text())["miou"]
    cfg = dataclasses.replace(settings.eval_config(fold, BASELINE, None), shot=shots, num_examples=0)
    k_shot = evaluate(checkpoint, cfg, progress=False).miou
    return {"one_shot_miou": one_shot, f"{shots}_shot_miou": k_shot, "gain": k_shot - one_shot,
            "margin": settings.supports_matter_margin}


def xshot_study(settings: ExperimentConfig, fold: Fold, condition: str, checkpoint: Path, auxiliary: Path,
                out: Path, tracker: Any = None) -> dict[str, Any]:
    """mIoU of the checkpoint as the number of auxiliary images per episode grows (``xshot_shots``)."""
    from diffss.experiment.figures import line_plot
    from diffss.evaluation.evaluate import evaluate

    rows = []
    for shots in sorted(set(settings.xshot_shots)):
        cfg = dataclasses.replace(settings.eval_config(fold, condition, auxiliary, aux_shot=shots), num_examples=0)
        result = evaluate(checkpoint, cfg, progress=False)
        rows.append({"condition": condition, "aux_shot": shots, "miou": result.miou, "fbiou": result.fbiou})
        if tracker is not None:
            tracker.log({"xshot/miou": result.miou, "xshot/fbiou": result.fbiou, "xshot/aux_shot": shots}, step=shots)
    frame = pd.DataFrame(rows)
    if tracker is not None:
        tracker.log_table("xshot", frame)
    out = fresh(out)
    write_csv(frame, out / "xshot.csv")
    curve = line_plot(frame["aux_shot"].tolist(), {condition: frame["miou"].tolist()}, f"X-shot study ({condition})",
                      "auxiliary images per episode (X)", "mIoU %", out / "xshot_curve.png")
    return {"results": frame, "best_aux_shot": int(frame.loc[frame["miou"].idxmax(), "aux_shot"]), "xshot_curve": curve}


def missing_classes(expected: list[int], per_class_csv: Path, column: str | None = None) -> list[int]:
    """Test classes of the fold without a score in ``per_class_csv`` (``column``: of that model)."""
    frame = pd.read_csv(per_class_csv)
    scored = frame[frame[column].notna()] if column else frame[frame["episodes"] > 0]
    return sorted(set(expected) - {int(c) for c in scored["class_id"]})
