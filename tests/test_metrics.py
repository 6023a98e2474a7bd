import math
import warnings

import numpy as np
import pytest
import torch

from diffss.evaluation.metrics import FewShotMeter

# Three hand-computed episodes over classes 1 and 2 (see the counts in each comment).
# A, class 1: fg inter 1, union 3; bg inter 1, union 3
A_PRED = np.array([[1, 0], [1, 0]])
A_GT = np.array([[1, 1], [0, 0]])
# B, class 1: fg inter 4, union 4; bg inter 0, union 0
B_PRED = np.ones((2, 2), dtype=np.int64)
B_GT = np.ones((2, 2), dtype=np.int64)
# C, class 2: bottom row ignored (255): fg inter 1, union 2; bg inter 0, union 1
C_PRED = np.ones((2, 2), dtype=np.int64)
C_GT = np.array([[0, 1], [255, 255]])


def filled_meter():
    meter = FewShotMeter([1, 2])
    meter.update(A_PRED, A_GT, 1)
    meter.update(B_PRED, B_GT, 1)
    meter.update(C_PRED, C_GT, 2)
    return meter


def test_hand_computed_episodes():
    result = filled_meter().compute()
    # class 1 accumulates over episodes: (1+4)/(3+4), not the mean of per-episode IoUs (66.7)
    assert result["per_class"][1] == pytest.approx(100 * 5 / 7)
    assert result["per_class"][2] == pytest.approx(50.0)
    assert result["miou"] == pytest.approx((100 * 5 / 7 + 50) / 2)
    # FB-IoU: fg 6/9, bg 1/4 over all episodes
    assert result["fg_iou"] == pytest.approx(100 * 6 / 9)
    assert result["bg_iou"] == pytest.approx(25.0)
    assert result["fbiou"] == pytest.approx((100 * 6 / 9 + 25) / 2)
    assert result["episodes"] == 3
    assert result["missing"] == []


def test_ignore_pixels_are_excluded():
    meter = FewShotMeter([2])
    meter.update(C_PRED, C_GT, 2)
    # counting the 255 pixels as background would give fg union 4 (IoU 25)
    assert meter.compute()["per_class"][2] == pytest.approx(50.0)
    plain = FewShotMeter([2])
    plain.update(C_PRED[:1], C_GT[:1], 2)  # the same episode without the ignored row
    assert plain.compute() == meter.compute()


def test_batched_torch_update_matches_single_updates():
    meter = FewShotMeter([1, 2])
    pred = torch.tensor(np.stack([A_PRED, B_PRED, C_PRED]))
    gt = torch.tensor(np.stack([A_GT, B_GT, C_GT]))
    meter.update(pred, gt, [1, 1, 2])
    assert meter.compute() == filled_meter().compute()
    same_class = FewShotMeter([1])
    same_class.update(torch.tensor(np.stack([A_PRED, B_PRED])).bool(), np.stack([A_GT, B_GT]), 1)
    assert same_class.compute()["per_class"][1] == pytest.approx(100 * 5 / 7)


def test_missing_classes_are_reported_and_skipped():
    meter = FewShotMeter([1, 2, 3])
    meter.update(A_PRED, A_GT, 1)
    with pytest.warns(UserWarning, match="no episodes"):
        result = meter.compute()
    assert result["missing"] == [2, 3]
    assert result["miou"] == pytest.approx(100 / 3)
    assert math.isnan(result["per_class"][2])


def test_bad_input_errors():
    meter = FewShotMeter([1, 2])
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        meter.update(np.zeros((2, 2)), np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match="unknown class id.*7"):
        meter.update(A_PRED, A_GT, 7)
    with pytest.raises(ValueError, match="2 class ids for a batch of 3"):
        meter.update(np.zeros((3, 2, 2)), np.zeros((3, 2, 2)), [1, 2])
    with pytest.raises(ValueError, match="pred must hold only 0/1"):
        meter.update(np.full((2, 2), 0.7), A_GT, 1)
    with pytest.raises(ValueError, match="gt must hold only"):
        meter.update(A_PRED, np.full((2, 2), 3), 1)
    with pytest.raises(ValueError, match="no episodes"):
        meter.compute()
    with pytest.raises(ValueError, match="duplicates"):
        FewShotMeter([1, 1])


def test_to_frame():
    frame = filled_meter().to_frame({1: "aeroplane", 2: "bicycle"})
    assert list(frame.columns) == ["class_id", "class_name", "iou", "episodes"]
    assert frame["class_name"].tolist() == ["aeroplane", "bicycle", "mean"]
    assert frame["episodes"].tolist() == [2, 1, 3]
    assert frame["iou"].iloc[-1] == pytest.approx((100 * 5 / 7 + 50) / 2)
    assert frame["class_id"].iloc[:2].tolist() == [1, 2] and frame["class_id"].isna().iloc[-1]
    assert frame.attrs["fbiou"] == pytest.approx((100 * 6 / 9 + 25) / 2)
    assert filled_meter().to_frame()["class_name"].tolist() == ["1", "2", "mean"]


def test_merge_equals_one_meter():
    first = FewShotMeter([1, 2])
    first.update(A_PRED, A_GT, 1)
    second = FewShotMeter([1, 2])
    second.update(B_PRED, B_GT, 1)
    second.update(C_PRED, C_GT, 2)
    assert first.merge(second) is first
    assert first.compute() == filled_meter().compute()
    other_fold = FewShotMeter([5])
    other_fold.update(B_PRED, B_GT, 5)
    first.merge(other_fold)
    assert first.class_ids == [1, 2, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert first.compute()["per_class"][5] == pytest.approx(100.0)
