"""Auxiliary-support generation: SD 1.5 + ControlNet from control conditions.

``generate_auxiliary(samples, condition, out_dir, config, num_aux)`` writes images and the
``auxiliary.parquet`` table that ``diffss.data.AuxiliarySupports`` reads;
``generate_shard(samples, condition, out_dir, (i, n), ...)`` does one of n shards (concurrent
workers share the folder and table) and returns a ``GenerationResult``;
``run_generation(dataset_kwargs, ...)`` does so for a ``diffss.data`` dataset;
``build_tiny_diffusion(dir)`` makes a tiny random model set for offline tests and demos.
Heavy libraries (diffusers, transformers) are imported when a pipeline is built.
"""

from diffss.generation.config import (
    DEFAULT_BASE_MODEL,
    DEFAULT_CONTROLNETS,
    DEFAULT_NEGATIVE_PROMPT,
    PAPER_CONTROLNETS,
    GenerationConfig,
    aux_seed,
)
from diffss.generation.drift import drift_score, edge_alignment
from diffss.generation.pipeline import AuxiliaryGenerator, to_pil
from diffss.generation.run import (
    TABLE_COLUMNS,
    TABLE_NAME,
    GenerationResult,
    aux_relpath,
    dataset_samples,
    generate_auxiliary,
    generate_shard,
    parse_shard,
    run_generation,
    shard_device,
    shard_samples,
    summarize,
)
from diffss.generation.tiny import build_tiny_diffusion

__all__ = [
    "DEFAULT_BASE_MODEL", "DEFAULT_CONTROLNETS", "DEFAULT_NEGATIVE_PROMPT", "PAPER_CONTROLNETS", "TABLE_COLUMNS",
    "TABLE_NAME", "AuxiliaryGenerator", "GenerationConfig", "GenerationResult", "aux_relpath", "aux_seed",
    "build_tiny_diffusion", "dataset_samples", "drift_score", "edge_alignment", "generate_auxiliary",
    "generate_shard", "parse_shard", "run_generation", "shard_device", "shard_samples", "summarize", "to_pil",
]
