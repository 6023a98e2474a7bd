"""The MLOps glue: run tracking (:mod:`diffss.mlops.tracking`, Weights & Biases, offline by default)
and data versions (:mod:`diffss.mlops.versioning`, DVC's content hash, publish and pull).

Why low in the layers (just above :mod:`diffss.core`): both modules import no stage, and stages below
the top use them (``generation`` records the models it loads by content hash, computed the way DVC
hashes a folder). Publishing segmenters to the Hugging Face Hub
(:mod:`diffss.evaluation.hub`) is not here: its model card states the evaluation protocol and
``reproduce`` scores hub checkpoints, so it lives with evaluation.
"""
