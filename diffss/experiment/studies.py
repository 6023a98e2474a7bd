"""Seed studies: does a set of auxiliary supports beat none, by more than the seed-to-seed spread?

One *arm* is a way of training and testing the segmenter: ``none`` (real supports only, tested
with 1 and with ``max(real_shots)`` real supports), and, per auxiliary set (a generation table:
seg / hed / scribble images of a generator, or the demo's oracle), ``1 real + a aux`` at training
and test (DifFSS's default pairing), its X-shot curve, and optionally the paper's configuration
(``paper_aux_shot`` aux at training and test). Every arm is trained once per training seed on
the same fold and tested on the same fixed episodes, so gains are paired per seed.

``run_study`` trains and evaluates (resumable: finished checkpoints and evaluations are reused),
``summarize`` reduces the per-seed rows to mean, spread and gain, and ``support_check`` is the
demo world's own test: real K-shot must beat 1-shot and the oracle must beat no auxiliary
supports, each by more than the spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from diffss.core.atomic import atomic_path, write_text_atomic

NONE = "none"


@dataclass
class StudyConfig:
    """What every arm shares. The defaults are the demo's protocol (PFENet, small backbone
    pretrained on the demo world's pool and frozen, 96 px, 600 steps, batch 8, 1-shot, fold 0,
    200 test episodes)."""

    root: str
    output_dir: str
    dataset: str = "demo"
    fold: int = 0
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    model: str = "pfenet"
    backbone: str = "small"
    pretrained: str | None = "demo"
    steps: int = 600
    image_size: int = 96
    batch_size: int = 8
    lr: float = 1e-3
    episodes: int = 200
    eval_seed: int = 0
    real_shots: tuple[int, ...] = (1, 5)
    train_aux_shot: int = 1
    eval_aux_shot: int = 1
    xshot: tuple[int, ...] = ()
    paper_aux_shot: int = 0
    aux_draw: str = "first"  # TrainConfig.aux_draw of every auxiliary arm
    device: str = "cpu"

    def __post_init__(self):
        self.seeds = tuple(int(s) for s in self.seeds)
        self.real_shots = tuple(int(s) for s in self.real_shots)
        self.xshot = tuple(int(s) for s in self.xshot)
        if not self.seeds:
            raise ValueError("StudyConfig.seeds must name at least one training seed")
        if 1 not in self.real_shots:
            raise ValueError(f"StudyConfig.real_shots must include 1 (the reference), got {self.real_shots}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _train_config(cfg: StudyConfig, seed: int, arm: str, aux_shot: int, table: str | None):
    from diffss.training.segmenter import TrainConfig

    name = f"{arm}-aux{aux_shot}-seed{seed}" if aux_shot else f"{NONE}-seed{seed}"
    return TrainConfig(dataset=cfg.dataset, root=cfg.root, fold=cfg.fold, model=cfg.model, backbone=cfg.backbone,
                       pretrained=cfg.pretrained,
                       image_size=cfg.image_size, true_shot=1, aux_shot=aux_shot,
                       auxiliary_table=table if aux_shot else None, aux_draw=cfg.aux_draw if aux_shot else "first",
                       steps=cfg.steps, batch_size=cfg.batch_size,
                       lr=cfg.lr, seed=seed, device=cfg.device, output_dir=str(Path(cfg.output_dir) / "checkpoints" / name),
                       checkpoint_every=max(1, min(100, cfg.steps)))


def _evaluate(cfg: StudyConfig, checkpoint: Path, shot: int, aux_shot: int, table: str | None, key: str) -> dict:
    """mIoU / FB-IoU of one checkpoint in one test setting, cached under ``evals/<key>.json``."""
    from diffss.evaluation.evaluate import EvalConfig, evaluate

    cache = Path(cfg.output_dir) / "evals" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    result = evaluate(checkpoint, EvalConfig(
        dataset=cfg.dataset, root=cfg.root, fold=cfg.fold, shot=shot, aux_shot=aux_shot,
        auxiliary_table=table if aux_shot else None, episodes=cfg.episodes, seeds=(cfg.eval_seed,),
        image_size=cfg.image_size, device=cfg.device, num_examples=0), progress=False)
    scores = {"miou": result.miou, "fbiou": result.fbiou}
    write_text_atomic(cache, json.dumps(scores))
    return scores


def run_study(cfg: StudyConfig, aux_tables: Mapping[str, str | os.PathLike] | None = None,
              progress: bool = True, results_name: str = "results.csv") -> pd.DataFrame:
    """Train and test every arm for every seed; returns one row per (arm, training, test, seed)
    and writes it to ``<output_dir>/<results_name>``. ``aux_tables``: label -> generation table."""
    from tqdm.auto import tqdm

    from diffss.training.segmenter import train

    aux_tables = {label: str(path) for label, path in (aux_tables or {}).items()}
    rows = []
    plan = [(seed, NONE, 0) for seed in cfg.seeds]
    for label in aux_tables:
        plan += [(seed, label, cfg.train_aux_shot) for seed in cfg.seeds]
        if cfg.paper_aux_shot:
            plan += [(seed, label, cfg.paper_aux_shot) for seed in cfg.seeds]
    for seed, arm, aux_shot in tqdm(plan, desc="study", unit="training", disable=not progress):
        table = aux_tables.get(arm)
        checkpoint = train(_train_config(cfg, seed, arm, aux_shot, table), progress=False)
        training = f"1 real + {aux_shot} aux" if aux_shot else "1 real"
        tests = ([(shot, 0) for shot in cfg.real_shots] if not aux_shot else
                 [(1, a) for a in sorted({aux_shot if aux_shot == cfg.paper_aux_shot else cfg.eval_aux_shot,
                                           *(cfg.xshot if aux_shot == cfg.train_aux_shot else ())})])
        for shot, test_aux in tests:
            key = f"{checkpoint.name}-test{shot}+{test_aux}"
            scores = _evaluate(cfg, checkpoint, shot, test_aux, table, key)
            test = f"{shot} real + {test_aux} aux" if test_aux else f"{shot} real"
            rows.append({"arm": arm, "training": training, "test": test, "seed": seed, **scores})
    frame = pd.DataFrame(rows)
    with atomic_path(Path(cfg.output_dir) / results_name) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, training, test): mean and sample std over seeds of mIoU and FB-IoU, and the
    paired mIoU gain over ``none`` trained and tested with 1 real support. ``spread`` is the
    larger of the two settings' seed std; ``beats_spread`` says whether the mean gain exceeds it."""
    reference = results[(results["arm"] == NONE) & (results["test"] == "1 real")].set_index("seed")["miou"]
    out = []
    for (arm, training, test), group in results.groupby(["arm", "training", "test"], sort=False):
        miou = group.set_index("seed")["miou"]
        gains = (miou - reference.reindex(miou.index)).dropna()
        spread = float(max(_std(miou), _std(reference)))
        out.append({"arm": arm, "training": training, "test": test, "seeds": len(group),
                    "miou": float(miou.mean()), "miou_std": _std(miou), "fbiou": float(group["fbiou"].mean()),
                    "fbiou_std": _std(group["fbiou"]), "gain": float(gains.mean()) if len(gains) else np.nan,
                    "per_seed_gain": " ".join(f"{g:+.2f}" for g in gains), "spread": spread,
                    "beats_spread": bool(len(gains) and gains.mean() > spread)})
    return pd.DataFrame(out)


def _std(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def oracle_table(cfg: StudyConfig, num_aux: int) -> Path:
    """The demo oracle's auxiliary set for every train and test sample of the fold."""
    from diffss.data import load_dataset
    from diffss.generation.oracle import ORACLE, write_oracle_auxiliary
    from diffss.generation.run import TABLE_NAME

    samples = []
    for split in ("train", "test"):
        samples += load_dataset(cfg.dataset, root=cfg.root, fold=cfg.fold, split=split, episodes=1).samples
    out = Path(cfg.output_dir) / "auxiliary"
    write_oracle_auxiliary(samples, out, num_aux=num_aux, dataset_name=cfg.dataset, progress=False)
    return out / cfg.dataset / ORACLE / TABLE_NAME


def support_check(cfg: StudyConfig, reference_spread: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Does the demo world need its supports? Trains ``none`` and ``oracle`` arms over ``cfg.seeds``.

    Passes when real ``max(real_shots)``-shot beats 1-shot and the oracle (1 real + 1 aux) beats
    none, each by more than the spread: the seed std when there are several seeds, else
    ``reference_spread`` (measured once with several seeds; the demo runs one).
    """
    table = oracle_table(cfg, num_aux=max(cfg.train_aux_shot, cfg.eval_aux_shot, 1))
    summary = summarize(run_study(dataclasses.replace(cfg, xshot=(), paper_aux_shot=0), {"oracle": table}, progress))
    with atomic_path(Path(cfg.output_dir) / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    k = max(cfg.real_shots)
    shot_row = summary[(summary["arm"] == NONE) & (summary["test"] == f"{k} real")].iloc[0]
    oracle_row = summary[summary["arm"] == "oracle"].iloc[0]
    spread = reference_spread if len(cfg.seeds) == 1 and reference_spread is not None else float(
        max(shot_row["spread"], oracle_row["spread"]))
    verdict = {"seeds": list(cfg.seeds), "one_shot_miou": float(summary.iloc[0]["miou"]),
               f"{k}_shot_gain": float(shot_row["gain"]), "oracle_gain": float(oracle_row["gain"]),
               "spread": spread}
    verdict["passed"] = bool(verdict[f"{k}_shot_gain"] > spread and verdict["oracle_gain"] > spread)
    write_text_atomic(Path(cfg.output_dir) / "support_check.json", json.dumps(verdict, indent=2))
    return verdict


def generated_tables(cfg: StudyConfig, generation, conditions, num_aux: int, progress: bool = True,
                     train_num_aux: int | None = None, shard: str | None = None,
                     subfolder: str | None = None) -> dict[str, Path]:
    """Auxiliary images with the generator of ``generation`` (a GenerationConfig) for each
    condition: ``num_aux`` per test support, ``train_num_aux`` (default: what the study's arms
    train with, ``max(train_aux_shot, paper_aux_shot)``, or ``num_aux`` where more, when
    ``aux_draw`` is "random": a draw needs images to choose from) per training support. ``shard`` ``"i/n"``:
    this process's part (n processes may share the folder). ``subfolder``: the tables go to
    ``auxiliary/<subfolder>/`` (one folder per generation setting); the conditions, which no
    generation setting changes, stay shared in ``auxiliary/<dataset>/conditions``. Returns
    condition -> table path."""
    from diffss.data import load_dataset
    from diffss.generation import TABLE_NAME, generate_auxiliary

    train_num_aux = train_num_aux or max(cfg.train_aux_shot, cfg.paper_aux_shot, 1,
                                         num_aux if cfg.aux_draw == "random" else 1)
    splits = {split: load_dataset(cfg.dataset, root=cfg.root, fold=cfg.fold, split=split, episodes=1).samples
              for split in ("test", "train")}
    auxiliary = Path(cfg.output_dir) / "auxiliary"
    out = auxiliary / subfolder if subfolder else auxiliary
    tables = {}
    for condition in conditions:
        for split, n in (("test", num_aux), ("train", train_num_aux)):
            generate_auxiliary(splits[split], condition, out, config=generation, num_aux=n, dataset_name=cfg.dataset,
                               conditions_dir=auxiliary / cfg.dataset / "conditions", progress=progress, shard=shard)
        tables[condition] = out / cfg.dataset / condition / TABLE_NAME
    return tables


def auxiliary_grid(tables: Mapping[str, str | os.PathLike], conditions_dir: str | os.PathLike, supports: list,
                   num_aux: int = 4, tile: int = 96):
    """One row per (support, auxiliary set): support (object outlined) | control image | its auxiliary images."""
    from PIL import Image, ImageDraw

    from diffss.conditions import condition_path
    from diffss.data import AuxiliarySupports

    rows = []
    for sample in supports:
        image = sample.load_image().convert("RGB").resize((tile, tile))
        mask = Image.fromarray((sample.load_mask() == 1).astype(np.uint8) * 255).resize((tile, tile))
        outlined = image.copy()
        outlined.paste(Image.new("RGB", image.size, (255, 255, 0)), mask=mask.point(lambda v: 70 if v else 0))
        for label, table in tables.items():
            aux = AuxiliarySupports.from_table(table).for_support(sample.name, sample.class_id)[:num_aux]
            control = condition_path(conditions_dir, label, sample.class_id, sample.name)
            tiles = [outlined, Image.open(control).convert("RGB").resize((tile, tile)) if control.is_file()
                     else Image.new("RGB", (tile, tile), (40, 40, 40))]
            tiles += [Image.open(p).convert("RGB").resize((tile, tile)) for p in aux]
            rows.append((f"{sample.class_name} / {label}", tiles))
    label_width = 150
    width = label_width + tile * max(len(t) for _, t in rows)
    grid = Image.new("RGB", (width, tile * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, tiles) in enumerate(rows):
        draw.text((4, r * tile + tile // 2 - 6), label, fill=(0, 0, 0))
        for c, im in enumerate(tiles):
            grid.paste(im, (label_width + c * tile, r * tile))
    return grid


def summary_markdown(summary: pd.DataFrame) -> str:
    lines = ["| auxiliary set | training | test | seeds | mIoU (mean ± std) | FB-IoU | gain vs none | per seed | > spread |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        lines.append(f"| {row.arm} | {row.training} | {row.test} | {row.seeds} | {row.miou:.2f} ± {row.miou_std:.2f} | "
                     f"{row.fbiou:.2f} | {row.gain:+.2f} | {row.per_seed_gain} | {'yes' if row.beats_spread else 'no'} |")
    return "\n".join(lines) + "\n"


def demo_study(cfg: StudyConfig, generation=None, conditions=("seg", "hed", "scribble"), oracle: bool = True,
               num_aux: int = 4, grid_supports: int = 4, progress: bool = True,
               oracle_autoencoded: bool = False) -> pd.DataFrame:
    """The demo's whole experiment: oracle and generated auxiliary sets, trained and tested over
    ``cfg.seeds``; writes results.csv, summary.csv, summary.md and auxiliary_grid.png under
    ``cfg.output_dir`` and returns the summary. ``generation``: GenerationConfig (default: the
    shipped demo generator). ``oracle_autoencoded`` adds the arm ``oracle_autoencoded``: the
    oracle's images through the generator's autoencoder at its resolution
    (:func:`diffss.generation.oracle.write_autoencoded_auxiliary`), which splits the generator's
    shortfall into what its autoencoder costs and what its denoiser paints."""
    from diffss.data import load_dataset
    from diffss.generation.demo_generator import demo_generation_config
    from diffss.generation.oracle import write_autoencoded_auxiliary

    if oracle_autoencoded and not oracle:
        raise ValueError("oracle_autoencoded passes the oracle's images through the autoencoder: it needs oracle=True")
    if conditions or oracle_autoencoded:
        generation = generation or demo_generation_config(device=None if cfg.device == "auto" else cfg.device)
    tables: dict[str, Path] = {}
    if oracle:
        tables["oracle"] = oracle_table(cfg, num_aux)
    if oracle_autoencoded:
        tables["oracle_autoencoded"] = write_autoencoded_auxiliary(tables["oracle"], generation, progress=progress)
    if conditions:
        generated = generated_tables(cfg, generation, conditions, num_aux, progress)
        tables.update(generated)
        test = load_dataset(cfg.dataset, root=cfg.root, fold=cfg.fold, split="test", episodes=1).samples
        picks = test[:: max(1, len(test) // grid_supports)][:grid_supports]
        grid = auxiliary_grid(generated, Path(cfg.output_dir) / "auxiliary" / cfg.dataset / "conditions", picks, num_aux)
        with atomic_path(Path(cfg.output_dir) / "auxiliary_grid.png") as tmp:
            grid.save(tmp)
    summary = summarize(run_study(cfg, tables, progress))
    with atomic_path(Path(cfg.output_dir) / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    write_text_atomic(Path(cfg.output_dir) / "summary.md", summary_markdown(summary))
    write_text_atomic(Path(cfg.output_dir) / "study_config.json", json.dumps(cfg.to_dict(), indent=2))
    return summary


def strength_sweep(cfg: StudyConfig, generation, strengths, conditions=("seg", "hed", "scribble"),
                   progress: bool = True) -> pd.DataFrame:
    """Gain over the 1-shot baseline against support-guidance strength: for each strength and
    condition, one auxiliary image per support painted at that strength (``auxiliary/strength-<s>/``),
    trained and tested 1 real + 1 aux over ``cfg.seeds`` (same baseline checkpoints as the study in
    ``cfg.output_dir``). Writes ``gain_vs_strength.csv`` (condition, strength, gain, its seed std,
    per-seed gains) and ``gain_vs_strength.png`` (one line per condition) and returns the frame."""
    from diffss.experiment.figures import line_plot

    strengths = sorted({float(s) for s in strengths})
    if not strengths or not all(0 < s <= 1 for s in strengths):
        raise ValueError(f"strengths must be in (0, 1], got {strengths}")
    if not conditions:
        raise ValueError("strength_sweep needs at least one condition")
    cfg = dataclasses.replace(cfg, train_aux_shot=1, eval_aux_shot=1, xshot=(), paper_aux_shot=0, real_shots=(1,))
    tables = {}
    for s in strengths:
        painted = generated_tables(cfg, dataclasses.replace(generation, strength=s), conditions, 1, progress,
                                   train_num_aux=1, subfolder=f"strength-{s:g}")
        for condition, table in painted.items():
            tables[f"{condition}-s{s:g}"] = table
    arms = {f"{c}-s{s:g}": (c, s) for c in conditions for s in strengths}  # rows: condition-major
    summary = summarize(run_study(cfg, tables, progress, results_name="gain_vs_strength_results.csv")).set_index("arm")
    rows = []
    for arm, (condition, s) in arms.items():
        row = summary.loc[arm]
        gains = [float(g) for g in row["per_seed_gain"].split()]
        rows.append({"condition": condition, "strength": s, "gain": float(row["gain"]), "gain_std": _std(gains),
                     "per_seed_gain": row["per_seed_gain"], "seeds": int(row["seeds"])})
    frame = pd.DataFrame(rows)
    out = Path(cfg.output_dir)
    with atomic_path(out / "gain_vs_strength.csv") as tmp:
        frame.to_csv(tmp, index=False)
    series = {c: list(g["gain"]) for c, g in frame.groupby("condition", sort=False)}
    line_plot(strengths, series, f"1 real + 1 aux, {len(cfg.seeds)} seed(s), fold {cfg.fold}",
              "support-guidance strength (1 = from pure noise)", "mIoU gain over 1-shot", out / "gain_vs_strength.png")
    return frame
