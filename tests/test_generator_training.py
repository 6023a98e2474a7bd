"""Generator training (autoencoder, text-to-image, ControlNet), the demo's pretraining pool, the
oracle auxiliary set and the shipped demo generator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffss.cli import main as cli_main
from diffss.data import AuxiliarySupports, build_demo_dataset, load_dataset
from diffss.data.demo import palette_share
from diffss.generation import AuxiliaryGenerator
from diffss.generation.demo_generator import (
    DEMO_PRESET,
    POOL_SEED,
    build_pretraining_pool,
    class_in_mask_contrast,
    demo_generation_config,
)
from diffss.generation.oracle import demo_class_index, write_oracle_auxiliary
from diffss.generation.generator_training import GeneratorTrainConfig, train_generator

# Small enough for a few CPU seconds per stage; the demo preset's sizes are tested by the CLI run.
SIZES = dict(resolution=32, vae_width=8, unet_channels=[16, 32, 32], attention_head_dim=4, text_width=16,
             condition_channels=[8, 8, 16])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("pool") / "pool", seed=POOL_SEED, num_classes=4, per_class=3)


def stage(pool, out, stage_name, base=None, steps=20, **kw):
    settings = dict(dataset="demo", root=str(pool), split="all", resolution=32, sizes=SIZES, batch_size=4,
                    learning_rate=2e-3, checkpoint_every=10, local_files_only=True)
    return GeneratorTrainConfig(stage=stage_name, output_dir=str(out), base_model=base, steps=steps,
                                **{**settings, **kw})


@pytest.fixture(scope="module")
def trained(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    vae = train_generator(stage(pool, out / "vae", "autoencoder", steps=30), progress=False)
    sd = train_generator(stage(pool, out / "sd", "text-to-image", base=str(vae)), progress=False)
    cn = train_generator(stage(pool, out / "cn", "controlnet", base=str(sd), conditions=("seg", "hed"),
                               hed_model="random"), progress=False)
    return vae, sd, cn


def _early_late(folder, n=5):
    loss = pd.read_csv(folder / "history.csv")["loss"]
    return loss.iloc[:n].mean(), loss.iloc[-n:].mean()


def test_stages_lower_the_loss_and_generate_loads_the_result(trained, pool, tmp_path):
    vae, sd, cn = trained
    for folder in trained:
        early, late = _early_late(folder)
        assert late < early, (folder.name, early, late)
    assert (sd / "model_index.json").is_file() and (sd / "vae" / "config.json").is_file()
    assert (cn / "config.json").is_file() and (cn / "diffusion_pytorch_model.safetensors").is_file()
    # `diffss generate` loads the trained SD folder and ControlNet through from_pretrained.
    rc = cli_main(["--quiet", "generate", "--dataset", "demo", "--root", str(pool), "--split", "test",
                   "--base-model", str(sd), "--controlnet", f"seg={cn}", "--condition", "seg", "--num-aux", "1",
                   "--num-inference-steps", "2", "--resolution", "32", "--output", str(tmp_path / "aux"),
                   "--conditions-dir", str(tmp_path / "cond")])
    assert rc == 0
    table = pd.read_parquet(tmp_path / "aux" / "demo" / "seg" / "auxiliary.parquet")
    test_samples = load_dataset("demo", root=pool, fold=0, split="test", episodes=1).samples
    assert len(table) == len(test_samples) and all((tmp_path / "aux" / "demo" / "seg" / p).is_file() for p in table["path"])


def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(trained, pool, tmp_path):
    """With train_base_unet (the demo preset's ControlNet stage) the base UNet trains, resumes and
    is exported beside the ControlNet too; the base model's own UNet is left as it was."""
    _, sd, _ = trained
    before = (sd / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    straight = train_generator(stage(pool, tmp_path / "straight", "controlnet", base=str(sd), steps=6,
                                     checkpoint_every=2, train_base_unet=True), progress=False)

    def kill_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # the process dies between checkpoints (last one: step 4)

    resumed_cfg = stage(pool, tmp_path / "resumed", "controlnet", base=str(sd), steps=6, checkpoint_every=2,
                        train_base_unet=True)
    with pytest.raises(KeyboardInterrupt):
        train_generator(resumed_cfg, progress=False, callback=kill_at_5)
    assert pd.read_csv(tmp_path / "resumed" / "history.csv")["step"].max() == 4
    resumed = train_generator(resumed_cfg, progress=False)
    a, b = _final_state(straight), _final_state(resumed)
    for part in ("controlnet", "unet"):
        for name, tensor in a["models"][part].items():
            assert torch.equal(tensor, b["models"][part][name]), (part, name)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    from diffusers import UNet2DConditionModel

    tuned = UNet2DConditionModel.from_pretrained(resumed / "unet").state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in b["models"]["unet"].items())
    assert (sd / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="train_base_unet"):
        stage(pool, tmp_path / "x", "text-to-image", base=str(sd), train_base_unet=True)
    with pytest.raises(ValueError, match="other settings"):
        train_generator(stage(pool, tmp_path / "resumed", "controlnet", base=str(sd), steps=6, learning_rate=1e-4),
                        progress=False)


def test_class_binding_trains_the_text_encoder_on_from_an_existing_generator(trained, pool, tmp_path):
    """train_text_encoder + controlnet_init (the demo's class-binding stage): the run starts from
    the given ControlNet, trains the text encoder with the UNet and ControlNet, exports all three,
    and export_generator builds a generator with that text encoder; the sources stay untouched."""
    from diffusers import ControlNetModel
    from transformers import CLIPTextModel

    from diffss.generation.demo_generator import export_generator
    from diffss.generation.generator_training import _ControlNetStage, load_training_images, training_samples

    _, sd, cn = trained
    cfg = stage(pool, tmp_path / "bind", "controlnet", base=str(sd), steps=6, conditions=("seg", "hed"),
                hed_model="random", train_base_unet=True, train_text_encoder=True, controlnet_init=str(cn))
    start = _ControlNetStage(cfg, load_training_images(cfg, training_samples(cfg), progress=False), torch.device("cpu"))
    source = ControlNetModel.from_pretrained(cn).state_dict()
    assert all(torch.equal(v, source[k]) for k, v in start.controlnet.state_dict().items())
    assert set(start.trainable) == {"controlnet", "unet", "text_encoder"}
    text_before = (sd / "text_encoder" / "model.safetensors").read_bytes()
    run = train_generator(cfg, progress=False)
    early, late = _early_late(run, n=2)
    assert np.isfinite([early, late]).all()
    tuned = CLIPTextModel.from_pretrained(run / "text_encoder").state_dict()
    original = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder").state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned), "the text encoder did not train"
    assert (sd / "text_encoder" / "model.safetensors").read_bytes() == text_before
    exported = CLIPTextModel.from_pretrained(export_generator(sd, run, tmp_path / "gen").base_model,
                                             subfolder="text_encoder").state_dict()
    assert all(torch.equal(exported[k], tuned[k].half()) for k in tuned)
    with pytest.raises(ValueError, match="train_text_encoder"):
        stage(pool, tmp_path / "x", "controlnet", base=str(sd), train_text_encoder=True)
    with pytest.raises(ValueError, match="controlnet_init"):
        stage(pool, tmp_path / "x", "text-to-image", base=str(sd), controlnet_init=str(cn))


def _final_state(run: Path) -> dict:
    from diffss.core.checkpoint import CheckpointDir

    return CheckpointDir(run / "checkpoints").latest().load("trainer_state.pt", weights_only=False)


def _digests(samples) -> set[str]:
    return {hashlib.sha256(s.image_path.read_bytes()).hexdigest() for s in samples}


def test_pretraining_pool_is_disjoint_from_every_fss_image(tmp_path):
    fss = build_demo_dataset(tmp_path / "demo", seed=0)
    pool_root = build_pretraining_pool(tmp_path / "pool", per_class=3)
    pool_samples = []
    for split in ("train", "test"):
        pool_samples += load_dataset("demo", root=pool_root, fold=0, split=split, episodes=1).samples
    assert len({s.class_id for s in pool_samples}) == 20  # every class of every fold
    pool_digests = _digests(pool_samples)
    for fold in range(4):
        for split in ("train", "test"):
            fss_samples = load_dataset("demo", root=fss, fold=fold, split=split, episodes=1).samples
            assert not pool_digests & _digests(fss_samples), (fold, split)


def test_oracle_set_is_read_like_a_generated_one(tmp_path):
    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=4, per_class=3)
    samples = load_dataset("demo", root=root, fold=0, split="train", episodes=1).samples
    table = write_oracle_auxiliary(samples, tmp_path / "aux", num_aux=2, progress=False)
    assert len(table) == 2 * len(samples) and set(table["condition"]) == {"oracle"}
    aux = AuxiliarySupports.from_table(tmp_path / "aux" / "demo" / "oracle" / "auxiliary.parquet", condition="oracle")
    episodes = load_dataset("demo", root=root, fold=0, split="train", aux_shot=2, auxiliary=aux, image_size=32)
    assert episodes[0]["support_images"].shape == (3, 3, 32, 32)
    inside, outside = [], []
    for sample in samples:
        mask = sample.load_mask() == 1
        with Image.open(aux.for_support(sample.name, sample.class_id)[0]) as image:
            k = demo_class_index(sample.class_name)
            inside.append(palette_share(image, mask, k))
            outside.append(palette_share(image, ~mask, k))
    assert np.mean(inside) > np.mean(outside) + 0.2
    again = write_oracle_auxiliary(samples, tmp_path / "aux", num_aux=2, progress=False)  # resumes: same rows
    pd.testing.assert_frame_equal(table, again)


def test_a_random_generator_does_not_paint_the_class_in_the_mask(tmp_path):
    """The measure the demo generator is judged by (the oracle test above scores > 0.2 on it) is
    about 0 for a random generator. The shipped generator's scores are in README (not yet > 0 on
    base classes: its class path is not learnt at the CPU budget it was trained with)."""
    import dataclasses

    from diffss.generation import build_tiny_diffusion

    root = build_demo_dataset(tmp_path / "demo", seed=0, num_classes=8, per_class=4)
    samples = load_dataset("demo", root=root, fold=0, split="train", episodes=1).samples[::4]
    tiny = dataclasses.replace(build_tiny_diffusion(tmp_path / "tiny", conditions=("seg",)), resolution=64,
                               device="cpu")
    assert abs(class_in_mask_contrast(tiny, samples, tmp_path / "conditions")) < 0.1


@pytest.mark.slow
def test_the_shipped_weights_command_runs(tmp_path):
    """The command README gives for the shipped weights, a few steps of each stage at the preset's
    sizes: it writes a generator folder that generation loads."""
    out = tmp_path / "generator"
    rc = cli_main(["--quiet", "train-generator", "--preset", "demo", "--seed", "0", "--device", "cpu",
                   "--work-dir", str(tmp_path / "work"), "--output", str(out), "--steps-scale", "0.004",
                   "--pool-per-class", "2"])
    assert rc == 0
    history = pd.read_csv(tmp_path / "work" / "text-to-image" / "history.csv")
    assert len(history) == round(DEMO_PRESET["text-to-image"]["steps"] * 0.004)
    # ... then class binding on the generator the stages made (its text encoder is the one written)
    binding = tmp_path / "work" / "class-binding"
    assert len(pd.read_csv(binding / "history.csv")) == round(DEMO_PRESET["class-binding"]["steps"] * 0.004)
    assert json.loads((binding / "train_config.json").read_text())["controlnet_init"] == str(
        tmp_path / "work" / "generator-staged" / "controlnet")
    from safetensors.torch import load_file

    bound, written = load_file(binding / "text_encoder" / "model.safetensors"), load_file(
        out / "sd" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(bound[k].half(), written[k]) for k in bound)
    config = demo_generation_config(out, device="cpu", num_inference_steps=2)
    assert config.resolution == 64 and set(config.controlnets) == {"seg", "hed", "scribble"}
    image = AuxiliaryGenerator(config, "scribble").generate([Image.new("RGB", (64, 64))], ["striped star"], [0])[0]
    assert image.shape == (64, 64, 3)


def test_an_experiment_selects_the_shipped_generator_by_name(tmp_path):
    from diffss.experiment import LEARNED_DEMO, ExperimentConfig, learned_demo_generation, prepare_diffusion_models

    settings = ExperimentConfig(generation=learned_demo_generation())
    assert settings.generation.base_model == LEARNED_DEMO  # a name, not a machine's path
    settings.check_paths()
    config = prepare_diffusion_models(settings, tmp_path / "models")
    assert (Path(config.base_model) / "model_index.json").is_file()
    assert all((Path(p) / "config.json").is_file() for p in config.controlnets.values())
    weights = json.loads((tmp_path / "models" / "models.json").read_text())["weights"]
    assert set(weights) >= {"sd/unet/diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors"}


def test_decoder_stage_keeps_the_latent_space_and_lowers_the_reconstruction_loss(trained, pool, tmp_path):
    """A wider decoder on the frozen encoder: the encoder (hence the latents the UNet and ControlNet
    were trained on) and the scaling factor are the base's, the decoder has the new sizes, the loss
    falls, and a run stopped between checkpoints resumes to the uninterrupted weights."""
    from diffusers import AutoencoderTiny

    vae, _, _ = trained
    sizes = {**SIZES, "vae_width": 12, "vae_blocks": 2}
    straight = train_generator(stage(pool, tmp_path / "straight", "decoder", base=str(vae), steps=24, sizes=sizes),
                               progress=False)
    early, late = _early_late(straight)
    assert late < early
    base, new = AutoencoderTiny.from_pretrained(vae), AutoencoderTiny.from_pretrained(straight)
    assert new.config.scaling_factor == base.config.scaling_factor
    assert tuple(new.config.decoder_block_out_channels) == (12, 12, 12)
    assert tuple(new.config.num_decoder_blocks) == (2, 2, 1)
    assert tuple(new.config.encoder_block_out_channels) == tuple(base.config.encoder_block_out_channels)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(new.encode(x).latents, base.encode(x).latents)

    def kill_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    resumed_cfg = stage(pool, tmp_path / "resumed", "decoder", base=str(vae), steps=24, sizes=sizes)
    with pytest.raises(KeyboardInterrupt):
        train_generator(resumed_cfg, progress=False, callback=kill_at_7)
    resumed = train_generator(resumed_cfg, progress=False)
    a, b = _final_state(straight), _final_state(resumed)
    assert all(torch.equal(t, b["models"]["decoder"][k]) for k, t in a["models"]["decoder"].items())


def test_decoder_of_a_generator_keeps_its_unet_and_controlnet(tmp_path, capsys):
    """`diffss train-generator --decoder-of shipped`: the shipped generator with a new decoder; its
    UNet, text encoder and ControlNet tensors are the shipped ones, and generation loads it."""
    from safetensors.torch import load_file

    from diffss.generation.shipped import PRETRAINED_DIR

    out = tmp_path / "generator"
    rc = cli_main(["--quiet", "train-generator", "--preset", "demo", "--decoder-of", "shipped", "--device", "cpu",
                   "--work-dir", str(tmp_path / "work"), "--output", str(out), "--steps-scale", "0.004",
                   "--pool-per-class", "2"])
    assert rc == 0
    for part in ("sd/unet/diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(PRETRAINED_DIR / part), load_file(out / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    vae = json.loads((out / "sd" / "vae" / "config.json").read_text())
    assert vae["decoder_block_out_channels"] == [DEMO_PRESET["decoder"]["sizes"]["vae_width"]] * 3
    assert vae["encoder_block_out_channels"] == json.loads(
        (PRETRAINED_DIR / "sd" / "vae" / "config.json").read_text())["encoder_block_out_channels"]
    config = demo_generation_config(out, device="cpu", num_inference_steps=2)
    image = AuxiliaryGenerator(config, "seg").generate([Image.new("RGB", (64, 64))], ["striped star"], [0])[0]
    assert image.shape == (64, 64, 3)
    capsys.readouterr()
    assert cli_main(["train-generator", "--decoder-of", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "is not a generator folder" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("resolution", [None, 96])
def test_class_binding_of_a_generator_trains_its_text_path_and_keeps_its_autoencoder(tmp_path, capsys, resolution):
    """`diffss train-generator --class-binding-of shipped`: text encoder, UNet and ControlNet train
    on from the shipped weights (all three change), the autoencoder is the shipped one, and the
    result generates with the preset's settings; with `--resolution 96` the stage trains on 96-px
    images and the generator paints at 96 px, while the preset stays at 64."""
    from safetensors.torch import load_file

    from diffss.generation.shipped import PRETRAINED_DIR

    out = tmp_path / "generator"
    size = resolution or DEMO_PRESET["resolution"]
    rc = cli_main(["--quiet", "train-generator", "--preset", "demo", "--class-binding-of", "shipped", "--device", "cpu",
                   "--work-dir", str(tmp_path / "work"), "--output", str(out), "--steps-scale", "0.001",
                   "--pool-per-class", "2", "--batch-size", "2", *(["--resolution", str(resolution)] if resolution else [])])
    assert rc == 0
    run = json.loads((tmp_path / "work" / "class-binding" / "train_config.json").read_text())
    assert run["train_text_encoder"] and run["train_base_unet"] and run["controlnet_init"].endswith("controlnet")
    assert run["resolution"] == run["sizes"]["resolution"] == size
    for part in ("sd/vae/diffusion_pytorch_model.safetensors",):
        a, b = load_file(PRETRAINED_DIR / part), load_file(out / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    for part in ("sd/text_encoder/model.safetensors", "sd/unet/diffusion_pytorch_model.safetensors",
                 "controlnet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(PRETRAINED_DIR / part), load_file(out / part)
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), f"{part} did not train"
    config = demo_generation_config(out, device="cpu", num_inference_steps=2)
    assert config.strength == DEMO_PRESET["generation"]["strength"] and config.resolution == size
    assert DEMO_PRESET["generation"]["resolution"] == DEMO_PRESET["resolution"] == 64
    image = AuxiliaryGenerator(config, "seg").generate([Image.new("RGB", (size, size))], ["striped star"], [0])[0]
    assert image.shape == (size, size, 3)


def test_train_generator_refuses_two_refinements_and_a_size_the_autoencoder_cannot_halve(tmp_path, capsys):
    """One refinement per run, and a resolution that is not a multiple of 8; both refused before
    anything is written."""
    assert cli_main(["train-generator", "--class-binding-of", "shipped", "--decoder-of", "shipped",
                     "--output", str(tmp_path / "x")]) == 2
    assert "one of --decoder-of and --class-binding-of" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli_main(["train-generator", "--class-binding-of", "shipped", "--resolution", "100",
                     "--output", str(tmp_path / "x"), "--work-dir", str(tmp_path / "w2")]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "w2").exists()


def test_the_96_px_generator_is_the_shipped_one_taken_to_96_px():
    """pretrained/demo-96: the shipped generator's architecture and autoencoder (class binding keeps
    it), its text encoder, UNet and ControlNet trained on, and it paints at 96 px."""
    from safetensors.torch import load_file

    from diffss.generation.shipped import PRETRAINED_96_DIR, PRETRAINED_DIR

    for part in ("sd/vae/diffusion_pytorch_model.safetensors", "sd/text_encoder/model.safetensors",
                 "sd/unet/diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(PRETRAINED_DIR / part), load_file(PRETRAINED_96_DIR / part)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), part
        assert all(torch.equal(a[k], b[k]) for k in a) == part.startswith("sd/vae"), part
    config = demo_generation_config(PRETRAINED_96_DIR, device="cpu", num_inference_steps=2)
    assert config.resolution == 96 and demo_generation_config().resolution == 64
    image = AuxiliaryGenerator(config, "seg").generate([Image.new("RGB", (96, 96))], ["striped star"], [0])[0]
    assert image.shape == (96, 96, 3)
