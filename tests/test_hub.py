"""Segmenter folders through huggingface_hub's ModelHubMixin: an existing checkpoint folder loads,
save_pretrained writes the model card, and a hub id loads from the hub cache layout
(models--org--name/snapshots/<rev>/ + refs/main). No network: HF_HUB_OFFLINE is set (conftest)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from diffss.cli import main as cli_main
from diffss.evaluation.hub import HubSegmenter, resolve_folder
from diffss.models import build_model, load_model

TRAIN_CONFIG = {"dataset": "pascal5i", "fold": 2, "model": "pfenet", "backbone": "small", "true_shot": 1, "aux_shot": 4,
                "steps": 20000, "lr": 0.0025}


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder as `diffss train` leaves it (config.json, model.safetensors, train_config.json)."""
    torch.manual_seed(0)
    folder = build_model("pfenet", backbone="small").save_pretrained(tmp_path / "checkpoint")
    (folder / "train_config.json").write_text(json.dumps(TRAIN_CONFIG))
    return folder


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_existing_folder_loads_and_saves_with_model_card(checkpoint, tmp_path):
    loaded = HubSegmenter.from_pretrained(checkpoint)
    assert same_weights(loaded.segmenter, load_model(checkpoint)) and loaded.train_config == TRAIN_CONFIG

    table = "| setting | Fold-2 |\n|---|---|\n| 1-shot | 55.10 ±0.40 [54.2, 56.0] |\n"
    release = tmp_path / "release"
    HubSegmenter.from_checkpoint(checkpoint, evaluation=table, data_version="5f1e0c7d2a.dir").save_pretrained(release)
    assert {p.name for p in release.iterdir()} == {"config.json", "model.safetensors", "train_config.json",
                                                   "evaluation.md", "README.md"}
    card = ModelCard.load(release / "README.md")
    assert card.data.library_name == "diffss" and "few-shot-segmentation" in card.data.tags
    assert card.data.datasets == ["pascal5i"]
    text = card.text
    for expected in ("| model | pfenet |", "| backbone | small |", "| dataset | pascal5i |", "| fold | 2 ",
                     "trained with 1 real + 4 auxiliary supports", "pfenet: pad to 473 px, scored at the original size, "
                     "5000 episodes x seeds [0]", "scored on) | 5f1e0c7d2a.dir |", 'HubSegmenter.from_pretrained("ORG/NAME")', table.strip(), '"lr": 0.0025'):
        assert expected in text, expected
    again = HubSegmenter.from_pretrained(release)
    assert same_weights(again.segmenter, loaded.segmenter) and again.evaluation == table
    x = torch.rand(1, 3, 64, 64)
    s, m = torch.rand(1, 1, 3, 64, 64), (torch.rand(1, 1, 64, 64) > 0.5).long()
    assert torch.equal(again.segmenter(x, s, m), loaded.segmenter(x, s, m))


def test_hub_id_loads_from_the_hub_cache_layout(checkpoint, tmp_path, capsys):
    release = tmp_path / "release"
    assert cli_main(["publish-model", str(checkpoint), "--output", str(release), "--data-version", "abc"]) == 0
    assert "segmenter folder with model card" in capsys.readouterr().out
    cache, revision = tmp_path / "hub-cache", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--diffss-org--pfenet-fold2" / "snapshots" / revision
    shutil.copytree(release, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)

    model = HubSegmenter.from_pretrained("diffss-org/pfenet-fold2", cache_dir=cache)
    assert same_weights(model.segmenter, load_model(checkpoint))
    assert model.train_config["fold"] == 2 and resolve_folder("diffss-org/pfenet-fold2", cache_dir=cache) == snapshot
    with pytest.raises(Exception, match="(?i)offline|cannot find|not found|local"):
        HubSegmenter.from_pretrained("diffss-org/not-there", cache_dir=cache)


def test_push_to_hub_uploads_the_saved_folder_with_its_card(checkpoint, monkeypatch):
    """push_to_hub is the mixin's: create the repo, upload one saved folder. The Hub API is replaced
    by a recorder (no network); what would be uploaded is checked."""
    import huggingface_hub.hub_mixin as hub_mixin

    uploads = {}

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads[repo_id] = {p.name: p.read_bytes() for p in folder_path.iterdir()}
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(hub_mixin, "HfApi", RecordingApi)
    url = HubSegmenter.from_checkpoint(checkpoint, data_version="abc").push_to_hub("diffss-org/pfenet-fold2")
    assert url.endswith("diffss-org/pfenet-fold2/commit/0")
    files = uploads["diffss-org/pfenet-fold2"]
    assert {"config.json", "model.safetensors", "train_config.json", "README.md"} <= set(files)
    assert b'HubSegmenter.from_pretrained("diffss-org/pfenet-fold2")' in files["README.md"]
