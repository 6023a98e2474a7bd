"""A small Stable-Diffusion-shaped model set, built untrained for worlds without a base model.

The parts are diffusers' and transformers' own classes at small sizes: ``AutoencoderTiny``
(TAESD's architecture, which learns a usable latent space in minutes where a small
``AutoencoderKL`` stays blurred), a ``UNet2DConditionModel`` with cross-attention on the
prompt, a ``CLIPTextModel`` with a BPE tokenizer learnt from the class names, a
``ControlNetModel`` made from the UNet, and a v-prediction ``DDPMScheduler``. Saved with
``save_pretrained`` they form the folder layout of Stable Diffusion and of a ControlNet, so the
generation pipeline loads them like the real weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from diffss.generation.tiny import TOKENIZER_MAX_LENGTH, write_tiny_tokenizer


@dataclass
class SmallSDSizes:
    """Architecture of a small SD set. The autoencoder (TAESD's: one width throughout) downsamples
    by ``2 ** (vae_levels - 1)``; the ControlNet's condition embedding must downsample alike, so
    ``condition_channels`` has ``vae_levels`` entries."""

    resolution: int = 64
    latent_channels: int = 4
    vae_width: int = 48
    vae_levels: int = 3
    vae_blocks: int = 2
    unet_channels: tuple[int, ...] = (48, 96, 96)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    condition_channels: tuple[int, ...] = (16, 32, 48)

    def __post_init__(self):
        for name in ("unet_channels", "condition_channels"):
            setattr(self, name, tuple(int(c) for c in getattr(self, name)))
        if len(self.condition_channels) != self.vae_levels:
            raise ValueError(f"condition_channels {self.condition_channels} must have vae_levels={self.vae_levels} "
                             "entries (the same downsampling as the autoencoder)")
        if self.resolution % self.downsampling:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {self.downsampling}")

    @property
    def downsampling(self) -> int:
        return 2 ** (self.vae_levels - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def new_autoencoder(sizes: SmallSDSizes):
    from diffusers import AutoencoderTiny

    n = sizes.vae_levels
    return AutoencoderTiny(encoder_block_out_channels=(sizes.vae_width,) * n,
                           decoder_block_out_channels=(sizes.vae_width,) * n,
                           num_encoder_blocks=(1,) + (sizes.vae_blocks,) * (n - 1),
                           num_decoder_blocks=(sizes.vae_blocks,) * (n - 1) + (1,),
                           latent_channels=sizes.latent_channels)


def new_tokenizer(out_dir: str | Path, words: str):
    """A CLIP tokenizer whose BPE merges are learnt from the default prompts plus ``words``."""
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(out_dir, extra_words=words)
    return CLIPTokenizer.from_pretrained(out_dir)


def new_text_encoder(sizes: SmallSDSizes, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_width, intermediate_size=4 * sizes.text_width,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=sizes.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def new_unet(sizes: SmallSDSizes):
    from diffusers import UNet2DConditionModel

    n = len(sizes.unet_channels)
    # Cross-attention everywhere but the coarsest level, where the latent is a few pixels.
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=sizes.resolution // sizes.downsampling, in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels, block_out_channels=sizes.unet_channels,
        down_block_types=down, up_block_types=up, layers_per_block=sizes.layers_per_block,
        cross_attention_dim=sizes.text_width, attention_head_dim=sizes.attention_head_dim,
        norm_num_groups=min(8, min(sizes.unet_channels)))


def new_controlnet(unet, condition_channels: tuple[int, ...]):
    """A ControlNet copied from ``unet``'s encoder (zero convolutions at the outputs)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(condition_channels))


def new_scheduler():
    """The training schedule saved with the model; generation swaps in its own sampler from it.

    v-prediction with a cosine schedule: at a 16 px latent the scaled-linear schedule of SD
    leaves the image's layout readable at the last step, which the model then never learns.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
                         steps_offset=1)


def save_sd_folder(out_dir: str | Path, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    """``out_dir/{model_index.json, vae, text_encoder, tokenizer, unet, scheduler}`` (SD layout)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
