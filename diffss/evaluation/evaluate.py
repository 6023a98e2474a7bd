"""Evaluation of few-shot segmenters, as the FSS literature does it: fixed test episodes per seed of
the model family's protocol (:mod:`diffss.evaluation.protocol`), IoU accumulated per class
(:mod:`diffss.evaluation.metrics`), mIoU / FB-IoU averaged over seeds, and example panels
(support | query | ground truth | prediction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass as plain_dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffss.core.config import JsonConfig
from diffss.data import collate_episodes, load_dataset
from diffss.data.auxiliary import MAX_DRIFT_REPLACED
from diffss.data.episodes import AUX_PAIRING
from diffss.evaluation.class_overlap import check_trained_classes
from diffss.evaluation.metrics import FewShotMeter
from diffss.evaluation.protocol import FAMILIES, SCORE_AT, EvalProtocol, protocol_for, scored_prediction
from diffss.models import FewShotSegmenter, load_model
from diffss.training.segmenter import (
    IGNORE_INDEX, STRICT_CONFIG, NonNegativeInt, PositiveInt, load_auxiliary, require_auxiliary_table, resolve_device,
)


@dataclass(config=STRICT_CONFIG)
class EvalConfig(JsonConfig):
    dataset: str = "demo"
    root: str | None = None
    fold: NonNegativeInt | None = 0  # None: a folder dataset scored on all its classes
    shot: PositiveInt = 1
    aux_shot: NonNegativeInt = 0
    auxiliary_table: str | None = None
    condition: str | None = None
    # The fields below left at None take the evaluation protocol of the model and dataset
    # (diffss.evaluation.protocol): PFENet/BAM pad to 473 px on PASCAL-5i and score at the original size,
    # HSNet squashes to 400 px and scores there; BAM averages 5 seeds x 1000 episodes.
    episodes: PositiveInt | None = None
    seeds: Annotated[tuple[int, ...], Field(min_length=1)] | None = None
    image_size: Annotated[int, Field(ge=16)] | None = None
    # "pfenet" | "bam" | "hsnet": another model family's protocol; None: the model's own
    protocol: Literal[FAMILIES] | None = None
    # "original" (HSNet's use_original_imgsize) | "input"
    score_at: Literal[SCORE_AT] | None = None
    batch_size: PositiveInt = 8
    device: str = "auto"
    num_examples: NonNegativeInt = 4
    skip_bad: bool = False
    aux_pairing: Literal[AUX_PAIRING] = "round_robin"
    # A checkpoint folder whose training classes (its train_config.json, or BAM's base_class_ids)
    # include test classes of this evaluation is refused, naming them; True scores it anyway
    # (``EvalResult.class_check`` then says so). The CLI's --allow-trained-classes.
    allow_trained_classes: bool = False

    RUNTIME_FIELDS = ("root", "auxiliary_table", "device", "batch_size")
    REMOVED_FIELDS = {"max_drift": MAX_DRIFT_REPLACED}

    _check_aux = model_validator(mode="after")(require_auxiliary_table)

    def protocol_for(self, model_name: str) -> EvalProtocol:
        """The protocol ``evaluate`` uses for a model of ``model_name`` under this config."""
        return protocol_for(model_name, self.dataset, family=self.protocol, image_size=self.image_size,
                            score_at=self.score_at, episodes=self.episodes, seeds=self.seeds)


@plain_dataclass
class EvalResult:
    miou: float
    fbiou: float
    per_class: pd.DataFrame
    per_seed: list[dict[str, float]] = field(default_factory=list)
    examples: list[Image.Image] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)
    # what the training-classes check found (diffss.evaluation.class_overlap.OverlapCheck.note)
    class_check: str = "training classes unknown (a model object, not a folder): not checked"

    def summary(self) -> dict[str, float]:
        return {"miou": self.miou, "fbiou": self.fbiou}


@torch.no_grad()
def evaluate(model_or_checkpoint_dir: FewShotSegmenter | str | Path, config: EvalConfig, tracker: Any = None, progress: bool = True) -> EvalResult:
    """Evaluate on fixed test episodes, once per seed of the protocol (``config.protocol_for``);
    mIoU/FB-IoU are averaged over seeds. ``result.protocol`` records the protocol used.

    A checkpoint folder that trained on any of the test classes is refused
    (:class:`diffss.evaluation.class_overlap.TrainedClassesError`, naming them) unless
    ``config.allow_trained_classes``; ``result.class_check`` says what the check found. A model
    object carries no training record and is not checked."""
    device = resolve_device(config.device)
    class_check = None
    if isinstance(model_or_checkpoint_dir, (str, Path)):
        # before loading anything: a checkpoint is never scored on classes it trained on
        class_check = check_trained_classes(model_or_checkpoint_dir, config.dataset, config.root, config.fold,
                                            allow=config.allow_trained_classes)
        model = load_model(model_or_checkpoint_dir)
    else:
        model = model_or_checkpoint_dir
    result = score_test_episodes(model, config, device, progress=progress)
    if class_check is not None:
        result.class_check = class_check.note()
    log_result(tracker, result)
    return result


#: Called after each scored batch: (seed, batch, prediction, label), both at the scoring size.
BatchHook = Callable[[int, dict[str, Any], torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def score_test_episodes(model: FewShotSegmenter, config: EvalConfig, device: torch.device, progress: bool = True,
                        on_batch: BatchHook | None = None) -> EvalResult:
    """The scoring loop of :func:`evaluate` (no class check, no logging): the protocol's test
    episodes of every seed through ``model``, meters per seed, the per-class table and the example
    panels. ``on_batch`` sees every scored batch (:func:`diffss.evaluation.reproduce.evaluate_episodes`
    keeps each episode's counts with it), so both evaluations score the same way."""
    model = model.to(device).eval()
    protocol = config.protocol_for(model.model_name)
    auxiliary = load_auxiliary(config.auxiliary_table, config.condition)

    per_seed, meters, examples = [], [], []
    class_names: dict[int, str] = {}
    for seed in protocol.seeds:
        dataset = load_dataset(
            config.dataset,
            root=config.root,
            fold=config.fold,
            split="test",
            shot=config.shot,
            episodes=protocol.episodes,
            seed=seed,
            image_size=protocol.size,
            aux_shot=config.aux_shot,
            auxiliary=auxiliary,
            skip_bad=config.skip_bad,
            resize=protocol.resize,
            original_labels=protocol.score_at == "original",
            query_sampling=protocol.query_order,
            aux_pairing=config.aux_pairing,
        )
        class_names = dataset.class_names
        meter = FewShotMeter(dataset.class_ids)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, collate_fn=collate_episodes)
        desc = (f"eval {config.dataset} fold {config.fold} {config.shot}-shot"
                f"{f' +{config.aux_shot} aux' if config.aux_shot else ''} seed {seed}")
        for batch in tqdm(loader, desc=desc, disable=not progress):
            pred, label = scored_prediction(model, batch, protocol, device)
            meter.update(pred, label, batch["class_id"])
            if on_batch is not None:
                on_batch(seed, batch, pred, label)
            if len(examples) < config.num_examples and seed == protocol.seeds[0]:
                if protocol.score_at != "input":  # the panels show the episode at the input size
                    pred = scored_prediction(model, batch, dataclasses.replace(protocol, score_at="input"), device)[0]
                examples.extend(_example_panels(batch, pred, config.num_examples - len(examples)))
        scores = meter.compute()
        per_seed.append({"seed": seed, "miou": scores["miou"], "fbiou": scores["fbiou"]})
        meters.append(meter)

    per_class = _mean_per_class([m.to_frame(class_names) for m in meters])
    return EvalResult(
        miou=float(np.mean([s["miou"] for s in per_seed])),
        fbiou=float(np.mean([s["fbiou"] for s in per_seed])),
        per_class=per_class,
        per_seed=per_seed,
        examples=examples,
        protocol=protocol.to_dict(),
    )


def log_result(tracker: Any, result: EvalResult) -> None:
    """An evaluation's scores, per-class table and example panels to ``tracker`` (None: nowhere)."""
    if tracker is None:
        return
    tracker.log({"eval/miou": result.miou, "eval/fbiou": result.fbiou})
    tracker.log_table("eval/per_class_iou", result.per_class)
    tracker.log_images("eval/examples", [(img, "support | query | ground truth | prediction") for img in result.examples])


def _mean_per_class(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat(frames)
    if "class_id" not in frame.columns:
        return frames[0]
    frame = frame[frame["class_id"].notna()]
    grouped = frame.groupby(["class_id", "class_name"], as_index=False, sort=True).agg(iou=("iou", "mean"), episodes=("episodes", "sum"))
    grouped["class_id"] = grouped["class_id"].astype(int)
    return grouped


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _mask_to_pil(mask: torch.Tensor) -> Image.Image:
    mask = mask.clone()
    rgb = torch.zeros(3, *mask.shape)
    rgb[:, mask == 1] = 1.0
    rgb[:, mask == IGNORE_INDEX] = 0.5
    return _to_pil(rgb)


def _example_panels(batch: dict[str, Any], pred: torch.Tensor, limit: int) -> list[Image.Image]:
    """support | query | ground truth | prediction, side by side, one panel per episode."""
    panels = []
    for i in range(min(limit, pred.shape[0])):
        support = batch["support_images"][i, 0] * (0.5 + 0.5 * (batch["support_masks"][i, 0] == 1).float())
        tiles = [_to_pil(support), _to_pil(batch["query_image"][i]), _mask_to_pil(batch["query_mask"][i]), _mask_to_pil(pred[i])]
        width, height = tiles[0].size
        panel = Image.new("RGB", (width * len(tiles), height))
        for j, tile in enumerate(tiles):
            panel.paste(tile, (j * width, 0))
        panels.append(panel)
    return panels
