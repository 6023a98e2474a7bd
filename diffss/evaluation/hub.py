"""Segmenter folders on the Hugging Face Hub, through huggingface_hub's ``ModelHubMixin``.

:class:`HubSegmenter` wraps a :class:`~diffss.models.FewShotSegmenter` (whose folder format,
``config.json`` + ``model.safetensors``, is unchanged: every existing checkpoint folder loads) and
gives it the mixin's ``from_pretrained`` (a local folder, or a hub id resolved through the hub
cache: ``HF_HUB_CACHE/models--org--name/snapshots/<rev>/``), ``save_pretrained`` and
``push_to_hub``. Saving also writes the training config (``train_config.json``: what
``diffss evaluate`` / ``reproduce`` read to refuse scoring on training classes), the evaluation
table if one is given, and a generated model card (``README.md``): model, backbone, dataset, fold,
shots, evaluation protocol, evaluation table, data version (DVC hash) and training config.

    model = HubSegmenter.from_pretrained("org/diffss-pfenet-pascal5i-fold0").segmenter
    HubSegmenter.from_checkpoint("data/checkpoints/p0", evaluation="out/table.md").save_pretrained("release/p0")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelHubMixin, snapshot_download

from diffss.core.atomic import write_text_atomic

TRAIN_CONFIG = "train_config.json"
EVALUATION = "evaluation.md"
# Files a segmenter folder may hold that a download needs (not the training state of checkpoints/).
HUB_FILES = ["config.json", "model.safetensors", TRAIN_CONFIG, EVALUATION, "README.md"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model }} ({{ backbone }}) for few-shot segmentation{% if dataset %}: {{ dataset }}{% if fold is not none %} fold {{ fold }}{% endif %}{% endif %}

A diffss few-shot segmenter ([DifFSS](https://arxiv.org/abs/2307.00773): auxiliary supports painted by
Stable Diffusion + ControlNet). Load it with

```python
from diffss.evaluation.hub import HubSegmenter
model = HubSegmenter.from_pretrained("{{ repo_id }}").segmenter  # or a local copy of this folder
```

| | |
|---|---|
| model | {{ model }} |
| backbone | {{ backbone }} |
| dataset | {{ dataset or "unknown" }} |
| fold | {{ fold if fold is not none else "unknown" }} (its test classes were never trained on) |
| shots | {{ shots }} |
| evaluation protocol | {{ protocol }} |
| data version (DVC hash of the data it was trained and scored on) | {{ data_version or "unknown" }} |

## Evaluation

{{ evaluation or "No evaluation table was given when this folder was saved (`diffss reproduce` writes one)." }}

## Training config

```json
{{ train_config }}
```
"""


def _protocol_text(model: str, dataset: str | None) -> str:
    from diffss.evaluation.protocol import protocol_for

    if not dataset:
        return "unknown dataset"
    p = protocol_for(model, dataset)
    size = f"{p.size} px" if p.size else "the dataset's own size"
    return (f"{p.family}: {p.resize} to {size}, scored at the {p.score_at} size, "
            f"{p.episodes or 'the dataset default number of'} episodes x seeds {list(p.seeds)}")


class HubSegmenter(ModelHubMixin, library_name="diffss", tags=["few-shot-segmentation", "image-segmentation"],
                   repo_url="https://github.com/TrinitialChan/DifFSS", paper_url="https://arxiv.org/abs/2307.00773",
                   model_card_template=CARD_TEMPLATE):
    """A segmenter plus what its model card says: ``train_config`` (dict), ``evaluation``
    (Markdown), ``data_version`` (the DVC hash of the data it was trained and scored on)."""

    def __init__(self, segmenter, train_config: dict | None = None, evaluation: str | None = None,
                 data_version: str | None = None):
        self.segmenter = segmenter
        self.train_config = dict(train_config or {})
        self.evaluation = evaluation
        self.data_version = data_version

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, evaluation: str | os.PathLike | None = None,
                        data_version: str | None = None) -> "HubSegmenter":
        """A checkpoint folder (``diffss train`` / ``convert-checkpoint`` output) with its training
        config; ``evaluation``: Markdown text or a file holding it (e.g. ``reproduce``'s table.md);
        ``data_version``: default the ``data.dvc`` hash of the current repository, if there is one."""
        from diffss.models import load_model

        folder = Path(checkpoint)
        if evaluation is not None and Path(evaluation).is_file():
            evaluation = Path(evaluation).read_text()
        if data_version is None:
            from diffss.mlops.versioning import published_version

            data_version = published_version(".")
        return cls(load_model(folder), train_config=_read_json(folder / TRAIN_CONFIG),
                   evaluation=str(evaluation) if evaluation is not None else _read_text(folder / EVALUATION),
                   data_version=data_version)

    # -- the mixin's hooks -------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        self.segmenter.save_pretrained(save_directory)
        if self.train_config:
            write_text_atomic(save_directory / TRAIN_CONFIG, json.dumps(self.train_config, indent=2) + "\n")
        if self.evaluation:
            write_text_atomic(save_directory / EVALUATION, self.evaluation)
        # Written here (the mixin keeps an existing README.md): a folder saved again gets a fresh card.
        repo_id = getattr(self, "_pushing_to", None) or "ORG/NAME"
        write_text_atomic(save_directory / "README.md", str(self.generate_model_card(repo_id=repo_id)))

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """The mixin's upload (one commit of a freshly saved folder); the card names ``repo_id``."""
        self._pushing_to = repo_id
        try:
            return super().push_to_hub(repo_id, **kwargs)
        finally:
            self._pushing_to = None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", **_: Any) -> "HubSegmenter":
        from diffss.models import load_model

        folder = resolve_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                local_files_only=local_files_only, token=token)
        return cls(load_model(folder, map_location=map_location), train_config=_read_json(folder / TRAIN_CONFIG),
                   evaluation=_read_text(folder / EVALUATION), data_version=_read_json(folder / TRAIN_CONFIG).get("data_version"))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        cfg, model_cfg = self.train_config, self.segmenter.config
        shots = (f"trained with {cfg.get('true_shot')} real + {cfg.get('aux_shot', 0)} auxiliary supports per episode"
                 if cfg else f"K = {model_cfg['shot']}" if model_cfg.get("shot") else "any K")
        info = self._hub_mixin_info
        card_data = info.model_card_data.__class__(**info.model_card_data.to_dict())
        card_data.datasets = [cfg["dataset"]] if cfg.get("dataset") else None
        return ModelCard.from_template(
            card_data=card_data, template_str=info.model_card_template, repo_id=kwargs.get("repo_id", "org/name"),
            model=model_cfg["model"], backbone=model_cfg.get("backbone", "?"), dataset=cfg.get("dataset"),
            fold=cfg.get("fold"), shots=shots, protocol=_protocol_text(model_cfg["model"], cfg.get("dataset")),
            evaluation=self.evaluation, data_version=self.data_version or cfg.get("data_version"),
            train_config=json.dumps(cfg, indent=2) if cfg else "{} (not recorded: e.g. a converted official checkpoint)")


def resolve_folder(model_id: str | os.PathLike, revision: str | None = None, cache_dir=None,
                   force_download: bool = False, local_files_only: bool = False, token=None) -> Path:
    """A local segmenter folder as is, or a hub id's snapshot (from the cache when offline)."""
    if os.path.isdir(model_id):
        return Path(model_id)
    return Path(snapshot_download(repo_id=str(model_id), revision=revision, cache_dir=cache_dir,
                                  force_download=force_download, local_files_only=local_files_only, token=token,
                                  allow_patterns=HUB_FILES))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None
