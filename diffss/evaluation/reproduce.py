"""``diffss reproduce``: the paper's table from per-fold checkpoints, with spreads and the published numbers.

For every fold, 1-shot and 5-shot, without and (given an auxiliary set) with auxiliary supports,
the fold's checkpoint is scored with the published protocol of its model
(:func:`diffss.evaluation.protocol.protocol_for`: episodes, seeds, resolution, where it is scored). Each
number comes with two spreads:

- **seed std**: the standard deviation of mIoU / FB-IoU over the protocol's seeds (BAM: 5; PFENet
  and HSNet test one seed, so it is empty there);
- **95% interval over episodes**: a percentile bootstrap over the test episodes (each seed's
  episodes resampled with replacement, mIoU recomputed from the resampled intersections and
  unions as :class:`~diffss.evaluation.metrics.FewShotMeter` computes it, then averaged over seeds); the
  fold mean's interval resamples every fold at once.

A checkpoint is never scored on classes it trained on (:mod:`diffss.evaluation.class_overlap`) unless
``allow_trained_classes``, and then the table says so. Every cell (fold x shot x aux) is saved
as it finishes (its per-episode counts, atomically), so a rerun with the same settings resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from diffss.core.atomic import atomic_path, write_text_atomic

COUNT_COLUMNS = ("fg_inter", "fg_union", "bg_inter", "bg_union")

# Published mean mIoU over the 4 folds, only numbers checked against their source (see docs/real-data.md):
# (model, backbone, dataset, shot) -> (mIoU, source). BAM's README quotes HSNet's paper numbers beside its own.
BAM_README = "BAM README (github.com/chunbolang/BAM), 'Performance' table: average mIoU across all folds"
PUBLISHED: dict[tuple[str, str, str, int], tuple[float, str]] = {
    ("bam", "ResNet-50", "pascal5i", 1): (67.81, BAM_README),
    ("bam", "ResNet-50", "pascal5i", 5): (70.91, BAM_README),
    ("bam", "ResNet-50", "coco20i", 1): (46.23, BAM_README),
    ("bam", "ResNet-50", "coco20i", 5): (51.16, BAM_README),
    ("hsnet", "ResNet-50", "pascal5i", 1): (64.00, BAM_README + " (HSNet row)"),
    ("hsnet", "ResNet-50", "pascal5i", 5): (69.50, BAM_README + " (HSNet row)"),
    ("hsnet", "ResNet-50", "coco20i", 1): (39.20, BAM_README + " (HSNet row)"),
    ("hsnet", "ResNet-50", "coco20i", 5): (46.90, BAM_README + " (HSNet row)"),
}
UNVERIFIED = ("PFENet's and DifFSS's per-fold and mean numbers are left out: neither official README "
              "(dvlab-research/PFENet, TrinitialChan/DifFSS, TrinitialChan/DifFSS-BAM) states them and the "
              "papers' tables could not be checked here; BAM's README gives PFENet only with VGG-16 on COCO-20i, "
              "a backbone diffss does not build.")


def backbone_family(backbone: str | None) -> str | None:
    if not backbone:
        return None
    if backbone.startswith("resnet50"):
        return "ResNet-50"
    if backbone.startswith("resnet101"):
        return "ResNet-101"
    return backbone


def published(model: str, backbone: str | None, dataset: str, shot: int, aux: bool) -> tuple[float, str] | None:
    """The published mean mIoU for this setting, or None (aux rows: DifFSS's, not verified)."""
    if aux:
        return None
    return PUBLISHED.get((model, backbone_family(backbone) or "", dataset, int(shot)))


# -- per-episode evaluation ----------------------------------------------------------------------

def episode_counts(pred, label) -> np.ndarray:
    """[B,4] foreground/background intersections and unions per episode (255 ignored), as FewShotMeter counts."""
    pred, label = np.asarray(pred), np.asarray(label)
    valid = label != 255
    pf, gf = (pred == 1) & valid, (label == 1) & valid
    pb, gb = (pred == 0) & valid, (label == 0) & valid
    axes = (1, 2)
    return np.stack([(pf & gf).sum(axes), (pf | gf).sum(axes), (pb & gb).sum(axes), (pb | gb).sum(axes)], 1).astype(np.int64)


def evaluate_episodes(model, config, progress: bool = True, tracker: Any = None):
    """:func:`diffss.evaluation.evaluate.evaluate` (same episodes, protocol, meters, per-class table, example panels
    and tracker logs: an equal ``EvalResult``) that also keeps each episode's counts, which the
    interval over episodes needs: returns (result, frame of seed, episode, class_id, fg_inter,
    fg_union, bg_inter, bg_union). ``model``: a segmenter or a checkpoint folder."""
    from diffss.evaluation.evaluate import log_result, score_test_episodes
    from diffss.models import load_model
    from diffss.training.segmenter import resolve_device

    rows: list[tuple[int, ...]] = []
    episodes_of_seed: dict[int, int] = {}

    def keep_counts(seed, batch, pred, label) -> None:
        for cls, counts in zip(batch["class_id"].tolist(), episode_counts(pred, label)):
            episode = episodes_of_seed.get(seed, 0)
            rows.append((seed, episode, int(cls), *map(int, counts)))
            episodes_of_seed[seed] = episode + 1

    device = resolve_device(config.device)
    model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    result = score_test_episodes(model, config, device, progress=progress, on_batch=keep_counts)
    log_result(tracker, result)
    return result, pd.DataFrame(rows, columns=["seed", "episode", "class_id", *COUNT_COLUMNS])


def scores(frame: pd.DataFrame) -> tuple[float, float]:
    """(mIoU, FB-IoU) in % of one seed's episodes, as FewShotMeter.compute."""
    sums = frame.groupby("class_id")[["fg_inter", "fg_union"]].sum()
    miou = float(np.mean(100.0 * sums["fg_inter"] / sums["fg_union"].clip(lower=1)))
    total = frame[list(COUNT_COLUMNS)].sum()
    fbiou = 50.0 * (total["fg_inter"] / max(total["fg_union"], 1) + total["bg_inter"] / max(total["bg_union"], 1))
    return miou, float(fbiou)


def bootstrap(frame: pd.DataFrame, replicates: int, rng: np.random.Generator, chunk: int = 200) -> np.ndarray:
    """[replicates, 2] (mIoU, FB-IoU) of the episodes resampled with replacement within each seed,
    averaged over seeds."""
    out = np.zeros((replicates, 2))
    seeds = sorted(frame["seed"].unique())
    for seed in seeds:
        part = frame[frame["seed"] == seed]
        counts = part[list(COUNT_COLUMNS)].to_numpy(np.float64)
        classes, index = np.unique(part["class_id"].to_numpy(), return_inverse=True)
        onehot = np.eye(len(classes))[index]  # [n, K]
        n = len(part)
        for start in range(0, replicates, chunk):
            b = min(chunk, replicates - start)
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # [b, n]
            fg_i = weights @ (onehot * counts[:, :1])
            fg_u = weights @ (onehot * counts[:, 1:2])
            drawn = weights @ onehot
            iou = np.where(drawn > 0, 100.0 * fg_i / np.maximum(fg_u, 1), np.nan)
            totals = weights @ counts  # [b, 4]
            fb = 50.0 * (totals[:, 0] / np.maximum(totals[:, 1], 1) + totals[:, 2] / np.maximum(totals[:, 3], 1))
            out[start:start + b, 0] += np.nanmean(iou, axis=1) / len(seeds)
            out[start:start + b, 1] += fb / len(seeds)
    return out


# -- the study -----------------------------------------------------------------------------------

@dataclass
class ReproduceConfig:
    """What to score. ``checkpoints``: {fold: folder or hub id} (every shot), ``shot_checkpoints``:
    {(fold, shot): ...} overriding it for one shot (PFENet and BAM train one model per shot);
    ``aux_checkpoints``: {fold: ...} for the rows with auxiliary supports (default: the same);
    ``auxiliary``: {fold: generation table} (no table: no rows with auxiliary supports);
    ``episodes`` / ``seeds`` / ``image_size``: override the protocol (small runs; the table says so)."""

    dataset: str
    root: str | None
    checkpoints: dict[int, str]
    output_dir: str
    shots: tuple[int, ...] = (1, 5)
    shot_checkpoints: dict[tuple[int, int], str] = field(default_factory=dict)
    aux_checkpoints: dict[int, str] = field(default_factory=dict)
    auxiliary: dict[int, str] = field(default_factory=dict)
    condition: str | None = None
    aux_shot: int | None = None  # None: the checkpoint's training aux_shot, else 1
    episodes: int | None = None
    seeds: tuple[int, ...] | None = None
    image_size: int | None = None
    batch_size: int = 8
    device: str = "auto"
    allow_trained_classes: bool = False
    bootstrap: int = 1000

    def checkpoint_for(self, fold: int, shot: int, aux: bool) -> str:
        if aux and fold in self.aux_checkpoints:
            return self.aux_checkpoints[fold]
        return self.shot_checkpoints.get((fold, shot), self.checkpoints[fold])


def load_segmenter(name_or_path: str):
    """A segmenter folder, or a hub id (through :mod:`diffss.evaluation.hub`, from the hub cache when offline)."""
    from diffss.evaluation.hub import HubSegmenter

    return HubSegmenter.from_pretrained(name_or_path).segmenter


def checkpoint_folder(name_or_path: str) -> Path:
    """The local folder of a checkpoint folder or hub id (its training config is read from there)."""
    from diffss.evaluation.hub import resolve_folder

    return resolve_folder(name_or_path)


def _training_aux_shot(checkpoint: Path) -> int | None:
    path = Path(checkpoint) / "train_config.json"
    if path.is_file():
        return int(json.loads(path.read_text()).get("aux_shot") or 0) or None
    return None


def _cell_settings(cfg: ReproduceConfig, checkpoint: Path, eval_config) -> dict[str, Any]:
    from diffss.mlops.versioning import data_version

    weights = Path(checkpoint) / "model.safetensors"
    settings = {"checkpoint": str(checkpoint), "weights": data_version(weights) if weights.is_file() else None,
                **{k: v for k, v in eval_config.to_dict().items() if k not in ("device", "batch_size", "num_examples", "allow_trained_classes")}}
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the cell's file


def run_cell(cfg: ReproduceConfig, fold: int, shot: int, aux: bool, progress: bool) -> dict[str, Any]:
    """Score one (fold, shot, aux) cell, or read it back when a previous run finished it with the same settings."""
    from diffss.evaluation.class_overlap import check_trained_classes
    from diffss.evaluation.evaluate import EvalConfig

    checkpoint = cfg.checkpoint_for(fold, shot, aux)
    folder_of_checkpoint = checkpoint_folder(checkpoint)
    overlap = check_trained_classes(folder_of_checkpoint, cfg.dataset, cfg.root, fold, allow=cfg.allow_trained_classes)
    aux_shot = (cfg.aux_shot or _training_aux_shot(folder_of_checkpoint) or 1) if aux else 0
    eval_config = EvalConfig(dataset=cfg.dataset, root=cfg.root, fold=fold, shot=shot, aux_shot=aux_shot,
                             auxiliary_table=cfg.auxiliary.get(fold) if aux else None,
                             condition=cfg.condition if aux else None, episodes=cfg.episodes, seeds=cfg.seeds,
                             image_size=cfg.image_size, batch_size=cfg.batch_size, device=cfg.device, num_examples=0,
                             allow_trained_classes=cfg.allow_trained_classes)
    cell = {"fold": fold, "shot": shot, "aux": aux, "aux_shot": aux_shot, "checkpoint": str(checkpoint),
            "class_check": overlap.note()}
    name = f"fold{fold}-{shot}shot-{'aux' if aux else 'real'}"
    folder = Path(cfg.output_dir) / "cells"
    settings = _cell_settings(cfg, folder_of_checkpoint, eval_config)
    done = folder / f"{name}.json"
    recorded = json.loads(done.read_text()).get("settings") if done.is_file() else None
    if isinstance(recorded, dict):  # cells scored before a setting was removed recorded it at null: no change
        recorded = {k: v for k, v in recorded.items() if not (k in EvalConfig.REMOVED_FIELDS and v is None)}
    if recorded == settings:
        saved = json.loads(done.read_text())
        return {**saved["cell"], "episodes": pd.read_csv(folder / f"{name}.csv")}
    model = load_segmenter(str(folder_of_checkpoint))
    if model.shot_count is not None and model.shot_count != shot + aux_shot:
        cell["skipped"] = (f"{model.model_name} checkpoint is built for K={model.shot_count} supports, "
                           f"this cell needs {shot} + {aux_shot}")
        return {**cell, "episodes": None}
    result, episodes = evaluate_episodes(model, eval_config, progress=progress)
    cell.update({"protocol": result.protocol, "model": model.model_name, "backbone": model.config.get("backbone")})
    with atomic_path(folder / f"{name}.csv") as tmp:
        episodes.to_csv(tmp, index=False)
    write_text_atomic(done, json.dumps({"settings": settings, "cell": cell}, indent=2, default=str))  # last: the commit
    return {**cell, "episodes": episodes}


def _spread(frames: list[pd.DataFrame], replicates: int, seed: int) -> dict[str, float]:
    """Scores of one fold (one frame) or of the fold mean (several), with seed std and bootstrap interval."""
    per_seed = []
    for seed_value in sorted(frames[0]["seed"].unique()):
        per_fold = [scores(f[f["seed"] == seed_value]) for f in frames]
        per_seed.append(np.mean(per_fold, axis=0))
    per_seed = np.asarray(per_seed)
    rng = np.random.default_rng(seed)
    resampled = np.mean([bootstrap(f, replicates, rng) for f in frames], axis=0)
    low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
    std = per_seed.std(axis=0, ddof=1) if len(per_seed) > 1 else np.full(2, np.nan)
    mean = per_seed.mean(axis=0)
    return {"miou": mean[0], "miou_seed_std": std[0], "miou_ci_low": low[0], "miou_ci_high": high[0],
            "fbiou": mean[1], "fbiou_seed_std": std[1], "fbiou_ci_low": low[1], "fbiou_ci_high": high[1],
            "seeds": len(per_seed), "episodes": int(sum(len(f) for f in frames))}


def reproduce(cfg: ReproduceConfig, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every cell, then ``results.csv`` (one row per setting and fold, plus the mean), ``table.md``
    (the paper's layout) and ``table.csv`` (that layout as CSV) under ``output_dir``."""
    from diffss.evaluation.class_overlap import check_trained_classes

    if not cfg.checkpoints:
        raise ValueError("reproduce needs at least one fold's checkpoint (--checkpoint FOLD=DIR)")
    for fold, checkpoint in sorted(cfg.checkpoints.items()):  # refuse before any evaluation runs
        for shot in cfg.shots:
            for aux in (False, True) if fold in cfg.auxiliary else (False,):
                check_trained_classes(checkpoint_folder(cfg.checkpoint_for(fold, shot, aux)), cfg.dataset, cfg.root,
                                      fold, allow=cfg.allow_trained_classes)
    cells = []
    for fold in sorted(cfg.checkpoints):
        for shot in cfg.shots:
            for aux in (False, True) if fold in cfg.auxiliary else (False,):
                cell = run_cell(cfg, fold, shot, aux, progress)
                if log is not None:
                    log(f"fold {fold} {shot}-shot {'with' if aux else 'without'} aux: "
                        + (cell.get("skipped") or f"mIoU {scores(cell['episodes'])[0]:.2f}"))
                cells.append({**cell, "condition": cfg.condition if aux else None})
    results = results_frame(cells, cfg.dataset, cfg.bootstrap)
    out = Path(cfg.output_dir)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    table = paper_table(results)
    with atomic_path(out / "table.csv") as tmp:
        table.to_csv(tmp, index=False)
    overrides = {k: v for k, v in (("episodes", cfg.episodes), ("seeds", cfg.seeds), ("image_size", cfg.image_size)) if v}
    markdown = table_markdown(table, results, cells, cfg.dataset, overrides)
    write_text_atomic(out / "table.md", markdown)
    return {"results": results, "table": table, "markdown": markdown, "cells": cells}


def setting_label(shot: int, aux: bool, aux_shot: int, condition: str | None) -> str:
    if not aux:
        return f"{shot}-shot"
    return f"{shot}-shot + {aux_shot} aux{f' ({condition})' if condition else ''}"


def results_frame(cells: list[dict[str, Any]], dataset: str, replicates: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (setting, fold) and per setting's ``mean`` over its folds, with spreads and the
    published mean beside the mean row. A cell: fold, shot, aux, aux_shot, condition, episodes
    (the frame :func:`evaluate_episodes` returns, or None when skipped), model, backbone, class_check."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["shot"], cell["aux"], cell.get("condition")), []).append(cell)
    for (shot, aux, condition), group in groups.items():
        scored = [c for c in group if c.get("episodes") is not None]
        label = setting_label(shot, aux, group[0]["aux_shot"], condition)
        base = {"setting": label, "shot": shot, "aux": aux}
        for c in group:
            if c.get("episodes") is None:
                rows.append({**base, "fold": str(c["fold"]), "note": c.get("skipped", ""), "class_check": c["class_check"]})
            else:
                rows.append({**base, "fold": str(c["fold"]), **_spread([c["episodes"]], replicates, seed),
                             "class_check": c["class_check"], "model": c["model"], "backbone": c["backbone"]})
        if scored:
            mean = {**base, "fold": "mean", **_spread([c["episodes"] for c in scored], replicates, seed),
                    "folds": " ".join(str(c["fold"]) for c in scored)}
            found = published(scored[0]["model"], scored[0]["backbone"], dataset, shot, aux)
            if found is not None:
                mean.update({"published_miou": found[0], "difference_miou": mean["miou"] - found[0], "source": found[1]})
            rows.append(mean)
    return pd.DataFrame(rows)


def _cell_text(row: pd.Series, metric: str) -> str:
    value = row.get(metric)
    if value is None or pd.isna(value):
        return "—"
    std = row.get(f"{metric}_seed_std")
    std_text = f" ±{std:.2f}" if std is not None and not pd.isna(std) else ""
    return f"{value:.2f}{std_text} [{row[f'{metric}_ci_low']:.1f}, {row[f'{metric}_ci_high']:.1f}]"


def paper_table(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: one row per setting; Fold-0..3 and Mean mIoU, mean FB-IoU, published, difference."""
    rows = []
    for label, group in results.groupby("setting", sort=False):
        by_fold = {str(r["fold"]): r for _, r in group.iterrows()}
        row = {"setting": label}
        for k in range(4):
            row[f"fold{k}"] = _cell_text(by_fold[str(k)], "miou") if str(k) in by_fold else "—"
        mean = by_fold.get("mean")
        row["mean_miou"] = _cell_text(mean, "miou") if mean is not None else "—"
        row["mean_fbiou"] = _cell_text(mean, "fbiou") if mean is not None else "—"
        has_published = mean is not None and "published_miou" in mean and not pd.isna(mean.get("published_miou"))
        row["published_miou"] = f"{mean['published_miou']:.2f}" if has_published else "—"
        row["difference"] = f"{mean['difference_miou']:+.2f}" if has_published else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def table_markdown(table: pd.DataFrame, results: pd.DataFrame, cells: list[dict], dataset: str,
                   overrides: dict[str, Any] | None = None) -> str:
    """The table in Markdown with its notes: protocol, overrides, each cell's checkpoint and class check, sources."""
    head = ["setting", "Fold-0", "Fold-1", "Fold-2", "Fold-3", "Mean mIoU", "Mean FB-IoU", "published mIoU", "difference"]
    lines = [f"# {dataset}: mIoU / FB-IoU in % (value ±std over the protocol's seeds [95% interval over episodes])",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in ["setting", "fold0", "fold1", "fold2", "fold3", "mean_miou",
                                                             "mean_fbiou", "published_miou", "difference"]) + " |")
    lines.append("")
    protocols = {json.dumps(c["protocol"], sort_keys=True) for c in cells if c.get("protocol")}
    for p in sorted(protocols):
        d = json.loads(p)
        lines.append(f"- protocol {d['family']}: {d['resize']} to {d['size'] or 'the dataset size'} px, scored at the "
                     f"{d['score_at']} size, {d['episodes'] or 'the dataset default number of'} episodes x seeds "
                     f"{d['seeds']}")
    if overrides:
        lines.append(f"- **not the published protocol**: overridden {overrides}")
    notes: dict[tuple[str, str], list[str]] = {}  # (checkpoint, note) -> the cells it holds for
    for c in cells:
        notes.setdefault((str(c["checkpoint"]), c.get("skipped") or c["class_check"]), []).append(
            f"{c['shot']}-shot{' + aux' if c['aux'] else ''}")
    for (checkpoint, note), where in notes.items():
        lines.append(f"- {checkpoint} ({', '.join(where)}): {note}")
    sources = sorted({s for s in results.get("source", pd.Series(dtype=str)).dropna()})
    for s in sources:
        lines.append(f"- published: {s}")
    lines.append(f"- {UNVERIFIED}")
    if any("folds" in r and isinstance(r.get("folds"), str) and r["folds"] != "0 1 2 3" for _, r in results.iterrows()):
        lines.append("- Mean: over the folds scored here only (see results.csv, column folds)")
    return "\n".join(lines) + "\n"
