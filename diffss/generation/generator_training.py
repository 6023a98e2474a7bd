"""Train the parts of a Stable-Diffusion-shaped generator on a folder of images + masks + class names.

Four stages, each a resumable run into its own output folder, each folder loadable with
``from_pretrained`` (the real-world case needs only the first, ``controlnet``):

- ``controlnet``: a ControlNet on a frozen base model (SD 1.5 from the hub, or a folder), for a
  domain the base model cannot draw under control: medical, industrial, the demo world. The
  control images are the seg / hed / scribble conditions :mod:`diffss.conditions` draws; with
  several conditions one ControlNet learns them all (each example draws one at random).
- ``autoencoder``: a small ``AutoencoderTiny`` trained to reconstruct the images (worlds with no
  base model at all).
- ``text-to-image``: a small UNet with cross-attention *and* the CLIP text encoder, trained
  together on the class prompts over a frozen autoencoder; saved in Stable Diffusion's layout.
- ``decoder``: a new, larger decoder for an ``AutoencoderTiny`` whose encoder stays frozen. The
  latent space does not move, so a UNet and ControlNet trained on it keep working, and only
  the pixels they decode to get sharper (the demo's 64-px autoencoder lost about half of the
  class's palette inside the mask, and most of what an ideal auxiliary support adds).

The recipe is diffusers' (examples/controlnet/train_controlnet.py, train_text_to_image.py): latents
from the frozen VAE times its scaling factor, ``DDPMScheduler.add_noise`` at uniform timesteps,
epsilon or v targets (``get_velocity``), min-SNR loss weighting, prompts replaced by the empty
prompt with some probability (classifier-free guidance), AdamW, gradient clipping, mixed precision
(autocast; a gradient scaler for fp16) and gradient accumulation.

Exact resume: the random draws of step ``s`` (examples, noise, timesteps, dropped prompts, drawn
conditions) come from a generator seeded by (seed, s), and checkpoints (:mod:`diffss.core`)
hold the exported model, the trainable weights, optimizer and scaler state in one atomically
committed step folder, so a run stopped at any point and restarted ends with the weights of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import torch
import torch.nn.functional as F

from diffss.conditions.build import RANDOM_HED  # noqa: F401 - re-exported for configs
from diffss.generation.config import GenerationConfig
from diffss.generation.small_sd import SmallSDSizes
from diffss.core.config import JsonConfig
from diffss.core.loop import TrainingRun, run_steps

log = logging.getLogger(__name__)

STAGES = ("autoencoder", "text-to-image", "controlnet", "decoder")
LEGACY_STATE_NAME = "training_state.pt"  # the layout before diffss.core: one state file beside the model
CONFIG_NAME = "train_config.json"
MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class GeneratorTrainConfig(JsonConfig):
    """One training stage. ``dataset``/``root``/``fold``/``split`` pick the images as
    :func:`diffss.data.load_dataset` does; ``split="all"`` takes every class of the fold (train +
    test: a pretraining pool, never the benchmark itself). ``base_model``: controlnet - an SD
    folder or hub id; text-to-image - the autoencoder stage's folder (or an SD folder, whose VAE
    is used); decoder - the autoencoder to give a new decoder (``sizes.vae_width`` /
    ``vae_blocks`` size it). Prompts are ``GenerationConfig(prompt_template, quality_suffix).prompt(class)``,
    the very prompts generation will use."""

    stage: str = "controlnet"
    output_dir: str = "data/models/controlnet"
    dataset: str = "folder"
    root: str | None = None
    fold: int = 0
    split: str = "train"
    conditions: tuple[str, ...] = ("seg",)
    base_model: str | None = None
    hed_model: str | None = None  # hub id or folder of HED weights (None: lllyasviel/Annotators), "random" or "sobel"
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    empty_prompt_probability: float = 0.1
    snr_gamma: float | None = 5.0
    prompt_template: str = GenerationConfig.prompt_template
    quality_suffix: str = GenerationConfig.quality_suffix
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    local_files_only: bool = False
    sizes: dict[str, Any] = field(default_factory=dict)  # SmallSDSizes fields for new models
    # controlnet stage: fine-tune the base UNet together with the ControlNet (written to
    # <output_dir>/unet). Only for a base model of your own (the demo's small SD, whose
    # text-to-image stage is short): learning where the mask is is then the UNet's job too.
    # A ControlNet for Stable Diffusion keeps the base frozen (False), as diffusers' recipe does.
    train_base_unet: bool = False
    # controlnet stage with train_base_unet: the text encoder learns too (written to
    # <output_dir>/text_encoder). A short text-to-image stage leaves the class prompts nearly alike
    # (the demo's 20 prompts: cosine 0.995), so the UNet cannot tell the classes apart; frozen, the
    # text encoder cannot learn it in the ControlNet stage either.
    train_text_encoder: bool = False
    # controlnet stage: start from this ControlNet (a folder or hub id) instead of a new one made
    # from the base UNet: to train an existing generator on, as a new run with its own optimizer.
    controlnet_init: str | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"GeneratorTrainConfig.stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "resolution"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GeneratorTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"GeneratorTrainConfig.mixed_precision must be one of {list(MIXED_PRECISION)}, "
                             f"got {self.mixed_precision!r}")
        if not 0 <= self.empty_prompt_probability <= 1:
            raise ValueError(f"GeneratorTrainConfig.empty_prompt_probability must be in [0, 1], "
                             f"got {self.empty_prompt_probability}")
        if self.learning_rate <= 0:
            raise ValueError(f"GeneratorTrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.train_base_unet and self.stage != "controlnet":
            raise ValueError(f"GeneratorTrainConfig.train_base_unet applies to the controlnet stage, not {self.stage!r}")
        if self.train_text_encoder and not (self.stage == "controlnet" and self.train_base_unet):
            raise ValueError("GeneratorTrainConfig.train_text_encoder needs the controlnet stage with train_base_unet")
        if self.controlnet_init and self.stage != "controlnet":
            raise ValueError(f"GeneratorTrainConfig.controlnet_init applies to the controlnet stage, not {self.stage!r}")
        if self.stage != "autoencoder" and not self.base_model:
            raise ValueError(f"GeneratorTrainConfig.base_model is required for stage {self.stage!r}")
        from diffss.conditions import parse_kinds

        self.conditions = tuple(parse_kinds(list(self.conditions)))
        self.sizes = SmallSDSizes(**self.sizes).to_dict()  # validates, fills defaults
        if self.stage not in ("controlnet", "decoder") and self.sizes["resolution"] != self.resolution:
            raise ValueError(f"sizes.resolution {self.sizes['resolution']} differs from resolution {self.resolution}")

    RUNTIME_FIELDS = ("output_dir", "device", "checkpoint_every", "local_files_only")

    @classmethod
    def _coerce(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "conditions" in data:
            data["conditions"] = tuple(data["conditions"])
        return data

    def prompt(self, class_name: str) -> str:
        return GenerationConfig(prompt_template=self.prompt_template, quality_suffix=self.quality_suffix).prompt(class_name)


# ---- data --------------------------------------------------------------------------------------

def training_samples(config: GeneratorTrainConfig) -> list:
    """The (image, mask, class) samples a stage trains on."""
    from diffss.conditions import unique_samples
    from diffss.data import load_dataset

    splits = ("train", "test") if config.split == "all" else (config.split,)
    samples = []
    for split in splits:
        samples += load_dataset(config.dataset, root=config.root, fold=config.fold, split=split,
                                episodes=1).samples
    return unique_samples(samples)


@dataclass
class TrainingImages:
    """Everything a stage reads, in memory: images in [-1, 1], control images in [0, 1] (one per
    condition kind), and the prompts."""

    images: torch.Tensor  # [N,3,R,R] uint8
    prompts: list[str]
    controls: torch.Tensor | None = None  # [N,K,3,R,R] uint8

    def __len__(self) -> int:
        return len(self.prompts)


def load_training_images(config: GeneratorTrainConfig, samples: list, progress: bool = True) -> TrainingImages:
    from PIL import Image

    from diffss.conditions import build_conditions, condition_path, load_square

    if not samples:
        raise ValueError(f"no training images in {config.dataset} {config.root} (fold {config.fold}, split {config.split})")
    r = config.resolution
    images = torch.from_numpy(np.stack([np.asarray(load_square(s, r)[0]) for s in samples])).permute(0, 3, 1, 2)
    controls = None
    if config.stage == "controlnet":
        cond_dir = Path(config.output_dir) / "conditions"
        build_conditions(samples, list(config.conditions), cond_dir, resolution=r, hed=config.hed_model,
                         progress=progress, dataset_name=config.dataset)
        per_kind = []
        for kind in config.conditions:
            arrays = []
            for s in samples:
                with Image.open(condition_path(cond_dir, kind, s.class_id, s.name)) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
            per_kind.append(np.stack(arrays))
        controls = torch.from_numpy(np.stack(per_kind, axis=1)).permute(0, 1, 4, 2, 3).contiguous()
    return TrainingImages(images=images.contiguous(), prompts=[config.prompt(s.class_name) for s in samples],
                          controls=controls)


# ---- the stages ----------------------------------------------------------------------------------

BASE_UNET_DIR = "unet"  # in a controlnet stage's folder: the fine-tuned base UNet (train_base_unet)
TEXT_ENCODER_DIR = "text_encoder"  # ... and the fine-tuned text encoder (train_text_encoder)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


class _Stage:
    """Models, trainable modules, the loss of one micro-batch, and the export of one stage."""

    trainable: dict[str, torch.nn.Module]

    def loss(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def export(self, out: Path) -> None:
        raise NotImplementedError


def _pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


def _reconstruction_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), x) + 0.5 * F.l1_loss(out.float(), x)


class _AutoencoderStage(_Stage):
    def __init__(self, config: GeneratorTrainConfig, data: TrainingImages, device: torch.device):
        from diffss.generation.small_sd import new_autoencoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.vae = new_autoencoder(SmallSDSizes(**config.sizes)).to(device)
        self.trainable = {"vae": self.vae}
        self.data, self.device = data, device

    def loss(self, batch, g):
        x = _pixels(self.data.images[batch["index"]]).to(self.device)
        return _reconstruction_loss(self.vae.decode(self.vae.encode(x).latents).sample, x)

    @torch.no_grad()
    def export(self, out):
        # The diffusion model wants unit-variance latents: record 1 / std as the scaling factor.
        sample = _pixels(self.data.images[: min(256, len(self.data))]).to(self.device)
        std = float(self.vae.encode(sample).latents.float().std())
        self.vae.register_to_config(scaling_factor=1.0 / max(std, 1e-3))
        self.vae.save_pretrained(out)


class _DecoderStage(_Stage):
    """A new decoder (``sizes.vae_width`` wide, ``sizes.vae_blocks`` blocks per level, the base's
    number of levels) trained on the frozen encoder's latents, which are computed once."""

    def __init__(self, config: GeneratorTrainConfig, data: TrainingImages, device: torch.device):
        from diffusers import AutoencoderTiny

        base = _load_vae(config.base_model, config.local_files_only)
        if not isinstance(base, AutoencoderTiny):
            raise ValueError(f"the decoder stage refines an AutoencoderTiny; {config.base_model} holds "
                             f"{type(base).__name__}")
        sizes = SmallSDSizes(**config.sizes)
        levels = len(base.config.decoder_block_out_channels)
        settings = {k: v for k, v in base.config.items() if not k.startswith("_") and k != "block_out_channels"}
        settings.update(decoder_block_out_channels=(sizes.vae_width,) * levels,
                        num_decoder_blocks=(sizes.vae_blocks,) * (levels - 1) + (1,))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.vae = AutoencoderTiny(**settings).to(device)
        self.vae.encoder.load_state_dict(base.encoder.state_dict())
        self.vae.encoder.eval().requires_grad_(False)
        self.latents = _encode_images(self.vae, data.images, device, scaled=False)  # what the decoder reads
        self.trainable = {"decoder": self.vae.decoder}
        self.data, self.device = data, device

    def loss(self, batch, g):
        x = _pixels(self.data.images[batch["index"]]).to(self.device)
        return _reconstruction_loss(self.vae.decode(self.latents[batch["index"]].to(self.device)).sample, x)

    def export(self, out):
        self.vae.save_pretrained(out)  # the base's scaling factor came with its config


def _load_vae(base: str, local_files_only: bool):
    """The autoencoder of ``base``: an autoencoder stage's folder or an SD folder / hub id."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    path = Path(base)
    folder, sub = (path, None) if (path / "config.json").is_file() else (base, "vae")
    config_file = (path / "config.json") if sub is None else (path / "vae" / "config.json")
    cls = AutoencoderKL
    if config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "AutoencoderTiny":
        cls = AutoencoderTiny
    return cls.from_pretrained(folder, subfolder=sub, local_files_only=local_files_only)


def _encode(vae, x: torch.Tensor, generator: torch.Generator | None, scaled: bool = True) -> torch.Tensor:
    out = vae.encode(x)
    # A KL autoencoder's latents are a sample: drawn from the run's own generator, not the global
    # one (whose state at this point differs between processes), so two runs of one config, or a
    # run and its resumption in a new process, train on the same latents.
    latents = out.latents if hasattr(out, "latents") else out.latent_dist.sample(generator=generator)
    return latents * vae.config.scaling_factor if scaled else latents


@torch.no_grad()
def _encode_images(vae, images: torch.Tensor, device: torch.device, generator: torch.Generator | None = None,
                   scaled: bool = True) -> torch.Tensor:
    """Latents of every image (uint8 [N,3,R,R]), 64 at a time, kept on the CPU in float32."""
    return torch.cat([_encode(vae, _pixels(images[i:i + 64]).to(device), generator, scaled).float().cpu()
                      for i in range(0, len(images), 64)])


class _DiffusionStage(_Stage):
    """Shared by text-to-image and controlnet: frozen VAE latents (computed once), prompts."""

    def __init__(self, config: GeneratorTrainConfig, data: TrainingImages, device: torch.device, vae, tokenizer,
                 scheduler):
        self.config, self.data, self.device = config, data, device
        self.vae, self.tokenizer, self.scheduler = vae.to(device).eval().requires_grad_(False), tokenizer, scheduler
        self.latents = _encode_images(self.vae, data.images, device, torch.Generator(device).manual_seed(config.seed))
        self.ids = self._tokenize(data.prompts)
        self.empty_ids = self._tokenize([""])

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids

    def _prompt_ids(self, batch) -> torch.Tensor:
        """Token ids of the batch's prompts, the dropped ones replaced by the empty prompt."""
        return torch.where(batch["drop"][:, None], self.empty_ids, self.ids[batch["index"]]).to(self.device)

    def _noisy(self, batch, g):
        latents = self.latents[batch["index"]].to(self.device)
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=g).to(self.device)
        return latents, noise, t, self.scheduler.add_noise(latents, noise, t)

    def _target_loss(self, pred, latents, noise, t):
        kind = self.scheduler.config.prediction_type
        target = noise if kind == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        if self.config.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t)
        weight = torch.clamp(snr, max=self.config.snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_item * weight).mean()


class _TextToImageStage(_DiffusionStage):
    def __init__(self, config, data, device):
        from diffss.generation.small_sd import new_scheduler, new_text_encoder, new_tokenizer, new_unet

        sizes = SmallSDSizes(**config.sizes)
        vae = _load_vae(config.base_model, config.local_files_only)
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is saved with the model at export
            tokenizer = new_tokenizer(tmp, " ".join(sorted(set(data.prompts))))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.unet = new_unet(sizes).to(device)
            self.text_encoder = new_text_encoder(sizes, tokenizer).to(device)
        super().__init__(config, data, device, vae, tokenizer, new_scheduler())
        self.trainable = {"unet": self.unet, "text_encoder": self.text_encoder}

    def loss(self, batch, g):
        latents, noise, t, noisy = self._noisy(batch, g)
        hidden = self.text_encoder(self._prompt_ids(batch))[0]
        return self._target_loss(self.unet(noisy, t, hidden).sample, latents, noise, t)

    def export(self, out):
        from diffss.generation.small_sd import save_sd_folder

        save_sd_folder(out, self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler)


class _ControlNetStage(_DiffusionStage):
    def __init__(self, config, data, device):
        from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffss.generation.small_sd import new_controlnet

        load = dict(local_files_only=config.local_files_only)
        base = config.base_model
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **load)
        # float32 whatever the folder holds (the shipped demo generator is float16).
        self.text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **load).float().to(device)
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **load).float().to(device)
        for frozen in (self.text_encoder, self.unet):
            frozen.eval().requires_grad_(False)
        self.unet.requires_grad_(config.train_base_unet)
        self.text_encoder.requires_grad_(config.train_text_encoder)
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **load)
        vae = _load_vae(base, config.local_files_only).float()
        if config.controlnet_init:  # its condition embedding comes with it
            self.controlnet = ControlNetModel.from_pretrained(config.controlnet_init, **load).float().to(device)
        else:
            downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
            embedding = tuple(SmallSDSizes(**config.sizes).condition_channels)
            if len(embedding) - 1 != int(math.log2(downsampling)):  # SD 1.5: 8x, ControlNet's (16, 32, 96, 256)
                embedding = (16, 32, 96, 256)[-(int(math.log2(downsampling)) + 1):]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.controlnet = new_controlnet(self.unet, embedding).to(device)
        super().__init__(config, data, device, vae, tokenizer, scheduler)
        if not config.train_text_encoder:
            with torch.no_grad():  # prompts are fixed per example: encode them once
                self.hidden = torch.cat([self.text_encoder(self.ids[i:i + 64].to(device))[0].cpu()
                                         for i in range(0, len(self.ids), 64)])
                self.empty_hidden = self.text_encoder(self.empty_ids.to(device))[0].cpu()
        self.trainable = {"controlnet": self.controlnet, **({"unet": self.unet} if config.train_base_unet else {}),
                          **({"text_encoder": self.text_encoder} if config.train_text_encoder else {})}

    def _hidden(self, batch) -> torch.Tensor:
        if self.config.train_text_encoder:
            return self.text_encoder(self._prompt_ids(batch))[0]
        hidden = torch.where(batch["drop"][:, None, None], self.empty_hidden, self.hidden[batch["index"]])
        return hidden.to(self.device)

    def loss(self, batch, g):
        latents, noise, t, noisy = self._noisy(batch, g)
        hidden = self._hidden(batch)
        control = self.data.controls[batch["index"], batch["kind"]].float().div(255.0).to(self.device)
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=control,
                                    return_dict=False)
        pred = self.unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        return self._target_loss(pred, latents, noise, t)

    def export(self, out):
        self.controlnet.save_pretrained(out)
        if "unet" in self.trainable:
            self.unet.save_pretrained(out / BASE_UNET_DIR)
        if "text_encoder" in self.trainable:
            self.text_encoder.save_pretrained(out / TEXT_ENCODER_DIR)


_STAGE_CLASSES = {"autoencoder": _AutoencoderStage, "text-to-image": _TextToImageStage, "controlnet": _ControlNetStage,
                  "decoder": _DecoderStage}


def _draw_batch(config: GeneratorTrainConfig, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Examples, dropped prompts and drawn condition kinds of one micro-batch."""
    b = config.batch_size
    return {"index": torch.randint(n, (b,), generator=g),
            "drop": torch.rand(b, generator=g) < config.empty_prompt_probability,
            "kind": torch.randint(len(config.conditions), (b,), generator=g)}


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def train_generator(config: GeneratorTrainConfig, progress: bool = True,
                    callback: Callable[[int, float], None] | None = None) -> Path:
    """Run (or resume) one stage into ``config.output_dir``; returns that folder.

    The folder is a training run of :mod:`diffss.core`: ``checkpoints/step-*`` (the exported
    model and the trainer state, committed together), the newest checkpoint's ``from_pretrained``
    folder (an ``AutoencoderTiny``, a Stable Diffusion layout or a ``ControlNetModel``) published
    at the top, ``train_config.json``, ``history.csv`` and, for ControlNets, the ``conditions/``
    drawn for training. Rerunning with the same settings resumes (a larger ``steps`` continues a
    finished run); other settings in the same folder are refused. A folder of the old layout (one
    ``training_state.pt``) resumes from that state and is converted by its next checkpoint.
    ``callback(step, loss)`` runs after every optimizer step.
    """
    run = TrainingRun(config, config.output_dir, CONFIG_NAME, legacy_state=LEGACY_STATE_NAME)
    run.check_same_run()

    from diffusers.optimization import get_scheduler

    device = _device(config.device)
    data = load_training_images(config, training_samples(config), progress)
    run.prepare()
    stage = _STAGE_CLASSES[config.stage](config, data, device)
    params = [p for module in stage.trainable.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=min(100, config.steps // 10))
    amp = MIXED_PRECISION[config.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)

    step, history = 0, []
    latest, state = run.latest()
    if latest is None and run.has_legacy_state():
        state = run.load_legacy_state()  # old layout: weights, optimizer and step in one file
    if state is not None:
        for name, module in stage.trainable.items():
            module.load_state_dict(state["models"][name])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
        step, history = int(state["step"]), list(state["history"])
    if latest is not None:
        run.publish(latest, history)
    if step >= config.steps:
        return run.out

    def train_step(step: int) -> tuple[float, float]:
        g = _step_generator(config.seed, step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(config.gradient_accumulation_steps):
            batch = _draw_batch(config, len(data), g)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = stage.loss(batch, g) / config.gradient_accumulation_steps
            scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        return loss_sum, lr_schedule.get_last_lr()[0]

    def save(step: int) -> None:
        def export(folder: Path) -> None:
            for module in stage.trainable.values():
                module.eval()
            stage.export(folder)
            for module in stage.trainable.values():
                module.train()

        run.save(step, export, {"models": {name: module.state_dict() for name, module in stage.trainable.items()},
                                "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                                "scaler": scaler.state_dict()}, history)

    for module in stage.trainable.values():
        module.train()
    run_steps(start_step=step, steps=config.steps, history=history, train_step=train_step, save=save,
              checkpoint_every=config.checkpoint_every, callback=callback, progress=progress,
              desc=f"train {config.stage}", unit="step")
    return run.out
