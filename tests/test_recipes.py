"""The official recipes as presets: each value is the one the official config or code sets (read
from the repositories named in diffss.training.recipes), and each value names its source."""

import pytest

from diffss.training.recipes import RECIPES, recipe

# Written out from the official files (not computed from the presets): the test fails if a preset drifts.
OFFICIAL = {
    # dvlab-research/PFENet config/pascal/pascal_split0_resnet50.yaml + train.py
    "pfenet-pascal5i": dict(optimizer="sgd", lr=0.0025, momentum=0.9, weight_decay=0.0001, schedule="poly", power=0.9,
                            epochs=200, batch_size=4, crop_size=473, scale=(0.9, 1.1), rotate=(-10.0, 10.0),
                            augmentations=("scale", "rotate", "gaussian_blur", "horizontal_flip", "random_crop"),
                            lr_scale=10.0),  # util/util.py poly_learning_rate: index_split -1, scale_lr 10
    # chunbolang/BAM config/pascal/pascal_split0_resnet50.yaml + train.py
    "bam-pascal5i": dict(optimizer="sgd", lr=0.005, momentum=0.9, weight_decay=0.0001, schedule="poly", power=0.9,
                         epochs=200, batch_size=2, crop_size=473, scale=(0.9, 1.1), rotate=(-10.0, 10.0),
                         augmentations=("scale", "rotate", "gaussian_blur", "horizontal_flip", "random_crop"),
                         lr_scale=10.0),  # index_split: -1
    # chunbolang/BAM config/pascal/pascal_split0_resnet50_base.yaml
    "bam-base-pascal5i": dict(optimizer="sgd", lr=0.00025, momentum=0.9, weight_decay=0.0001, schedule="poly",
                              power=0.9, epochs=100, batch_size=3, crop_size=417, scale=(0.5, 2.0),
                              rotate=(-10.0, 10.0), lr_scale=10.0),  # index_split: 0: head (ppm, cls) at 10x
    # juhongm999/hsnet train.py: optim.Adam(lr=args.lr), --lr 1e-3, --bsz 20, --niter 2000, img_size=400
    "hsnet-pascal5i": dict(optimizer="adam", lr=0.001, momentum=None, weight_decay=0.0, schedule="constant",
                           epochs=2000, batch_size=20, crop_size=400, augmentations=(), lr_scale=1.0),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_each_preset_holds_the_official_values_and_names_their_source(name):
    preset = recipe(name)
    for key, value in OFFICIAL[name].items():
        assert getattr(preset, key) == value, (name, key)
    for key, value in OFFICIAL[name].items():
        if value is not None:
            assert key in preset.sources, (name, key)
    assert all("@" in where for where in preset.sources.values())  # repository@commit file: key


def test_every_preset_is_tested_and_unknown_names_are_refused():
    assert set(RECIPES) == set(OFFICIAL)
    with pytest.raises(ValueError, match="unknown recipe 'pspnet'"):
        recipe("pspnet")
