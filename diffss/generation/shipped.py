"""The shipped demo generator's folder, its settings and its weights' digests.

Kept apart from :mod:`diffss.generation.demo_generator` (which trains it) so that reading the
demo's generation settings does not import the training code: asset code versions follow the
import graph (orchestration/code_versions.py), and the experiment's settings read these.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from diffss.generation.config import GenerationConfig

PRETRAINED_DIR = Path(__file__).parent / "pretrained" / "demo"
#: The shipped generator taken on to 96 px (``diffss train-generator --preset demo --class-binding-of
#: shipped --resolution 96 --steps-scale 0.5``): chosen on base classes over the 64-px default, not yet
#: the default because it paints 2.8x slower and `make demo` must stay within 10 minutes (docs/demo.md).
PRETRAINED_96_DIR = PRETRAINED_DIR.with_name("demo-96")


def demo_generation_config(weights_dir: str | os.PathLike | None = None, **overrides) -> GenerationConfig:
    """The GenerationConfig of a demo generator folder, model paths made absolute; ``overrides``
    replace fields (e.g. device, seed, supports_per_call)."""
    weights_dir = Path(weights_dir or PRETRAINED_DIR).resolve()
    path = weights_dir / "generation_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train the demo generator with "
                                "`diffss train-generator --preset demo` or restore the shipped weights")
    config = GenerationConfig.from_json(path)
    config = dataclasses.replace(config, base_model=str(weights_dir / config.base_model),
                                 controlnets={k: str(weights_dir / v) for k, v in config.controlnets.items()})
    return dataclasses.replace(config, **overrides)


def weights_digest(weights_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """SHA-256 of every weights file of a demo generator folder (relative path -> hex digest)."""
    import hashlib

    root = Path(weights_dir or PRETRAINED_DIR)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}
