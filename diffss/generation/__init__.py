"""Auxiliary-support generation: SD 1.5 + ControlNet from control conditions.

``generate_auxiliary(samples, condition, out_dir, config, num_aux)`` writes images and the
``auxiliary.parquet`` table that ``diffss.data.AuxiliarySupports`` reads;
``run_generation(dataset_kwargs, ...)`` does so for a ``diffss.data`` dataset;
``build_tiny_diffusion(dir)`` makes a tiny random model set for offline tests and demos.
Heavy libraries (diffusers, transformers) are imported when a pipeline is built.
"""

from diffss.generation.config import (
    DEFAULT_BASE_MODEL,
    DEFAULT_CONTROLNETS,
    DEFAULT_NEGATIVE_PROMPT,
    GenerationConfig,
    aux_seed,
)
from diffss.generation.drift import drift_score, edge_alignment
from diffss.generation.pipeline import AuxiliaryGenerator, to_pil
from diffss.generation.run import TABLE_COLUMNS, TABLE_NAME, aux_relpath, generate_auxiliary, run_generation, summarize
from diffss.generation.tiny import build_tiny_diffusion

__all__ = [
    "DEFAULT_BASE_MODEL", "DEFAULT_CONTROLNETS", "DEFAULT_NEGATIVE_PROMPT", "TABLE_COLUMNS", "TABLE_NAME",
    "AuxiliaryGenerator", "GenerationConfig", "aux_relpath", "aux_seed", "build_tiny_diffusion", "drift_score",
    "edge_alignment", "generate_auxiliary", "run_generation", "summarize", "to_pil",
]
