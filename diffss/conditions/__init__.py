"""Control conditions for ControlNet: seg (ADE20k colours), HED soft edge, scribble.

``build_conditions(samples, kinds, out_dir)`` writes them for (support image, class) samples;
``run_conditions(dataset_kwargs, kinds, out_dir)`` does so for a ``diffss.data`` dataset.
"""

from diffss.conditions.build import (
    CONDITION_KINDS,
    RANDOM_HED,
    SOBEL_EDGES,
    build_conditions,
    condition_path,
    load_square,
    parse_kinds,
    run_conditions,
    unique_samples,
)
from diffss.conditions.files import is_valid_image, remove_stale_temporaries, safe_name, save_png_atomic
from diffss.conditions.hed import (
    DEFAULT_HED_MODEL,
    HedConditioner,
    SobelEdgeConditioner,
    dilated_object_mask,
    dilation_kernel_size,
    restrict_to_mask,
    scribble_from_hed,
)
from diffss.conditions.seg import BACKGROUND_ADE_INDEX, seg_condition
from diffss.conditions.tables import (
    FALLBACK_ADE_INDEX,
    ClassToAde,
    ade20k_palette,
    ade_color,
    ade_index_for_name,
)

__all__ = [
    "BACKGROUND_ADE_INDEX", "CONDITION_KINDS", "DEFAULT_HED_MODEL", "FALLBACK_ADE_INDEX", "ClassToAde",
    "HedConditioner", "ade20k_palette", "ade_color", "ade_index_for_name", "build_conditions",
    "condition_path", "dilated_object_mask", "dilation_kernel_size", "is_valid_image", "load_square",
    "parse_kinds", "remove_stale_temporaries", "restrict_to_mask", "run_conditions", "safe_name",
    "save_png_atomic", "scribble_from_hed", "seg_condition", "unique_samples",
]
