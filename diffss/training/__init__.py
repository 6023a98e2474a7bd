"""The one training core every trainer in diffss runs on.

- :mod:`diffss.training.config`: :class:`JsonConfig`, the base of every training config (JSON
  round trip, result-deciding fields) and :func:`check_same_run`, the one "is this folder the same
  run?" check.
- :mod:`diffss.training.checkpoint`: atomic step folders with a manifest (:class:`CheckpointDir`).
- :mod:`diffss.training.loop`: :class:`TrainingRun` (the output folder: config, checkpoints,
  published model, history, resume, legacy layouts) and :func:`run_steps` (the step loop), plus
  :func:`epoch_batches`, the resumable (and, under ``torchrun``, distributed) batch order.
- :mod:`diffss.training.distributed`: DistributedDataParallel under ``torchrun``.
- :mod:`diffss.training.recipes`: the official PFENet / BAM / HSNet recipes as named presets.
- :mod:`diffss.training.augment`: their train-time augmentation of (image, mask) pairs, seeded
  per (seed, epoch, episode) so resume stays exact.

The core imports only torch (torchvision for the augmentation) and :mod:`diffss.atomic`, so any stage's trainer may build on it
(segmenters: :mod:`diffss.train`, BAM's base learner: :mod:`diffss.train_base`, the generator:
:mod:`diffss.generation.training`, the small backbone: :mod:`diffss.models.pretraining`).
"""
