"""The demo world's oracle auxiliary supports: what an ideal generator would paint.

For a support of demo class k, the oracle image is class k's own texture (a fact of the demo
world: :func:`diffss.data.demo.render_in_mask`) painted into the support's mask, in new colours,
on a new background under new lighting. It is written in the generation layout and table
(``<out>/<dataset>/oracle/auxiliary.parquet``, condition ``"oracle"``), so training and
evaluation read it exactly as they read generated supports. Measuring with it tells whether
the demo world *can* reward auxiliary supports, before any generator is asked to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from diffss.conditions import is_valid_image, remove_stale_temporaries, save_png_atomic, unique_samples
from diffss.core.atomic import atomic_path
from diffss.data.demo import MAX_CLASSES, class_spec, render_in_mask
from diffss.generation.config import aux_seed
from diffss.generation.run import TABLE_NAME, _SupportCache, _write_table, aux_relpath

ORACLE = "oracle"


def demo_class_index(class_name: str) -> int:
    """0-based demo class index of a readable class name such as ``"striped star"``."""
    for k in range(MAX_CLASSES):
        if " ".join(class_spec(k)) == class_name.replace("_", " "):
            return k
    raise ValueError(f"{class_name!r} is not a demo class (texture + shape, e.g. 'striped star')")


def write_oracle_auxiliary(samples: Sequence, out_dir: str | os.PathLike, num_aux: int = 4,
                           dataset_name: str = "demo", seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Write ``num_aux`` oracle images per (support, class) sample and the generation table.

    Image ``i`` of a support is seeded by :func:`aux_seed` (as generated ones are), so a rerun
    reproduces it; images that already decode are kept, so a killed run resumes.
    """
    if num_aux < 1:
        raise ValueError(f"num_aux must be >= 1, got {num_aux}")
    root = Path(out_dir) / dataset_name / ORACLE
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    supports, rows = _SupportCache(), {}
    samples = unique_samples(samples)
    for sample in tqdm(samples, desc=f"oracle {dataset_name}", unit="support", disable=not progress):
        k = demo_class_index(sample.class_name)
        for i in range(num_aux):
            image_seed = aux_seed(dataset_name, sample.name, sample.class_id, i, seed)
            row = {"dataset": dataset_name, "support_name": str(sample.name), "class_id": int(sample.class_id),
                   "class_name": str(sample.class_name), "aux_index": i, "seed": image_seed,
                   "prompt": str(sample.class_name), "condition": ORACLE, "model_ids": ORACLE,
                   "path": aux_relpath(sample.class_id, sample.name, i)}
            path = root / row["path"]
            if is_valid_image(path):
                with Image.open(path) as im:
                    image = im.convert("RGB")
            else:
                image = render_in_mask(k, np.asarray(sample.load_mask()) == 1, np.random.default_rng(image_seed))
                save_png_atomic(image, path)
            rows[(row["support_name"], row["class_id"], i)] = supports.finish_row(row, image, sample)
        supports.clear()
    return _write_table(root / TABLE_NAME, rows)


def write_autoencoded_auxiliary(table: str | os.PathLike, generation, name: str = "oracle_autoencoded",
                                progress: bool = True) -> Path:
    """A copy of an auxiliary set (its table and images) beside it in ``<name>/``, every image passed
    through ``generation``'s autoencoder at its resolution: down to ``generation.resolution``,
    encoded, decoded, back to the image's size. For the oracle this is the best a generator with this
    autoencoder could paint; the oracle's gain minus this set's gain is what the autoencoder and the
    resolution alone cost, the rest of a generator's shortfall is what its denoiser paints. Images
    that already decode are kept (resumable); returns the new table's path."""
    import shutil

    import torch
    from diffusers import AutoModel

    from diffss.generation.pipeline import quiet_if_tiny_autoencoder

    table = Path(table)
    rows = pd.read_parquet(table)
    out = table.parent.parent / name
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    with quiet_if_tiny_autoencoder(generation.base_model):
        vae = AutoModel.from_pretrained(generation.base_model, subfolder="vae",
                                        local_files_only=generation.local_files_only).float().eval()
    size = int(generation.resolution)
    for rel in tqdm(list(rows["path"]), desc=f"autoencode {name}", unit="img", disable=not progress):
        target = out / str(rel)
        if is_valid_image(target):
            continue
        with Image.open(table.parent / str(rel)) as im:
            source = im.convert("RGB")
        x = torch.from_numpy(np.asarray(source.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1)
        with torch.no_grad():
            encoded = vae.encode(x.permute(2, 0, 1)[None])
            latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()
            y = vae.decode(latents).sample[0].clamp(-1, 1)
        pixels = ((y.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        save_png_atomic(Image.fromarray(pixels).resize(source.size, Image.BICUBIC), target)
    copied = out / table.name
    with atomic_path(copied) as tmp:
        shutil.copyfile(table, tmp)
    return copied
