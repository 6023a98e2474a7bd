"""Episodic training and evaluation of few-shot segmenters.

Training is the paper's: the segmenter is trained with cross-entropy on episodes of base
classes whose support set is ``true_shot`` real supports plus ``aux_shot`` auxiliary
(diffusion-generated) supports; the diffusion model stays frozen (it is not even loaded here,
its images come from the generation table). Evaluation follows the FSS literature: fixed test
episodes per seed, IoU accumulated per class (see :mod:`diffss.metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass as plain_dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffss.atomic import atomic_path, write_text_atomic
from diffss.data import AuxiliarySupports, load_dataset
from diffss.metrics import FewShotMeter
from diffss.models import FewShotSegmenter, build_model, load_model, segmentation_loss

IGNORE_INDEX = 255


class _JsonConfig:
    """JSON round-trip for the config dataclasses (``from_dict(cfg.to_dict()) == cfg``).

    The configs are pydantic dataclasses: each field's type and ``Field`` constraint is its
    validation (a bad value raises ``ValueError`` naming the config and the field), so the CLI,
    the library and the Dagster definitions share one declaration. ``RUNTIME_FIELDS`` name the
    fields that change where or how fast a run goes, not its result.
    """

    RUNTIME_FIELDS: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def output_settings(self) -> dict[str, Any]:
        """The fields that determine the result (everything but ``RUNTIME_FIELDS``)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
_STRICT = ConfigDict(extra="forbid")


def _aux_needs_table(cfg: Any) -> Any:
    if cfg.aux_shot and not cfg.auxiliary_table:
        raise ValueError(f"{type(cfg).__name__}.auxiliary_table is required when aux_shot > 0")
    return cfg


@dataclass(config=_STRICT)
class TrainConfig(_JsonConfig):
    dataset: str = "demo"
    root: str | None = None
    fold: NonNegativeInt = 0
    model: str = "pfenet"
    backbone: str = "small"
    pretrained: str | None = None
    image_size: PositiveInt = 96
    true_shot: PositiveInt = 1
    aux_shot: NonNegativeInt = 0
    auxiliary_table: str | None = None
    condition: str | None = None
    max_drift: Annotated[float, Field(gt=0)] | None = None
    steps: PositiveInt = 300
    batch_size: PositiveInt = 8
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    seed: int = 0
    device: str = "auto"
    num_workers: NonNegativeInt = 0
    output_dir: str = "data/checkpoints/run"
    checkpoint_every: PositiveInt = 100
    # Weight of PFENet's per-scale auxiliary losses (the paper uses 1.0).
    aux_loss_weight: Annotated[float, Field(ge=0)] = 1.0

    RUNTIME_FIELDS = ("root", "auxiliary_table", "device", "num_workers", "output_dir", "checkpoint_every")

    _check_aux = model_validator(mode="after")(_aux_needs_table)


@dataclass(config=_STRICT)
class EvalConfig(_JsonConfig):
    dataset: str = "demo"
    root: str | None = None
    fold: NonNegativeInt = 0
    shot: PositiveInt = 1
    aux_shot: NonNegativeInt = 0
    auxiliary_table: str | None = None
    condition: str | None = None
    max_drift: Annotated[float, Field(gt=0)] | None = None
    episodes: PositiveInt | None = None
    # BAM averages 5 seeds; HSNet uses one. Results are averaged over these.
    seeds: Annotated[tuple[int, ...], Field(min_length=1)] = (0,)
    image_size: PositiveInt = 96
    batch_size: PositiveInt = 8
    device: str = "auto"
    num_examples: NonNegativeInt = 4

    RUNTIME_FIELDS = ("root", "auxiliary_table", "device")

    _check_aux = model_validator(mode="after")(_aux_needs_table)


@plain_dataclass
class EvalResult:
    miou: float
    fbiou: float
    per_class: pd.DataFrame
    per_seed: list[dict[str, float]] = field(default_factory=list)
    examples: list[Image.Image] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"miou": self.miou, "fbiou": self.fbiou}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _auxiliary(table: str | None, condition: str | None, max_drift: float | None) -> AuxiliarySupports | None:
    if not table:
        return None
    return AuxiliarySupports.from_table(table, condition=condition, max_drift=max_drift)


def _episode_loss(model: FewShotSegmenter, batch: dict[str, Any], device: torch.device, aux_weight: float) -> torch.Tensor:
    logits, aux_logits = model.forward_train(
        batch["query_image"].to(device), batch["support_images"].to(device), batch["support_masks"].to(device)
    )
    return segmentation_loss(logits, batch["query_mask"].to(device), aux_logits, aux_weight=aux_weight, ignore_index=IGNORE_INDEX)


def train(config: TrainConfig, tracker: Any = None, progress: bool = True) -> Path:
    """Train a segmenter episodically; returns the checkpoint directory.

    The directory holds ``config.json`` + ``model.safetensors`` (the model, loadable with
    :func:`diffss.models.load_model`), ``train_config.json``, ``trainer_state.pt`` and
    ``history.csv``. Rerunning with the same ``output_dir`` resumes from the last checkpoint
    and, because episode sampling and shuffling are functions of (seed, epoch), continues on
    exactly the batches an uninterrupted run would have seen.
    """
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "trainer_state.pt"
    saved_config = out / "train_config.json"
    if saved_config.exists() and state_path.exists():
        previous = TrainConfig.from_json(saved_config)
        if {**previous.to_dict(), "steps": 0} != {**config.to_dict(), "steps": 0}:
            raise ValueError(
                f"{out} holds a run with a different TrainConfig; use a new output_dir or delete {out}"
            )
    write_text_atomic(saved_config, json.dumps(config.to_dict(), indent=2))

    device = resolve_device(config.device)
    seed_everything(config.seed)
    dataset = load_dataset(
        config.dataset,
        root=config.root,
        fold=config.fold,
        split="train",
        shot=config.true_shot,
        seed=config.seed,
        image_size=config.image_size,
        aux_shot=config.aux_shot,
        auxiliary=_auxiliary(config.auxiliary_table, config.condition, config.max_drift),
    )
    model = build_model(config.model, backbone=config.backbone, pretrained=config.pretrained).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # PFENet's poly schedule (power 0.9) over the whole run.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, config.steps - 1) / config.steps) ** 0.9)

    step, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(load_model(out).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
    if step >= config.steps:
        return out

    batches_per_epoch = math.ceil(len(dataset) / config.batch_size)
    bar = tqdm(total=config.steps, initial=step, desc=f"train {config.model}/{config.dataset} fold {config.fold}", disable=not progress)
    model.train()
    while step < config.steps:
        epoch, offset = divmod(step, batches_per_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=False,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
        )
        for index, batch in enumerate(loader):
            if index < offset:
                continue  # resumed mid-epoch: these batches were trained on before the stop
            # Dropout/noise in the model follows (seed, step), so a resumed run matches.
            torch.manual_seed(config.seed * 1_000_003 + step)
            loss = _episode_loss(model, batch, device, config.aux_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            history.append({"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if tracker is not None:
                tracker.log({"train/loss": history[-1]["loss"], "train/lr": history[-1]["lr"]}, step=step)
            if step % config.checkpoint_every == 0 or step == config.steps:
                _save_checkpoint(out, model, optimizer, scheduler, step, history)
            if step >= config.steps:
                break
    bar.close()
    return out


def _save_checkpoint(out: Path, model: FewShotSegmenter, optimizer, scheduler, step: int, history: list[dict]) -> None:
    # Model first, then the state that says which step it belongs to: a stop between the two
    # leaves the previous state pointing at a model at most checkpoint_every steps newer,
    # which the resume reloads consistently from the model file.
    model.save_pretrained(out)
    with atomic_path(out / "trainer_state.pt") as tmp:
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "history": history},
            tmp,
        )
    with atomic_path(out / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


@torch.no_grad()
def evaluate(model_or_checkpoint_dir: FewShotSegmenter | str | Path, config: EvalConfig, tracker: Any = None, progress: bool = True) -> EvalResult:
    """Evaluate on fixed test episodes, once per seed; mIoU/FB-IoU are averaged over seeds."""
    device = resolve_device(config.device)
    if isinstance(model_or_checkpoint_dir, (str, Path)):
        model = load_model(model_or_checkpoint_dir)
    else:
        model = model_or_checkpoint_dir
    model = model.to(device).eval()
    auxiliary = _auxiliary(config.auxiliary_table, config.condition, config.max_drift)

    per_seed, meters, examples = [], [], []
    class_names: dict[int, str] = {}
    for seed in config.seeds:
        dataset = load_dataset(
            config.dataset,
            root=config.root,
            fold=config.fold,
            split="test",
            shot=config.shot,
            episodes=config.episodes,
            seed=seed,
            image_size=config.image_size,
            aux_shot=config.aux_shot,
            auxiliary=auxiliary,
        )
        class_names = dataset.class_names
        meter = FewShotMeter(dataset.class_ids)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False)
        for batch in tqdm(loader, desc=f"eval {config.dataset} fold {config.fold} seed {seed}", disable=not progress):
            logits = model(
                batch["query_image"].to(device),
                batch["support_images"].to(device),
                batch["support_masks"].to(device),
            )
            pred = logits.argmax(dim=1).cpu()
            meter.update(pred, batch["query_mask"], batch["class_id"])
            if len(examples) < config.num_examples and seed == config.seeds[0]:
                examples.extend(_example_panels(batch, pred, config.num_examples - len(examples)))
        scores = meter.compute()
        per_seed.append({"seed": seed, "miou": scores["miou"], "fbiou": scores["fbiou"]})
        meters.append(meter)

    per_class = _mean_per_class([m.to_frame(class_names) for m in meters])
    result = EvalResult(
        miou=float(np.mean([s["miou"] for s in per_seed])),
        fbiou=float(np.mean([s["fbiou"] for s in per_seed])),
        per_class=per_class,
        per_seed=per_seed,
        examples=examples,
    )
    if tracker is not None:
        tracker.log({"eval/miou": result.miou, "eval/fbiou": result.fbiou})
        tracker.log_table("eval/per_class_iou", per_class)
        tracker.log_images("eval/examples", [(img, "support | query | ground truth | prediction") for img in examples])
    return result


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
