"""Auxiliary generation with the tiny random SD + ControlNet: seeds, batching, resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffss.conditions import HedConditioner, is_valid_image  # noqa: E402
from diffss.data import build_demo_dataset  # noqa: E402
from diffss.generation import (  # noqa: E402
    TABLE_COLUMNS,
    AuxiliaryGenerator,
    GenerationConfig,
    aux_seed,
    build_tiny_diffusion,
    drift_score,
    generate_auxiliary,
    run_generation,
)
from diffss.generation.identity import model_identity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeSample:
    """The ``diffss.data.Sample`` contract, reading a 0/255 mask PNG."""

    name: str
    class_id: int
    class_name: str
    image_path: Path
    mask_path: Path

    def load_image(self) -> Image.Image:
        return Image.open(self.image_path).convert("RGB")

    def load_mask(self) -> np.ndarray:
        return (np.asarray(Image.open(self.mask_path).convert("L")) >= 128).astype(np.uint8)


def write_supports(folder: Path, n: int) -> list[FakeSample]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        rng = np.random.default_rng(i)
        w, h = 40 + 4 * i, 36
        img = (rng.random((h, w, 3)) * 90).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[8:28, 10 + i:30 + i] = 255
        img[mask > 0] = (200, 60 + 20 * i, 40)
        Image.fromarray(img).save(folder / f"{i}.png")
        Image.fromarray(mask).save(folder / f"{i}_mask.png")
        samples.append(FakeSample(f"shapes/{i}", 1 + i % 2, ("cat", "red car")[i % 2], folder / f"{i}.png",
                                  folder / f"{i}_mask.png"))
    return samples


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> GenerationConfig:
    return build_tiny_diffusion(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def seg_generator(tiny) -> AuxiliaryGenerator:
    return AuxiliaryGenerator(tiny, "seg")


def test_config_json_round_trip_and_errors(tmp_path, tiny):
    cfg = GenerationConfig(guidance_scale=7.5, controlnets={"seg": "a", "hed": "b"}, seed=3)
    path = tmp_path / "gen.json"
    cfg.to_json(path)
    assert GenerationConfig.from_json(path) == cfg
    assert GenerationConfig.from_json(cfg.to_json()) == cfg
    assert cfg.prompt("assult_rifle") == "a real shot photo of assult rifle, best quality, extremely detailed"
    path.write_text(json.dumps({**cfg.to_dict(), "stepz": 3}))
    with pytest.raises(ValueError, match=r"gen\.json.*stepz"):
        GenerationConfig.from_json(path)
    with pytest.raises(ValueError, match="resolution"):
        GenerationConfig(resolution=100)
    # The tiny set is saved in the diffusers layout and loaded through from_pretrained.
    sd = Path(tiny.base_model)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (sd / part).exists()
    assert {Path(p).name for p in tiny.controlnets.values()} == {"controlnet-seg", "controlnet-hed",
                                                                   "controlnet-scribble"}
    before = (sd / "unet" / "config.json").stat().st_mtime_ns
    assert build_tiny_diffusion(sd.parent) == tiny  # idempotent: reused, not rebuilt
    assert (sd / "unet" / "config.json").stat().st_mtime_ns == before


def test_seed_depends_on_identity_only():
    s = aux_seed("pascal5i", "2007_000033", 1, 0, 0)
    assert s == aux_seed("pascal5i", "2007_000033", 1, 0, 0) and 0 <= s < 2**63
    others = {aux_seed("pascal5i", "2007_000033", 1, 1, 0), aux_seed("pascal5i", "2007_000033", 2, 0, 0),
              aux_seed("coco20i", "2007_000033", 1, 0, 0), aux_seed("pascal5i", "2007_000033", 1, 0, 1)}
    assert s not in others and len(others) == 4


def test_single_image_equals_its_batched_twin(seg_generator):
    rng = np.random.default_rng(0)
    controls = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    items = [controls[0]] * 2 + [controls[1]] * 2
    names = ["cat", "cat", "dog", "dog"]
    seeds = [aux_seed("toy", "s", 1, k) for k in range(4)]
    batched = seg_generator.generate(items, names, seeds)
    assert batched.shape == (4, 64, 64, 3) and batched.dtype == np.float32
    assert batched.std() > 0.01 and np.abs(batched[0] - batched[1]).max() > 0.01  # seeds differ
    for k in (1, 2):
        # Padded to the batch's shape: the same bits, whatever the position and neighbours.
        alone = seg_generator.generate([items[k]], [names[k]], [seeds[k]], pad_to=4)
        assert alone.shape == (1, 64, 64, 3) and np.array_equal(alone[0], batched[k])
        reordered = seg_generator.generate(items[::-1], names[::-1], seeds[::-1])
        assert np.array_equal(reordered[3 - k], batched[k])
        # A call of another shape: float rounding only.
        unpadded = seg_generator.generate([items[k]], [names[k]], [seeds[k]])[0]
        np.testing.assert_allclose(unpadded, batched[k], atol=1e-4)
    with pytest.raises(ValueError, match="pad_to"):
        seg_generator.generate(items, names, seeds, pad_to=2)


def test_generate_writes_layout_and_table_then_is_idempotent(tmp_path, tiny, seg_generator):
    samples = write_supports(tmp_path / "data", 2)
    out = tmp_path / "aux"
    table = generate_auxiliary(samples, "seg", out, tiny, num_aux=2, dataset_name="toy",
                               generator=seg_generator, progress=False)
    root = out / "toy" / "seg"
    assert list(table.columns) == TABLE_COLUMNS and len(table) == 4
    stored = pd.read_parquet(root / "auxiliary.parquet")
    pd.testing.assert_frame_equal(stored, table)
    for row in table.itertuples():
        path = root / row.path
        assert path.is_file() and row.path == f"{row.class_id}/{Path(row.path).parts[1]}/{row.aux_index}.png"
        assert Image.open(path).size == (row.width, row.height)
        support = samples[int(row.support_name.split("/")[1])]
        assert (row.width, row.height) == support.load_image().size  # resized to the support
        assert row.seed == aux_seed("toy", row.support_name, row.class_id, row.aux_index, tiny.seed)
        assert 0.0 <= row.drift <= 1.0 and row.condition == "seg"
        assert json.loads(row.model_ids)["controlnet"] == {"seg": model_identity(tiny.controlnets["seg"])}  # by content
    assert "seconds" not in table.columns  # versioned data holds no timings
    assert table.prompt.iloc[0].startswith("a real shot photo of ")

    # Cross-support batches of another size: the same images up to float rounding, which moves
    # a value across a .5 boundary now and then (README: at most 1 grey level).
    wide = GenerationConfig(**{**tiny.to_dict(), "batch_size": 3})
    other = generate_auxiliary(samples, "seg", tmp_path / "aux2", wide, num_aux=2, dataset_name="toy",
                               generator=seg_generator, progress=False)
    for a, b in zip(table.path, other.path):
        diff = np.abs(np.asarray(Image.open(root / a), dtype=np.int16)
                      - np.asarray(Image.open(tmp_path / "aux2" / "toy" / "seg" / b), dtype=np.int16))
        assert diff.max() <= 1

    made = seg_generator.images_generated
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    again = generate_auxiliary(samples, "seg", out, tiny, num_aux=2, dataset_name="toy",
                               generator=seg_generator, progress=False)
    assert seg_generator.images_generated == made
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == mtimes
    pd.testing.assert_frame_equal(again, table)

    # Corrupt file -> only it is regenerated (alone, in a call padded to the batch size), and
    # equals the original byte for byte.
    victim = root / table.path.iloc[1]
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 3])
    generate_auxiliary(samples, "seg", out, tiny, num_aux=2, dataset_name="toy", generator=seg_generator,
                       progress=False)
    assert seg_generator.images_generated == made + 1 and victim.read_bytes() == original

    # Different output settings in the same folder are refused, naming the config file.
    with pytest.raises(ValueError, match="generation_config.json.*guidance_scale"):
        generate_auxiliary(samples, "seg", out, GenerationConfig(**{**tiny.to_dict(), "guidance_scale": 3.0}),
                           num_aux=2, dataset_name="toy", progress=False)


# FakeSample and write_supports' samples, for child processes.
SAMPLES_SNIPPET = """
import numpy as np
from dataclasses import dataclass
from pathlib import Path
from PIL import Image

@dataclass
class S:
    name: str
    class_id: int
    class_name: str
    image_path: Path
    mask_path: Path
    def load_image(self):
        return Image.open(self.image_path).convert("RGB")
    def load_mask(self):
        return (np.asarray(Image.open(self.mask_path).convert("L")) >= 128).astype(np.uint8)

def supports(folder, n):
    return [S(f"shapes/{i}", 1 + i % 2, ("cat", "red car")[i % 2], folder / f"{i}.png", folder / f"{i}_mask.png")
            for i in range(n)]
"""

SUBPROCESS = SAMPLES_SNIPPET + """
import sys, time, torch
from diffss.generation import GenerationConfig, generate_auxiliary
from diffss.generation.pipeline import AuxiliaryGenerator
torch.set_num_threads(1)
folder, out, cfg_json = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
samples = supports(folder, 6)
slow = AuxiliaryGenerator.generate
def generate_slowly(self, *args, **kwargs):
    images = slow(self, *args, **kwargs)
    time.sleep(0.7)  # leave time to be killed between (and during) writes
    return images
AuxiliaryGenerator.generate = generate_slowly
generate_auxiliary(samples, "seg", out, GenerationConfig.from_json(cfg_json), num_aux=2, dataset_name="toy",
                   progress=False)
"""


def test_killed_run_resumes_without_partial_files(tmp_path, tiny, seg_generator):
    samples = write_supports(tmp_path / "data", 6)
    out = tmp_path / "aux"
    root = out / "toy" / "seg"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS, str(tmp_path / "data"), str(out), tiny.to_json()],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in root.rglob("*.png") if not p.name.startswith(".")]:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no image appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # A stray temporary, as a kill inside a write would leave.
    (root / "2").mkdir(parents=True, exist_ok=True)
    (root / "2" / ".0.png.abc123.tmp.png").write_bytes(b"\x89PNG partial")

    done = {p: p.stat().st_mtime_ns for p in root.rglob("*.png") if not p.name.startswith(".")}
    assert 1 <= len(done) < 12
    made = seg_generator.images_generated
    table = generate_auxiliary(samples, "seg", out, tiny, num_aux=2, dataset_name="toy",
                               generator=seg_generator, progress=False)
    assert seg_generator.images_generated - made == 12 - len(done)  # only the missing ones
    assert len(table) == 12 and table[["support_name", "aux_index"]].drop_duplicates().shape[0] == 12
    assert all(is_valid_image(root / p) for p in table.path)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished images kept as they were
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # Rows the killed run never recorded are rebuilt from their images, byte-identical to a clean run's.
    assert table.drift.notna().all()


SHARD_WORKER = SAMPLES_SNIPPET + """
import json, sys, time, torch
import diffss.generation.run as run
from diffss.generation import GenerationConfig, generate_shard
torch.set_num_threads(1)
folder, out, cfg_json, shard, sync = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
write = run._write_table
def write_slowly(path, rows):
    time.sleep(0.05)  # widen the read-modify-write window another worker would race into
    return write(path, rows)
run._write_table = write_slowly
config = GenerationConfig.from_json(cfg_json)
index, count = run.parse_shard(shard)
from diffss.generation.pipeline import AuxiliaryGenerator
generator = AuxiliaryGenerator(config, "seg")
(sync / f"ready-{index}").touch()
while len(list(sync.glob("ready-*"))) < count:  # all workers start generating together
    time.sleep(0.01)
start = time.time()
result = generate_shard(supports(folder, 9), "seg", out, shard, config, num_aux=2, dataset_name="toy",
                        generator=generator, progress=False)
(sync / f"done-{index}.json").write_text(json.dumps({**result.metadata(), "start": start, "end": time.time()}))
"""


def test_shard_partition_is_deterministic_and_complete(tmp_path, monkeypatch):
    from diffss.generation import parse_shard, shard_device, shard_samples

    samples = write_supports(tmp_path / "data", 7)
    shards = [shard_samples(samples, (i, 3)) for i in range(3)]
    assert sorted(len(s) for s in shards) == [2, 2, 3]
    keys = [(s.name, s.class_id) for shard in shards for s in shard]
    assert len(keys) == len(set(keys)) == 7
    assert [s.name for s in shard_samples(samples[::-1] + samples[:2], "1/3")] == [s.name for s in shards[1]]
    assert parse_shard(" 2/3 ") == (2, 3) and parse_shard(None) is None
    for bad in ("3/3", "1-3", "a/b", (0, 0)):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    assert shard_device("1/2", "cuda:3") == "cuda:3" and shard_device(None, None) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # one worker per GPU, round robin
    assert [shard_device(f"{i}/8", None) for i in range(8)] == [f"cuda:{i % 4}" for i in range(8)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert shard_device("5/8", None) is None  # one GPU: the default device


def test_cross_support_batches_equal_per_support_calls(tmp_path, tiny, seg_generator):
    """batch_size 4 over supports of 3 images each (calls straddle supports) vs batches of
    the same size made of whole supports: identical files."""
    samples = write_supports(tmp_path / "data", 4)
    across = GenerationConfig(**{**tiny.to_dict(), "batch_size": 4})
    a = generate_auxiliary(samples, "seg", tmp_path / "a", across, num_aux=3, dataset_name="toy",
                           generator=seg_generator, progress=False)
    b = generate_auxiliary(samples[:2], "seg", tmp_path / "b", across, num_aux=2, dataset_name="toy",
                           generator=seg_generator, progress=False)  # 2 supports x 2 images per call
    b = generate_auxiliary(samples, "seg", tmp_path / "b", across, num_aux=3, dataset_name="toy",
                           generator=seg_generator, progress=False)  # the rest, in other groupings
    assert len(a) == len(b) == 12
    for path in a.path:
        assert (tmp_path / "a/toy/seg" / path).read_bytes() == (tmp_path / "b/toy/seg" / path).read_bytes()
    pd.testing.assert_frame_equal(a, b)


def test_concurrent_shards_equal_the_unsharded_run(tmp_path, tiny, seg_generator):
    """Three shard processes at once on one folder: byte-identical images, a complete table."""
    samples = write_supports(tmp_path / "data", 9)
    config = GenerationConfig(**{**tiny.to_dict(), "batch_size": 4})  # shards end on padded calls
    whole = generate_auxiliary(samples, "seg", tmp_path / "whole", config, num_aux=2, dataset_name="toy",
                               generator=seg_generator, progress=False)
    out, sync = tmp_path / "sharded", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_WORKER, str(tmp_path / "data"), str(out), config.to_json(),
                               f"{i}/3", str(sync)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    done = [json.loads((sync / f"done-{i}.json").read_text()) for i in range(3)]
    assert max(d["start"] for d in done) < min(d["end"] for d in done)  # they did run at once
    assert sum(d["images"] for d in done) == sum(d["generated"] for d in done) == 18

    root, ref = out / "toy" / "seg", tmp_path / "whole" / "toy" / "seg"
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(ref) for p in ref.rglob("*.png")) and len(files) == 18
    assert all((root / f).read_bytes() == (ref / f).read_bytes() for f in files)
    table = pd.read_parquet(root / "auxiliary.parquet")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    pd.testing.assert_frame_equal(table, whole)


def test_paper_preset_is_controlnet4fss_generator(tmp_path, tiny):
    paper = GenerationConfig.paper()
    assert (paper.scheduler, paper.num_inference_steps, paper.guidance_scale, paper.resolution) == (
        "DDIMScheduler", 2, 9.0, 512)
    assert paper.controlnets == {"seg": "lllyasviel/sd-controlnet-seg", "hed": "lllyasviel/sd-controlnet-hed",
                                 "scribble": "lllyasviel/sd-controlnet-scribble"}
    # FSSpregenerate.py: f"a real shot photo of {name}," + ", " + a_prompt
    assert paper.prompt("cat") == "a real shot photo of cat,, best quality, extremely detailed"
    assert paper.negative_prompt.endswith("worst quality, low quality, artwork")
    assert GenerationConfig.from_json(paper.to_json()) == paper
    assert GenerationConfig().output_signature() != paper.output_signature()
    local = GenerationConfig.paper(base_model=tiny.base_model, controlnets=tiny.controlnets, resolution=64,
                                   local_files_only=True)
    generator = AuxiliaryGenerator(local, "seg")
    scheduler = generator.pipe.scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [501, 1]  # ControlNet's DDIM "uniform" steps for ddim_steps=2
    samples = write_supports(tmp_path / "data", 1)
    table = generate_auxiliary(samples, "seg", tmp_path / "aux", local, num_aux=2, dataset_name="toy",
                               generator=generator, progress=False)
    assert len(table) == 2 and table.prompt.iloc[0] == "a real shot photo of cat,, best quality, extremely detailed"


def test_multicontrolnet_seg_plus_hed(tmp_path, tiny):
    samples = write_supports(tmp_path / "data", 1)
    table = generate_auxiliary(samples, "seg+hed", tmp_path / "aux", tiny, num_aux=1, dataset_name="toy",
                               hed=HedConditioner.random(device="cpu"), progress=False)
    assert len(table) == 1 and table.condition.iloc[0] == "seg+hed"
    assert set(json.loads(table.model_ids.iloc[0])["controlnet"]) == {"seg", "hed"}
    assert (tmp_path / "aux" / "toy" / "conditions" / "hed").is_dir()
    assert is_valid_image(tmp_path / "aux" / "toy" / "seg+hed" / table.path.iloc[0])


def test_drift_is_low_when_aligned_and_high_when_shifted():
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    mask = (np.hypot(yy - 40, xx - 40) < 20).astype(np.uint8)
    rng = np.random.default_rng(0)

    def scene(cy, cx):
        img = np.full((h, w, 3), 50.0) + rng.normal(0, 10, (h, w, 3))
        img[np.hypot(yy - cy, xx - cx) < 20] += (150, 120, 30)
        return np.clip(img, 0, 255).astype(np.uint8)

    support = scene(40, 40)
    aligned, shifted, far = scene(40, 40), scene(40, 52), scene(72, 72)
    d_aligned, d_shifted, d_far = (drift_score(x, mask, reference=support) for x in (aligned, shifted, far))
    assert d_aligned < 0.2 < d_shifted < d_far and d_far > 0.9
    assert drift_score(np.zeros((h, w, 3), np.uint8), mask) == 1.0  # no edges: unverifiable


def test_run_generation_on_demo_dataset(tmp_path, tiny):
    build_demo_dataset(tmp_path / "demo", num_classes=4, per_class=2)
    kwargs = dict(name="demo", root=tmp_path / "demo", fold=0, split="test", num_classes=4, per_class=2)
    table = run_generation(kwargs, "seg", tmp_path / "aux", tiny, num_aux=1, progress=False)
    assert len(table) == 2 and set(table.dataset) == {"demo"}
    from diffss.data import AuxiliarySupports

    aux = AuxiliarySupports.from_table(tmp_path / "aux" / "demo" / "seg" / "auxiliary.parquet")
    row = table.iloc[0]
    assert [p.name for p in aux.for_support(row.support_name, int(row.class_id))] == ["0.png"]
