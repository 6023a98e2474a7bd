"""Evaluation: how a few-shot segmenter is scored.

- :mod:`diffss.evaluation.protocol`: each model family's published test protocol (resize, size,
  the size scored at, episodes, seeds).
- :mod:`diffss.evaluation.metrics`: :class:`~diffss.evaluation.metrics.FewShotMeter` (mIoU, FB-IoU).
- :mod:`diffss.evaluation.class_overlap`: the refusal to score a segmenter on classes it trained on.
"""
