"""The machinery every stage uses, at the bottom of the layers (it imports no other part of diffss).

- :mod:`diffss.core.atomic`: atomic writes (a kill never leaves half a file) and the removal of
  temporaries a killed write left behind.
- :mod:`diffss.core.config`: :class:`~diffss.core.config.JsonConfig`, the base of every config,
  training and generation (JSON round trip, result-deciding fields) and
  :func:`~diffss.core.config.check_same_run`, the one "is this folder the same run?" check.
- :mod:`diffss.core.checkpoint`: atomic step folders with a manifest
  (:class:`~diffss.core.checkpoint.CheckpointDir`).
- :mod:`diffss.core.loop`: :class:`~diffss.core.loop.TrainingRun` (the output folder: config,
  checkpoints, published model, history, resume, legacy layouts) and
  :func:`~diffss.core.loop.run_steps` (the step loop), plus
  :func:`~diffss.core.loop.epoch_batches`, the resumable (and, under ``torchrun``, distributed)
  batch order.
- :mod:`diffss.core.distributed`: the data-parallel world (DistributedDataParallel under ``torchrun``).

Why at the bottom: three stages train something (the generator in ``generation``, the small backbone
in ``models``, the segmenters and BAM's base learner in ``training``), and all of them run on this one
loop and checkpoint format; the loop imports only torch and :mod:`diffss.core.atomic`, so it sits
below the first stage that uses it.
"""
