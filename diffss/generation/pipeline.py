"""SD 1.5 + ControlNet (one or several) behind one batched ``generate`` call."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffss.conditions import parse_kinds
from diffss.generation.config import GenerationConfig

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class AuxiliaryGenerator:
    """Loads the pipeline for ``condition`` ("seg", "hed", "scribble" or e.g. "seg+hed", which
    uses diffusers' MultiControlNet) and generates batches of images.

    fp16 on CUDA, float32 on CPU (unless ``config.dtype`` says otherwise); attention through
    PyTorch SDPA; optional ``torch.compile`` and channels_last for UNet and ControlNet(s).
    """

    def __init__(self, config: GenerationConfig, condition: str | Sequence[str], pipeline=None):
        """``pipeline``: an already built ``StableDiffusionControlNetPipeline`` whose ControlNet(s)
        match ``condition`` (benchmarks build random real-size models in memory); None loads
        ``config``'s models with ``from_pretrained``. Either way the same setup follows."""
        import diffusers

        self.config = config
        self.kinds = parse_kinds(condition)
        missing = [k for k in self.kinds if k not in config.controlnets]
        if missing:
            raise ValueError(f"GenerationConfig.controlnets has no model for condition(s) {missing}")
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[config.dtype] if config.dtype else (
            torch.float16 if self.device.type == "cuda" else torch.float32)
        scheduler_cls = getattr(diffusers, config.scheduler, None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
            raise ValueError(f"GenerationConfig.scheduler {config.scheduler!r} is not a diffusers scheduler")
        pipe = pipeline if pipeline is not None else self._load(config)
        nets = list(getattr(pipe.controlnet, "nets", [pipe.controlnet]))
        if len(nets) != len(self.kinds):
            raise ValueError(f"pipeline has {len(nets)} ControlNet(s) for condition {'+'.join(self.kinds)}")
        self.pipe = self._setup(pipe, nets, scheduler_cls)
        self.images_generated = 0

    def _load(self, config: GenerationConfig):
        from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline

        # low_cpu_mem_usage needs accelerate; without it diffusers would warn on every load.
        load = dict(dtype=self.dtype, local_files_only=config.local_files_only,
                    low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
        nets = [ControlNetModel.from_pretrained(config.controlnets[k], **load) for k in self.kinds]
        controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
        with quiet_if_tiny_autoencoder(config.base_model):
            return StableDiffusionControlNetPipeline.from_pretrained(
                config.base_model, controlnet=controlnet, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, **load)

    def _setup(self, pipe, nets, scheduler_cls):
        from diffusers.models.attention_processor import AttnProcessor2_0

        config = self.config
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        for net in nets:
            net.set_attn_processor(AttnProcessor2_0())
        if pipe.unet.dtype != self.dtype:  # a pipeline built elsewhere (loaded ones come in self.dtype)
            pipe.to(dtype=self.dtype)
        pipe.to(self.device)
        if config.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            for net in nets:
                net.to(memory_format=torch.channels_last)
        if config.compile:
            pipe.unet = torch.compile(pipe.unet)
            pipe.controlnet = torch.compile(pipe.controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def model_ids(self) -> str:
        return self.config.model_ids(self.kinds)

    def img2img_pipeline(self):
        """diffusers' ControlNet img2img pipeline over the very same modules (UNet, VAE, text
        encoder, ControlNet(s), scheduler): no second copy of the weights. Built on first use."""
        if getattr(self, "_img2img", None) is None:
            from diffusers import StableDiffusionControlNetImg2ImgPipeline

            self._img2img = StableDiffusionControlNetImg2ImgPipeline(**{**self.pipe.components, "safety_checker": None},
                                                                     requires_safety_checker=False)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def generate(self, controls: Sequence[Image.Image | Sequence[Image.Image]], class_names: Sequence[str],
                 seeds: Sequence[int], pad_to: int | None = None, init_images: Sequence[Image.Image] | None = None,
                 strength: float = 1.0, object_masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """One pipeline call for ``len(seeds)`` images; returns ``[N,R,R,3]`` float32 in [0,1].

        ``controls[i]``: the condition image of item i (one per kind, in ``self.kinds`` order,
        for several kinds). Item i starts from noise drawn by its own CPU generator seeded with
        ``seeds[i]``. ``pad_to``: run a call of exactly that many items, repeating the last one
        (its extra outputs are dropped). Kernels are chosen by tensor shape, so within calls of
        one shape an item's result does not depend on its position or neighbours (bit for bit
        on CPU, measured); across shapes it differs by float rounding.

        ``strength`` < 1 (support guidance): item i starts from ``init_images[i]`` (its real
        support, ``R``x``R``) noised to that level, through diffusers' ControlNet img2img pipeline
        (the schedule's last ``strength`` share of ``num_inference_steps`` runs); 1 is plain
        text-to-image from pure noise (the paper's), whatever ``init_images`` says.

        ``object_masks[i]`` (``R``x``R``, 1 = object; with ``config.object_strength``): item i's
        object is held to its init image while the schedule is above ``object_strength``
        (:func:`object_hold`).
        """
        n = len(seeds)
        if not (len(controls) == len(class_names) == n) or n == 0:
            raise ValueError(f"controls ({len(controls)}), class_names ({len(class_names)}) and seeds ({n}) "
                             "must have the same, non-zero length")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        guided = float(strength) < 1.0
        if guided and (init_images is None or len(init_images) != n):
            raise ValueError(f"strength {strength} < 1 needs one init image per item ({n}), "
                             f"got {None if init_images is None else len(init_images)}")
        if pad_to is not None and pad_to > n:
            extra = pad_to - n
            controls, class_names, seeds = ([*x, *[x[-1]] * extra] for x in (controls, class_names, seeds))
            if guided:
                init_images = [*init_images, *[init_images[-1]] * extra]
            if object_masks is not None:
                object_masks = [*object_masks, *[object_masks[-1]] * extra]
        elif pad_to is not None and pad_to < n:
            raise ValueError(f"pad_to ({pad_to}) is smaller than the {n} items given")
        cfg = self.config
        total = len(seeds)
        if len(self.kinds) == 1:
            image = [c if isinstance(c, Image.Image) else c[0] for c in controls]
            scale: float | list[float] = float(cfg.controlnet_conditioning_scale)
        else:
            image = [list(c) for c in controls]
            if any(len(c) != len(self.kinds) for c in image):
                raise ValueError(f"each item needs {len(self.kinds)} control images ({'+'.join(self.kinds)})")
            scale = [float(cfg.controlnet_conditioning_scale)] * len(self.kinds)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        common = dict(prompt=[cfg.prompt(c) for c in class_names], negative_prompt=[cfg.negative_prompt] * total,
                      height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, generator=generators,
                      controlnet_conditioning_scale=scale, output_type="np")
        held = {}
        if cfg.object_strength is not None:
            if not guided or object_masks is None or len(object_masks) != total:
                raise ValueError(f"object_strength {cfg.object_strength} needs support guidance (strength < 1, "
                                 f"got {strength}) and one object mask per item")
            held = object_hold(self.img2img_pipeline(), init_images, object_masks, seeds, cfg, strength)
        with torch.inference_mode():
            if guided:
                out = self.img2img_pipeline()(image=list(init_images), control_image=image, strength=float(strength),
                                              **held, **common)
            else:
                out = self.pipe(image=image, **common)
        self.images_generated += n
        return np.asarray(out.images[:n], dtype=np.float32)


def object_hold(pipe, init_images: Sequence[Image.Image], masks: Sequence[np.ndarray], seeds: Sequence[int],
                config: GenerationConfig, strength: float) -> dict:
    """The img2img call's step callback that holds each item's object (blended latent diffusion).

    After every step whose result lies at or above the ``object_strength`` level of the schedule,
    the latents under the object (its mask, area-downsampled to the latent grid, so edges blend) are
    replaced by the init image's latents noised to that level; from there the object denoises
    freely with the scene around it, as if its own schedule had started at ``object_strength``.
    The noise of item i is drawn from its seed (not from the batch), so an item's image does not
    depend on its neighbours. The latents are the autoencoder's deterministic encoding (a
    ``latent_dist``'s mode)."""
    import torch.nn.functional as F

    if getattr(pipe.scheduler, "order", 1) != 1:
        raise ValueError(f"object_strength needs a first-order scheduler, not {type(pipe.scheduler).__name__}")
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(list(init_images), height=config.resolution, width=config.resolution)
    with torch.inference_mode():
        encoded = vae.encode(pixels.to(vae.device, vae.dtype))
    clean = getattr(encoded, "latents", None)
    if clean is None:
        clean = encoded.latent_dist.mode()
    clean = clean * vae.config.scaling_factor
    grid = torch.from_numpy(np.stack([np.asarray(m) == 1 for m in masks]).astype(np.float32))[:, None]
    weight = F.interpolate(grid, size=clean.shape[-2:], mode="area").to(clean)
    noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator("cpu").manual_seed(
        (int(s) ^ OBJECT_NOISE_SALT) & (2**63 - 1))) for s in seeds]).to(clean)
    # img2img runs schedule steps [first, N); the object's own schedule would start at last_held.
    steps = config.num_inference_steps
    first = steps - min(int(steps * float(strength)), steps)
    last_held = steps - int(steps * float(config.object_strength))

    def hold(pipeline, step, timestep, tensors):
        scheduler = pipeline.scheduler
        index = first + step + 1  # the schedule index the latents now sit at (first-order schedules)
        if index > last_held or index >= len(scheduler.timesteps):
            return tensors
        noised = scheduler.add_noise(clean, noise, scheduler.timesteps[index].repeat(len(clean)))
        tensors["latents"] = weight * noised + (1 - weight) * tensors["latents"]
        return tensors

    return {"callback_on_step_end": hold, "callback_on_step_end_tensor_inputs": ["latents"]}


#: Separates the noise of a held object from the item's own (both drawn from the item's seed).
OBJECT_NOISE_SALT = 0x5EED


def to_pil(image: np.ndarray) -> Image.Image:
    """``HxWx3`` float [0,1] -> RGB PIL image (rounded, not truncated)."""
    return Image.fromarray(np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8))


@contextlib.contextmanager
def quiet_if_tiny_autoencoder(base_model: str):
    """Loading an SD folder whose VAE is an ``AutoencoderTiny`` (the demo's small SD) makes diffusers
    warn twice on every load, about the ``block_out_channels`` key AutoencoderTiny itself writes and
    about a VAE that is not an AutoencoderKL: both harmless. Other loads keep every warning."""
    from diffusers.utils import logging as diffusers_logging

    index = Path(base_model) / "model_index.json"
    tiny = index.is_file() and "AutoencoderTiny" in index.read_text()
    level = diffusers_logging.get_verbosity()
    if tiny:
        diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
