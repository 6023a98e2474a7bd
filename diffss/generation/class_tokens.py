"""Class tokens learned from the supports (textual inversion), in diffusers' format.

Stable Diffusion knows "cat" and "bus"; it does not know a user's defect type or the demo's
"striped star". Textual inversion (Gal et al., 2022) learns one new word embedding from a few
images, with the whole generator frozen: the denoising loss of the support images under the
prompt "a real shot photo of <token>". Here the loss is weighted by the support mask (object
pixels 1, the rest ``background_weight``), so the token learns the object, not its scene.

A token is learned from the supports it is given and nothing else: the generation run learns one
per support from that support alone, so a test class's token never sees a query or any other
test image. Tokens are saved as ``{token: embedding}`` safetensors, the format diffusers'
``load_textual_inversion`` reads; the file is written atomically and reused when present.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffss.core.atomic import atomic_path


def token_name(class_id: int, support_name: str) -> str:
    """The token of one support: unique, and a single piece for any BPE tokenizer once added."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in str(support_name))
    return f"<diffss-{int(class_id)}-{safe}>"


def _latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    encoded = vae.encode(pixels)
    if hasattr(encoded, "latent_dist"):
        latents = encoded.latent_dist.mean
    else:
        latents = encoded.latents
    return latents * float(getattr(vae.config, "scaling_factor", 1.0))


def learn_token(pipe, images: Sequence[Image.Image], masks: Sequence[np.ndarray], token: str,
                init_text: str, prompt_template: str = "a real shot photo of {class_name}", steps: int = 100,
                learning_rate: float = 5e-3, background_weight: float = 0.1, seed: int = 0,
                resolution: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Learn the embedding of ``token`` from ``images`` with ``masks`` (1 = object); returns it
    (``[1, width]``, float32) and the masked loss on a fixed set of noise draws before and after
    (``{"loss_before", "loss_after"}``). ``pipe``: a loaded Stable Diffusion (ControlNet) pipeline; its
    modules are not changed (the text encoder is trained on a copy of its embedding table).
    ``init_text`` (e.g. the class name) gives the starting embedding (mean of its pieces)."""
    if not images or len(images) != len(masks):
        raise ValueError(f"need one mask per image and at least one image, got {len(images)} and {len(masks)}")
    from diffusers import DDPMScheduler

    device = pipe.unet.device
    resolution = int(resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    tokenizer = copy.deepcopy(pipe.tokenizer)
    text_encoder = copy.deepcopy(pipe.text_encoder).float().requires_grad_(False)
    if token in tokenizer.get_vocab():
        raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary")
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    init_ids = tokenizer(init_text, add_special_tokens=False).input_ids or [tokenizer.unk_token_id]
    with torch.no_grad():
        table.weight[token_id] = table.weight[init_ids].mean(0)
    base = table.weight.detach().clone()
    others = torch.ones(len(tokenizer), dtype=torch.bool)
    others[token_id] = False
    table.weight.requires_grad_(True)

    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((resolution, resolution),
                                                                            Image.BICUBIC), np.float32))
                          for im in images]).permute(0, 3, 1, 2).to(device) / 127.5 - 1.0
    unet, vae = pipe.unet, pipe.vae
    dtype = unet.dtype
    with torch.no_grad():
        latents = _latents(vae, pixels.to(vae.dtype)).float()
    weight = torch.stack([torch.from_numpy((np.asarray(m) == 1).astype(np.float32)) for m in masks])[:, None]
    weight = F.interpolate(weight, size=latents.shape[-2:], mode="area").to(device)
    weight = background_weight + (1.0 - background_weight) * weight
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = tokenizer([prompt_template.format(class_name=token)] * len(images), padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
    # The whole table is the parameter (as in diffusers' own textual-inversion example); every row
    # but the new token's is put back after each step, so only the token learns.
    optimizer = torch.optim.Adam([table.weight], lr=learning_rate)

    def draw(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(latents.shape, generator=g).to(device)
        return noise, torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=g).to(device)

    def masked_loss(noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy.to(dtype), t, encoder_hidden_states=hidden.to(dtype)).sample.float()
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        return (weight * (pred - target) ** 2).mean()

    probe = torch.Generator("cpu").manual_seed(int(seed) + 1)
    fixed = [draw(probe) for _ in range(8)]

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(np.mean([masked_loss(*d).item() for d in fixed]))

    before = fixed_loss()
    g = torch.Generator("cpu").manual_seed(int(seed))
    for _ in range(int(steps)):
        loss = masked_loss(*draw(g))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            table.weight[others] = base[others]
    return table.weight[token_id].detach().float().cpu()[None], {"loss_before": before, "loss_after": fixed_loss()}


def save_token(path: str | os.PathLike, token: str, embedding: torch.Tensor) -> Path:
    """Write ``{token: embedding}`` (diffusers' textual-inversion format) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({token: embedding.contiguous()}, str(tmp))
    return path


def load_token(pipe, path: str | os.PathLike) -> str:
    """Add the token in ``path`` to ``pipe`` through diffusers' ``load_textual_inversion`` (once);
    returns the token."""
    from safetensors.torch import load_file

    token = next(iter(load_file(str(path))))
    if token not in pipe.tokenizer.get_vocab():
        pipe.load_textual_inversion(str(path))
    return token


def support_token(pipe, sample, folder: str | os.PathLike, config) -> str:
    """The token of one support, learned from that support alone (``config.token_steps`` steps)
    and saved under ``folder`` (reused when present), loaded into ``pipe``; returns the token."""
    token = token_name(sample.class_id, sample.name)
    path = Path(folder) / f"{token.strip('<>')}.safetensors"
    if not path.is_file():
        from diffss.conditions.build import load_square

        image, mask, _ = load_square(sample, config.resolution)
        embedding, _ = learn_token(pipe, [image], [mask], token, str(sample.class_name).replace("_", " "),
                                   prompt_template=config.prompt_template, steps=config.token_steps,
                                   seed=config.seed, resolution=config.resolution)
        save_token(path, token, embedding)
    return load_token(pipe, path)
