"""Training the segmenters: the official recipes (:mod:`diffss.training.recipes`) as named presets.

Every trainer runs on the one training core in :mod:`diffss.core` (loop, step checkpoints, config
base class, data-parallel world): segmenters (:mod:`diffss.train`), BAM's base learner
(:mod:`diffss.train_base`), the generator (:mod:`diffss.generation.generator_training`) and the small backbone
(:mod:`diffss.models.pretraining`).

- :mod:`diffss.training.recipes`: the official PFENet / BAM / HSNet recipes as named presets.
- :mod:`diffss.training.augment`: their train-time augmentation of (image, mask) pairs, seeded
  per (seed, epoch, episode) so resume stays exact.
"""
