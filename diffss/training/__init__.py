"""Training: the segmenters and BAM's base learner, the stage after ``models`` and before ``evaluation``.

- :mod:`diffss.training.segmenter`: episodic training of a few-shot segmenter
  (:class:`~diffss.training.segmenter.TrainConfig`, :func:`~diffss.training.segmenter.train`).
- :mod:`diffss.training.base_learner`: BAM's first stage, the PSPNet base learner
  (:class:`~diffss.training.base_learner.BaseTrainConfig`, :func:`~diffss.training.base_learner.train_base`).
- :mod:`diffss.training.recipes`: the official PFENet / BAM / HSNet recipes as named presets.
- :mod:`diffss.training.augment`: their train-time augmentation of (image, mask) pairs, seeded
  per (seed, epoch, episode) so resume stays exact.

Every trainer runs on the one training core in :mod:`diffss.core` (loop, step checkpoints, config
base class, data-parallel world), which sits at the bottom of the layers because two trainers live
in earlier stages: the generator's (:mod:`diffss.generation.generator_training`, which the demo's
generator in ``generation`` imports) and the small backbone's pretraining
(:mod:`diffss.models.pretraining`). Evaluation sits above this package: it reads the checkpoints
training writes, and :mod:`diffss.evaluation.evaluate` shares this stage's device choice and
auxiliary-table loading.
"""
