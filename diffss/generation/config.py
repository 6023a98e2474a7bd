"""Generation settings (JSON round-trip) and the per-image seed rule."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import field
from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from diffss.core.config import JsonConfig

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNETS = {
    "seg": "lllyasviel/sd-controlnet-seg",
    "hed": "lllyasviel/control_v11p_sd15_softedge",
    "scribble": "lllyasviel/control_v11p_sd15_scribble",
}
# ControlNet's own default negative prompt for its SD 1.5 demos.
DEFAULT_NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, "
                           "fewer digits, cropped, worst quality, low quality")
# ControlNet4FSS (the paper's generator, FSSpregenerate.py): ControlNet 1.0 checkpoints
# (control_sd15_{seg,hed,scribble}.pth) as published in diffusers format, DDIM with
# ddim_steps = 2 and eta 0, scale 9, strength 1, prompt f"a real shot photo of {name}," + ", " +
# a_prompt, and ControlNet's negative prompt plus ", artwork".
PAPER_CONTROLNETS = {
    "seg": "lllyasviel/sd-controlnet-seg",
    "hed": "lllyasviel/sd-controlnet-hed",
    "scribble": "lllyasviel/sd-controlnet-scribble",
}
PAPER_NEGATIVE_PROMPT = DEFAULT_NEGATIVE_PROMPT + ", artwork"
PAPER_SETTINGS = dict(controlnets=PAPER_CONTROLNETS, prompt_template="a real shot photo of {class_name},",
                      quality_suffix=", best quality, extremely detailed", negative_prompt=PAPER_NEGATIVE_PROMPT,
                      scheduler="DDIMScheduler", num_inference_steps=2, guidance_scale=9.0, resolution=512,
                      controlnet_conditioning_scale=1.0)


PositiveInt = Annotated[int, Field(ge=1)]
#: Support guidance: the share of the noise schedule an image is painted over, starting from its
#: real support (1: from pure noise, the paper's text-to-image).
Strength = Annotated[float, Field(gt=0, le=1)]


@dataclass(config=ConfigDict(extra="forbid"))
class GenerationConfig(JsonConfig):
    """What to generate with and how: a :class:`~diffss.core.config.JsonConfig` (JSON round trip,
    ``from_json`` of a file or of JSON text, ``to_json(path)`` written atomically). Fields in
    :data:`OUTPUT_FIELDS` determine the images;
    the rest (device, dtype, compile, channels_last, batching, offline loading) only how fast
    they come (fp16 vs fp32 moves pixels by float noise, not content). A pydantic dataclass:
    each field's constraint is its validation (``ValueError`` naming the field).

    ``batch_size``: images per pipeline call, drawn across supports (None: ``supports_per_call``
    supports' ``num_aux`` images). Every call is padded to this size, so an image's pixels do
    not depend on which other images share its call (see docs/generation.md, "Batching and exactness").
    """

    base_model: str = DEFAULT_BASE_MODEL
    controlnets: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CONTROLNETS))
    hed_model: str = "lllyasviel/Annotators"
    prompt_template: Annotated[str, Field(pattern=r"\{class_name\}")] = "a real shot photo of {class_name}"
    quality_suffix: str = ", best quality, extremely detailed"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    scheduler: str = "UniPCMultistepScheduler"
    num_inference_steps: PositiveInt = 20
    guidance_scale: float = 9.0
    resolution: Annotated[int, Field(ge=8, multiple_of=8)] = 512
    controlnet_conditioning_scale: float = 1.0
    seed: int = 0
    # Support guidance: candidate c of a support starts from the support image noised to
    # ``strength`` (a tuple: ``strength[c % len]``, several levels per support for variety).
    strength: Strength | Annotated[tuple[Strength, ...], Field(min_length=1)] = 1.0
    # Over-generate and keep the best: paint this many candidates per support and keep the
    # ``num_aux`` with the best appearance score (None: exactly ``num_aux``, no selection).
    candidates: PositiveInt | None = None
    # What a guided candidate starts from: the support as is, or its object (mask) in a new
    # scene (background and light drawn from the candidate's seed; diffss.generation.starts).
    start: Literal["support", "new_scene"] = "support"
    # Hold the object: while the schedule is above this level, the latents inside the support's
    # mask are reset to the start image's, noised to the current level, so the object is repainted
    # over only the last ``object_strength`` share of the schedule and the rest over ``strength``
    # (blended latent diffusion; diffss.generation.pipeline). None: the whole image over ``strength``.
    object_strength: Strength | None = None
    # Class tokens: > 0 learns one textual-inversion token per support from that support alone
    # (this many steps) and prompts with "<token> <class name>" (0: the class name only).
    token_steps: Annotated[int, Field(ge=0)] = 0
    # Runtime-only settings.
    device: str | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    compile: bool = False
    channels_last: bool = False
    supports_per_call: PositiveInt = 1
    local_files_only: bool = False
    batch_size: PositiveInt | None = None

    OUTPUT_FIELDS = ("base_model", "controlnets", "prompt_template", "quality_suffix", "negative_prompt",
                     "scheduler", "num_inference_steps", "guidance_scale", "resolution",
                     "controlnet_conditioning_scale", "seed", "strength", "candidates", "start", "token_steps", "hed_model",
                     "object_strength")
    # Written sorted, as the files beside earlier images are (their bytes feed data versions).
    SORT_KEYS = True
    # Output fields added after images were made: left out of the file and the signature while
    # None (off), so the records and data versions of earlier images stay the same.
    OMITTED_WHEN_OFF = ("object_strength",)

    def __post_init__(self):
        strengths = self.strength if isinstance(self.strength, tuple) else (self.strength,)
        if self.object_strength is not None and (self.object_strength >= min(strengths) or max(strengths) >= 1):
            raise ValueError(f"GenerationConfig.object_strength ({self.object_strength}) needs support guidance "
                             f"(every strength < 1) and must be below every strength ({self.strength}): the "
                             "object is held to the support while the scene is repainted")

    def to_dict(self) -> dict:
        return _without_off(super().to_dict(), self.OMITTED_WHEN_OFF)

    @classmethod
    def paper(cls, **overrides) -> "GenerationConfig":
        """ControlNet4FSS's generator settings (the paper's code; docs/generation.md says what differs
        and why); ``overrides`` set any field (e.g. local model folders, device)."""
        return cls(**{**PAPER_SETTINGS, "controlnets": dict(PAPER_CONTROLNETS), **overrides})

    def strength_of(self, candidate: int) -> float:
        """Strength of candidate ``candidate`` of a support."""
        if isinstance(self.strength, tuple):
            return float(self.strength[int(candidate) % len(self.strength)])
        return float(self.strength)

    def num_candidates(self, num_aux: int) -> int:
        """Images painted per support: ``candidates`` (at least ``num_aux``), else ``num_aux``."""
        if self.candidates is not None and self.candidates < num_aux:
            raise ValueError(f"GenerationConfig.candidates ({self.candidates}) is smaller than the "
                             f"{num_aux} auxiliary images to keep per support")
        return int(self.candidates or num_aux)

    def images_per_call(self, num_aux: int) -> int:
        """Pipeline call size: ``batch_size``, else ``supports_per_call`` supports' images."""
        return int(self.batch_size) if self.batch_size is not None else int(self.supports_per_call) * int(num_aux)

    def prompt_name(self, class_name: str, token: str | None = None) -> str:
        """What the prompt names: the class, after the support's learned token when tokens are on."""
        return f"{token} {class_name}" if token and self.token_steps > 0 else str(class_name)

    def prompt(self, class_name: str) -> str:
        # FSS-1000 class folders are snake_case ("assult_rifle").
        return self.prompt_template.format(class_name=str(class_name).replace("_", " ")) + self.quality_suffix

    def model_ids(self, kinds) -> str:
        """The models that paint ``kinds``, by identity (content hash or hub id, never a path)."""
        from diffss.generation.identity import model_identity

        return json.dumps({"base": model_identity(self.base_model),
                           "controlnet": {k: model_identity(self.controlnets[k]) for k in kinds}}, sort_keys=True)

    def recorded(self) -> "GenerationConfig":
        """These settings as recorded beside their images: the models by identity, so the record
        (and every hash of it) is the same wherever the weights or the data live."""
        from diffss.generation.identity import model_identity

        # "random" and "sobel" name built-in edge detectors, not weights (diffss.conditions.build).
        hed = self.hed_model if self.hed_model in ("random", "sobel") else model_identity(self.hed_model)
        return dataclasses.replace(self, base_model=model_identity(self.base_model), hed_model=hed,
                                   controlnets={k: model_identity(v) for k, v in self.controlnets.items()})

    def output_signature(self) -> dict:
        return _without_off({name: getattr(self, name) for name in self.OUTPUT_FIELDS}, self.OMITTED_WHEN_OFF)


def _without_off(data: dict, names: tuple[str, ...]) -> dict:
    return {k: v for k, v in data.items() if not (k in names and v is None)}


# Everything that is not an output field changes where or how fast images come, not which.
GenerationConfig.RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig)
                                        if f.name not in GenerationConfig.OUTPUT_FIELDS)


def aux_seed(dataset: str, support_name: str, class_id: int, aux_index: int, global_seed: int = 0) -> int:
    """Seed of one auxiliary image: a hash of its identity, so it does not depend on batch
    composition, order or which other images already exist (63-bit, valid for torch)."""
    key = "\x1f".join(map(str, (dataset, support_name, int(class_id), int(aux_index), int(global_seed))))
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") & (2**63 - 1)
