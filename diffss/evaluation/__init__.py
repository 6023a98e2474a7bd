"""Evaluation: how a few-shot segmenter is scored, the stage after ``training`` and before ``export``.

- :mod:`diffss.evaluation.evaluate`: fixed test episodes per seed, mIoU / FB-IoU, example panels
  (:class:`~diffss.evaluation.evaluate.EvalConfig`, :func:`~diffss.evaluation.evaluate.evaluate`).
- :mod:`diffss.evaluation.protocol`: each model family's published test protocol (resize, size,
  the size scored at, episodes, seeds).
- :mod:`diffss.evaluation.metrics`: :class:`~diffss.evaluation.metrics.FewShotMeter` (mIoU, FB-IoU).
- :mod:`diffss.evaluation.class_overlap`: the refusal to score a segmenter on classes it trained on.
- :mod:`diffss.evaluation.reproduce`: the paper's table from published or converted checkpoints,
  with intervals over episodes.
- :mod:`diffss.evaluation.hub`: segmenter folders on the Hugging Face Hub (load, save, push) with a
  model card that states the evaluation protocol and table. It lives here, not with the MLOps glue
  in :mod:`diffss.mlops`, because its card reads the protocol (this package) and ``reproduce`` scores
  hub checkpoints, while :mod:`diffss.mlops` must stay below ``generation``, which uses it.

Why above ``training``: evaluation reads what training writes (checkpoints, ``train_config.json``)
and reuses its device choice and auxiliary-table loading; training imports nothing from here.
"""
