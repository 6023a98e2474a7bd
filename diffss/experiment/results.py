"""The fold's results table, the checkpoint it chooses, and its export for serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from diffss.core.atomic import write_text_atomic
from diffss.experiment.config import BASELINE, ExperimentConfig, Fold, fresh, write_csv, write_json


def results_table(settings: ExperimentConfig, fold: Fold, evaluations: dict[str, Path], xshots: dict[str, Path],
                  out: Path) -> dict[str, Any]:
    """The fold's table: mIoU / FB-IoU without (``baseline``) and with auxiliary supports per
    condition, per-class IoU of every model, and the X-shot curves of all conditions."""
    from diffss.experiment.figures import bar_plot, line_plot

    summaries = {label: json.loads((folder / "summary.json").read_text()) for label, folder in evaluations.items()}
    base = summaries[BASELINE]
    results = pd.DataFrame([{
        "condition": c, "miou_without_aux": base["miou"], "miou_with_aux": summaries[c]["miou"],
        "delta_miou": summaries[c]["miou"] - base["miou"], "fbiou_without_aux": base["fbiou"],
        "fbiou_with_aux": summaries[c]["fbiou"], "train_aux_shot": settings.train_aux_shot,
        "eval_aux_shot": summaries[c]["aux_shot"]} for c in settings.conditions])
    per_class = pd.concat([pd.read_csv(folder / "per_class.csv").assign(model=label) for label, folder in evaluations.items()])
    wide = per_class.pivot_table(index=["class_id", "class_name"], columns="model", values="iou").reset_index()
    wide.columns.name = None
    xshot = pd.concat([pd.read_csv(folder / "xshot.csv") for folder in xshots.values()], ignore_index=True)
    out = fresh(out)
    write_csv(results, out / "results.csv")
    write_csv(wide, out / "per_class.csv")
    write_csv(xshot, out / "xshot.csv")
    paper = paper_layout(settings, fold, evaluations, out)
    shots = sorted(xshot["aux_shot"].unique().tolist())
    series = {c: [float(g.set_index("aux_shot")["miou"].get(s, float("nan"))) for s in shots] for c, g in xshot.groupby("condition")}
    return {
        "results": results, "per_class_iou": wide, "xshot": xshot,
        "best_condition": str(results.loc[results["miou_with_aux"].idxmax(), "condition"]),
        "best_miou": float(results["miou_with_aux"].max()), "baseline_miou": float(base["miou"]), **paper,
        "miou_plot": bar_plot(results["condition"].tolist(), {"without aux": results["miou_without_aux"].tolist(),
                              "with aux": results["miou_with_aux"].tolist()}, f"mIoU on {fold.key}", "mIoU %",
                              out / "miou_with_without_aux.png"),
        "xshot_curve": line_plot(shots, series, f"X-shot study on {fold.key}", "auxiliary images per episode (X)",
                                 "mIoU %", out / "xshot_curve.png"),
    }


def paper_layout(settings: ExperimentConfig, fold: Fold, evaluations: dict[str, Path], out: Path) -> dict[str, Any]:
    """The fold's evaluations in ``diffss reproduce``'s layout (its fold column and mean; mIoU and
    FB-IoU with seed std and 95% interval over episodes, the published numbers beside):
    ``paper_table.md`` / ``.csv`` and ``paper_results.csv``."""
    from diffss.evaluation.class_overlap import check_trained_classes
    from diffss.evaluation.reproduce import paper_table, results_frame, table_markdown

    cells = []
    for label, folder in evaluations.items():
        summary = json.loads((folder / "summary.json").read_text())
        checkpoint = Path(settings.data_root) / summary["checkpoint"]
        model = json.loads((checkpoint / "config.json").read_text())
        check = check_trained_classes(checkpoint, fold.dataset, settings.dataset_root(fold.dataset), fold.fold)
        aux = label != BASELINE
        cells.append({"fold": fold.fold, "shot": summary.get("shot", settings.evaluation.shot), "aux": aux,
                      "aux_shot": summary["aux_shot"], "condition": label if aux else None,
                      "episodes": pd.read_csv(folder / "episodes.csv"), "model": model["model"],
                      "backbone": model.get("backbone"), "checkpoint": summary["checkpoint"],
                      "protocol": summary["protocol"], "class_check": check.note()})
    results = results_frame(cells, fold.dataset)
    table = paper_table(results)
    write_csv(results, out / "paper_results.csv")
    write_csv(table, out / "paper_table.csv")
    write_text_atomic(out / "paper_table.md", table_markdown(table, results, cells, fold.dataset))
    return {"paper_table": table, "paper_table_md": out / "paper_table.md"}


def choose_checkpoint(settings: ExperimentConfig, results_csv: Path) -> str:
    """The label of the checkpoint to export: ``export_source``, or for ``best`` the condition with
    the highest mIoU with auxiliary supports when it beats the baseline, else the baseline."""
    if settings.export_source != "best":
        return settings.export_source
    results = pd.read_csv(results_csv)
    best = results.loc[results["miou_with_aux"].idxmax()]
    return str(best["condition"]) if best["miou_with_aux"] >= best["miou_without_aux"] else BASELINE


def export_segmenter(settings: ExperimentConfig, checkpoint: Path, label: str, out: Path) -> dict[str, Any]:
    """The checkpoint as a Triton / KServe model repository (``diffss.export``) with its parity
    record, and ``source.json`` naming the checkpoint relative to the data root."""
    from diffss.export import export_model_repository

    out = fresh(out)
    info = export_model_repository(checkpoint, out, name=settings.export_name, image_size=settings.evaluation.image_size or settings.train.image_size)
    write_json(out / "source.json", {"checkpoint": checkpoint.relative_to(settings.data_root).as_posix(), "label": label,
                                     "name": settings.export_name})
    parity = info["parity"]
    return {"source": label, "models": {role: m["name"] for role, m in info["models"].items()},
            "parity_passed": bool(parity["passed"]), "max_abs_logit_diff": float(parity["max_abs_logit_diff"]),
            "argmax_agreement": float(parity["argmax_agreement"])}


def onnx_parity(settings: ExperimentConfig, repository: Path) -> dict[str, Any]:
    """onnxruntime vs PyTorch on the exported repository, recomputed from the checkpoint it names."""
    from diffss.export import measure_parity
    from diffss.models import load_model

    source = json.loads((repository / "source.json").read_text())
    model = load_model(Path(settings.data_root) / source["checkpoint"])
    return {**measure_parity(model, repository, name=source["name"], size=settings.evaluation.image_size or settings.train.image_size), "source": source["label"]}
