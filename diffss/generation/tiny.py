"""A tiny random Stable Diffusion + ControlNet set, saved like the real weights.

Tests, benchmarks and the offline demo load it through the same ``from_pretrained`` path as
SD 1.5: ``<out>/sd/{unet,vae,text_encoder,tokenizer,scheduler,model_index.json}`` and
``<out>/controlnet-<kind>/``. The outputs are noise-like pictures; only the plumbing is real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from diffss.generation.config import DEFAULT_NEGATIVE_PROMPT, GenerationConfig

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_MAX_LENGTH = 77
# Words the tokenizer learns merges from, so default prompts stay well under 77 tokens.
_CORPUS = ("a real shot photo of, best quality, extremely detailed " + DEFAULT_NEGATIVE_PROMPT +
           " airplane aeroplane bicycle bird boat bottle bus car cat chair cow dining table dog horse"
           " motorbike person potted plant sheep sofa train television tv monitor circle square triangle"
           " star ellipse shape object")
_NUM_MERGES = 300


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes (GPT-2's table: printable
    latin-1 bytes stand for themselves, the rest are shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return [chars[b] for b in range(256)]


def _learn_merges(words: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent symbol pair."""
    counts = Counter(words)
    vocab = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in counts.items() if w}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, n in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = {}
        for symbols, n in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = n
        vocab = merged
    return merges


def write_tiny_tokenizer(out_dir: str | os.PathLike, extra_words: str = "") -> int:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json); returns
    the vocabulary size. Ids: byte chars, byte chars + "</w>", merges, then BOS and EOS last
    (as in CLIP, where they are 49406/49407). ``extra_words`` (e.g. a dataset's class names)
    join the corpus the merges are learnt from, so they become few tokens."""
    import re

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    words = re.findall(r"[a-z]+|[^\sa-z0-9]+", (_CORPUS + " " + extra_words).lower())
    merges = _learn_merges(words, _NUM_MERGES)
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": TOKENIZER_MAX_LENGTH,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "do_lower_case": True}, indent=2))
    return len(vocab)


def _tiny_models(vocab_size: int, bos_id: int, eos_id: int, conditions: Iterable[str]):
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # The VAE (and the ControlNet conditioning embedding) downsample by 4, so a 64 px image is
    # a 16 px latent and attention runs on 8x8 tokens. Few channels keep a denoising step
    # about a millisecond per image, so per-call overhead dominates and batching pays, as it
    # does on a GPU at full size.
    common = dict(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=4,
                  attention_head_dim=4)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **common)
    controlnets = {kind: ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 8, 16), **common)
                   for kind in conditions}
    for controlnet in controlnets.values():
        _unzero(controlnet)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=16,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id))
    # SD 1.5 ships a PNDM config; the generator swaps in its configured scheduler from it.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    return unet, controlnets, vae, text_encoder, scheduler


def _unzero(controlnet) -> None:
    """A fresh ControlNet's output convolutions are zero (training starts from the plain UNet),
    so every condition would paint the same image. Random weights there make the condition
    reach the UNet, so seg, hed and scribble runs differ as they do with trained models."""
    import torch

    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.2)


def _complete(path: Path, marker: str) -> bool:
    return (path / marker).is_file()


def build_tiny_diffusion(out_dir: str | os.PathLike, conditions: Iterable[str] = ("seg", "hed", "scribble"),
                         seed: int = 0) -> GenerationConfig:
    """Build (or reuse) the tiny set under ``out_dir``; returns a :class:`GenerationConfig`
    pointing at it (64 px, 4 steps). Each part is saved to a temporary folder and renamed, so
    a killed build leaves nothing that looks complete; parts already present are kept."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from diffss.conditions import parse_kinds

    out_dir = Path(out_dir)
    conditions = parse_kinds(list(conditions))
    out_dir.mkdir(parents=True, exist_ok=True)
    sd_dir = out_dir / "sd"
    cn_dirs = {kind: out_dir / f"controlnet-{kind}" for kind in conditions}
    need_sd = not _complete(sd_dir, "model_index.json")
    need_cn = [k for k, d in cn_dirs.items() if not _complete(d, "config.json")]

    if need_sd or need_cn:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tiny-build-") as tmp:
            tmp = Path(tmp)
            vocab_size = write_tiny_tokenizer(tmp / "tokenizer")
            tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                unet, controlnets, vae, text_encoder, scheduler = _tiny_models(
                    vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, cn_dirs)
            if need_sd:
                pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                               scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
                pipe.save_pretrained(tmp / "sd")
                # Keep the hand-written tokenizer files (save_pretrained may add tokenizer.json).
                for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                    shutil.copyfile(tmp / "tokenizer" / name, tmp / "sd" / "tokenizer" / name)
                shutil.rmtree(sd_dir, ignore_errors=True)
                os.replace(tmp / "sd", sd_dir)
            for kind in need_cn:
                controlnets[kind].save_pretrained(tmp / f"controlnet-{kind}")
                shutil.rmtree(cn_dirs[kind], ignore_errors=True)
                os.replace(tmp / f"controlnet-{kind}", cn_dirs[kind])

    return GenerationConfig(base_model=str(sd_dir), controlnets={k: str(d) for k, d in cn_dirs.items()},
                            resolution=64, num_inference_steps=4, local_files_only=True)
