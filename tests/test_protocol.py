"""Evaluation as the papers score: protocol choice, the official resizes, original-size scoring
and HSNet's episode list."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffss.data import collate_episodes, load_dataset
from diffss.data.episodes import image_tensor, mask_tensor, padded_shape
from diffss.models import FewShotSegmenter
from diffss.evaluation.protocol import EvalProtocol, protocol_for, scored_prediction
from diffss.evaluation.evaluate import EvalConfig, evaluate


def test_protocol_of_model_and_dataset():
    pfenet = protocol_for("pfenet", "pascal5i")
    assert (pfenet.resize, pfenet.size, pfenet.score_at, pfenet.episodes, pfenet.seeds) == ("pad", 473, "original", 5000, (0,))
    assert protocol_for("prototype", "coco20i").size == 641
    bam = protocol_for("bam", "pascal5i")
    assert (bam.resize, bam.size, bam.episodes, bam.seeds) == ("pad", 473, 1000, (0, 1, 2, 3, 4))
    hsnet = protocol_for("hsnet", "pascal5i")
    assert (hsnet.resize, hsnet.size, hsnet.score_at, hsnet.query_order) == ("squash", 400, "input", "file")
    assert protocol_for("hsnet", "coco20i").query_order is None  # its class-balanced draw
    assert protocol_for("hsnet", "fss1000").episodes is None  # every test image once
    # the demo keeps its size by config, never by a default meant for PASCAL
    assert protocol_for("pfenet", "demo").size is None
    assert EvalConfig(dataset="demo", image_size=96).protocol_for("pfenet").size == 96
    chosen = EvalConfig(dataset="pascal5i", protocol="hsnet", score_at="original", seeds=(3,)).protocol_for("pfenet")
    assert (chosen.family, chosen.resize, chosen.score_at, chosen.seeds) == ("hsnet", "squash", "original", (3,))
    with pytest.raises(ValueError, match="protocol"):
        protocol_for("pfenet", "pascal5i", family="psp")
    with pytest.raises(ValueError, match="score_at"):
        EvalConfig(score_at="both")
    with pytest.raises(ValueError, match="protocol"):
        EvalConfig(protocol="pspnet")
    with pytest.raises(ValueError, match="resize"):
        EvalProtocol("pfenet", "crop", 473, "original", None, (0,))


def test_pad_resize_is_the_official_transform():
    """Long side to S, both sides floored to a multiple of 8, top-left on 0 / 255; bilinear and
    nearest as OpenCV's INTER_LINEAR / INTER_NEAREST on the official float32 arrays."""
    assert padded_shape(375, 500, 473) == (352, 472)
    assert padded_shape(500, 375, 473) == (472, 352)
    assert padded_shape(137, 128, 129) == (128, 120)
    rng = np.random.default_rng(0)
    cv2 = pytest.importorskip("cv2")
    for (height, width), (h, w) in (((375, 500), (352, 472)), ((131, 97), (472, 344)), ((60, 80), (352, 472))):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = (rng.random((height, width)) > 0.5).astype(np.uint8)
        mask[:10] = 255
        image = image_tensor(Image.fromarray(rgb), 473, "pad")
        labels = mask_tensor(mask, 473, "pad")
        assert image.shape == (3, 473, 473) and labels.shape == (473, 473)
        assert (image[:, h:] == 0).all() and (image[:, :, w:] == 0).all()
        assert (labels[h:] == 255).all() and (labels[:, w:] == 255).all()
        official = cv2.resize(rgb.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) / 255.0
        assert np.abs(image[:, :h, :w].permute(1, 2, 0).numpy() - official).max() < 1e-6
        official_mask = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(labels[:h, :w].numpy(), official_mask.astype(np.int64))


def test_hsnet_episode_list_is_the_official_one(tmp_path):
    """HSNet's test loader (seed 0, file order, supports drawn per query with repeats), run
    once from the official code: the sha256 of its 1000 episodes (``query support...`` lines)."""
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    official = {(0, 1): "1cf502ba111e748f", (0, 5): "1928b52f0fa46880", (1, 1): "8cf86907a2aab6f3"}
    for (fold, shot), digest in official.items():
        protocol = protocol_for("hsnet", "pascal5i")
        ds = load_dataset("pascal5i", root=root, fold=fold, split="test", shot=shot, seed=protocol.seeds[0],
                          query_sampling=protocol.query_order, episodes=protocol.episodes)
        episodes = ds.episode_list()
        text = "\n".join(f"{query} {' '.join(supports)}" for query, supports in episodes)
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest, (fold, shot)
        if (fold, shot) == (0, 1):
            assert episodes[:2] == [("2007_000033", ["2010_001174"]), ("2007_000061", ["2007_005705"])]
            assert episodes[346] == ("2007_000033", ["2010_003716"])  # the list again, new supports


class ColourMatch(FewShotSegmenter):
    """A fixed, parameter-free predictor: foreground where a pixel's colour is near the supports'
    mean foreground colour (soft logits, so resampling moves its boundary)."""

    model_name = "colour_match"

    def encode_support(self, support_images, support_masks):
        fg = (support_masks == 1).unsqueeze(2).float()
        return ((support_images * fg).sum((1, 3, 4)) / fg.sum((1, 3, 4)).clamp(min=1),)

    def decode_query(self, query, colour):
        distance = (query - colour[:, :, None, None]).abs().amax(dim=1, keepdim=True)
        return torch.cat([distance - 0.2, 0.2 - distance], dim=1)


def make_colour_folder(root: Path) -> Path:
    """Two classes (a red and a green ellipse) on images of different, non-square sizes;
    labels 1..2, 255 on a thin band along the top of each object's outline."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("red\ngreen\n")
    sizes = [(150, 200), (210, 120), (97, 131), (180, 180), (120, 260), (160, 90)]
    for i, (h, w) in enumerate(sizes * 2):
        cls = 1 + i % 2
        yy, xx = np.mgrid[:h, :w]
        cy, cx, ry, rx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65), h * rng.uniform(0.15, 0.3), w * rng.uniform(0.15, 0.3)
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        image = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
        image[r <= 1] = (220, 30, 30) if cls == 1 else (30, 210, 40)
        label = np.where(r <= 1, cls, 0).astype(np.uint8)
        label[(r > 0.95) & (r < 1.05) & (yy < cy)] = 255
        Image.fromarray(image).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(label).save(root / "masks" / f"im{i:02d}.png")
    return root


def test_prediction_at_473_is_scored_against_the_original_label(tmp_path):
    root = make_colour_folder(tmp_path / "colours")
    model = ColourMatch().eval()
    protocol = protocol_for("pfenet", "folder", image_size=473)
    ds = load_dataset("folder", root=root, fold=None, split="test", episodes=6, seed=0, image_size=473,
                      resize="pad", original_labels=True)
    batch = collate_episodes([ds[i] for i in range(3)])
    assert batch["query_image"].shape == (3, 3, 473, 473)
    sizes = [tuple(s) for s in batch["query_size"].tolist()]
    assert batch["query_mask_original"].shape == (3, max(h for h, _ in sizes), max(w for _, w in sizes))
    with torch.no_grad():
        pred, label = scored_prediction(model, batch, protocol, torch.device("cpu"))
        logits = model(batch["query_image"], batch["support_images"], batch["support_masks"])
    assert pred.shape == label.shape
    for i, (h, w) in enumerate(sizes):
        # the official ori_resize: the 473 x 473 logits to L x L, top-left h x w
        side = max(h, w)
        expected = F.interpolate(logits[i : i + 1], size=(side, side), mode="bilinear", align_corners=True).argmax(1)[0, :h, :w]
        assert torch.equal(pred[i, :h, :w], expected)
        original = torch.from_numpy(ds.samples[ds.episode_indices(i)[0]].load_mask().astype(np.int64))
        assert torch.equal(label[i, :h, :w], original) and (label[i, h:] == 255).all() and (label[i, :, w:] == 255).all()

    # the whole evaluation, batched over episodes of different sizes, at both resolutions
    common = dict(dataset="folder", root=str(root), fold=None, episodes=12, image_size=473, batch_size=4, device="cpu")
    at_original = evaluate(model, EvalConfig(**common), progress=False)
    at_input = evaluate(model, EvalConfig(**common, score_at="input"), progress=False)
    assert at_original.protocol["score_at"] == "original" and at_input.protocol["score_at"] == "input"
    report = {row.class_name: (row.iou, at_input.per_class.iou[i]) for i, row in at_original.per_class.iterrows()}
    print("per-class IoU, original size vs 473 px:", report)
    for original_iou, input_iou in report.values():
        assert 90 < original_iou < 100 and 90 < input_iou < 100
    assert at_original.miou != at_input.miou  # a different resolution scores differently


def test_hsnet_scores_at_the_original_size_from_its_low_resolution_logits():
    """HSNet's use_original_imgsize: each shot's low-res logits go straight to the original size,
    then the vote; ``scored_prediction`` hands it the (h, w) of every episode."""
    torch.manual_seed(0)
    from diffss.models import build_model

    model = build_model("hsnet").eval()
    protocol = protocol_for("hsnet", "folder", image_size=64, score_at="original")
    gen = torch.Generator().manual_seed(1)
    batch = {
        "query_image": torch.rand(2, 3, 64, 64, generator=gen),
        "support_images": torch.rand(2, 2, 3, 64, 64, generator=gen),
        "support_masks": (torch.rand(2, 2, 64, 64, generator=gen) > 0.5).long(),
        "query_size": torch.tensor([[50, 90], [70, 40]]),
        "query_mask_original": torch.full((2, 70, 90), 255, dtype=torch.int64),
    }
    with torch.no_grad():
        pred, _ = scored_prediction(model, batch, protocol, torch.device("cpu"))
        low = model._shot_logits(model._normalise(batch["query_image"]), model.encode_support(batch["support_images"], batch["support_masks"]))
    shots = F.interpolate(low[1], size=(70, 40), mode="bilinear", align_corners=True).argmax(1)
    votes = shots.sum(0)
    assert torch.equal(pred[1, :70, :40], (votes.float() / votes.max().clamp(min=1) >= 0.5).long())
    assert pred.shape == (2, 70, 90) and (pred[0, 50:] == 0).all()
