"""One DifFSS experiment, fold by fold: its settings, its folders, and the stages that make them.

:class:`ExperimentConfig` (``config.py``) is the whole experiment in one validated object (a
pydantic dataclass holding the library's own :class:`~diffss.training.segmenter.TrainConfig`,
:class:`~diffss.evaluation.evaluate.EvalConfig` and :class:`~diffss.generation.GenerationConfig` as
templates), loaded from YAML with :meth:`ExperimentConfig.from_yaml`; its defaults are the
embedded demo. A fold is a :class:`Fold`. Every stage writes exactly one folder,
``<data_root>/<fold key>/<stage path>`` (:meth:`ExperimentConfig.folder`), and returns what it made
as plain values (numbers, tables, paths of pictures). The stages know nothing of Dagster;
``orchestration/`` calls them, one per asset, and takes each module's source as part of the code
version of the assets that run it.

- ``data.py``: :func:`index_raw_data` (the raw files' manifest), :func:`write_fold_splits`,
  :func:`changed_samples` (what the raw-data sensor compares).
- ``supports.py``: :func:`plan_auxiliary` (which supports get how many auxiliary images: every
  training sample may be drawn as a support; the test supports are those of the fixed evaluation
  episodes), :func:`draw_conditions`, :func:`generate_supports` (or, fanned out,
  :func:`prepare_supports` -> :func:`generate_supports_shard` per shard -> :func:`generate_supports`), their checks.
- ``training.py``: :func:`train_base_learner` (BAM's first stage), :func:`train_checkpoint`, :func:`evaluate_checkpoint`, :func:`xshot_study`.
- ``results.py``: :func:`results_table`, :func:`choose_checkpoint`, :func:`export_segmenter`.

Beside the stages, and not imported here: ``studies.py`` (seed studies, the demo's support check with
vs without auxiliary supports: ``diffss demo-study`` / ``diffss demo-check``) and ``figures.py`` (the
image grids and plots the stages save).
"""

from diffss.experiment.config import (
    BASELINE, CONDITIONS, DATASET_FOLDS, FOLDS, LEARNED_DEMO, RANDOM_HED, TINY, ExperimentConfig, Fold, tiny_generation,
    learned_demo_generation, load_split, test_episodes,
)
from diffss.experiment.data import (
    changed_samples, fold_test_classes, index_raw_data, raw_data_version, raw_manifest, write_fold_splits,
)
from diffss.experiment.results import choose_checkpoint, export_segmenter, onnx_parity, results_table
from diffss.experiment.supports import (
    auxiliary_problems, auxiliary_table, diffusion_models, draw_conditions, drifted_share, generate_supports,
    generate_supports_shard, plan_auxiliary, prepare_diffusion_models, prepare_supports,
)
from diffss.experiment.training import (
    evaluate_checkpoint, missing_classes, real_shot_gain, train_base_learner, train_checkpoint, xshot_study,
)

__all__ = [
    "BASELINE", "CONDITIONS", "DATASET_FOLDS", "FOLDS", "LEARNED_DEMO", "RANDOM_HED", "TINY", "ExperimentConfig", "Fold",
    "auxiliary_problems", "auxiliary_table", "changed_samples", "choose_checkpoint", "tiny_generation", "diffusion_models",
    "draw_conditions", "drifted_share", "evaluate_checkpoint", "export_segmenter", "fold_test_classes", "generate_supports", "generate_supports_shard",
    "index_raw_data", "learned_demo_generation", "load_split", "test_episodes", "missing_classes", "onnx_parity", "plan_auxiliary", "prepare_diffusion_models", "prepare_supports", "raw_data_version", "raw_manifest", "real_shot_gain",
    "results_table", "train_base_learner", "train_checkpoint", "write_fold_splits", "xshot_study",
]
