"""A procedural few-shot benchmark in the FSS-1000 layout, built in seconds from numpy + PIL.

Each class is a (texture, shape) pair such as "striped star". Members vary in colours, scale,
position, rotation, aspect, lighting and background clutter (other shapes that are not in the
mask), so a support can look unlike its query. Class k uses shape k % 10 and texture
(k + k // 10) % 6, so with 20 classes every novel class's shape and texture also occur, in
other pairings, among the base classes: transfer is learnable but not trivial.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import write_bytes_atomic, write_text_atomic
from .fss import index_class_folders, readable_name
from .samples import DatasetError, SplitIndex, check_fold, fold_groups, is_training_split, read_lines

SHAPES = ("star", "ring", "triangle", "cross", "crescent", "heart", "blob", "square", "hexagon", "arrow")
TEXTURES = ("striped", "dotted", "checkered", "gradient", "speckled", "wavy")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
DEFAULT_ROOT = Path("data/raw/demo")
MARKER = ".demo_complete.json"  # written last: its presence means every file is in place
BUILDING = ".demo_building.json"  # written first: a folder with it is a demo build to finish
FORMAT_VERSION = 1
NUM_FOLDS = 4
DEMO_DEFAULTS = {"seed": 0, "num_classes": 20, "per_class": 12}  # build_demo_dataset's defaults


def class_spec(k: int) -> tuple[str, str]:
    """(texture, shape) of class index k (0-based); distinct for k < 60."""
    return TEXTURES[(k + k // len(SHAPES)) % len(TEXTURES)], SHAPES[k % len(SHAPES)]


def class_folders(num_classes: int) -> list[str]:
    return ["_".join(class_spec(k)) for k in range(num_classes)]


# ---- shapes: boolean masks over object-frame coordinates (u, v), object radius ~ 1 ------------

def _regular_polygon(r, theta, n):
    return r * np.cos(np.mod(theta, 2 * np.pi / n) - np.pi / n) <= np.cos(np.pi / n)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "star":
        tip = np.abs(2 * np.mod(5 * theta / (2 * np.pi), 1.0) - 1)  # 1 at the 5 tips, 0 between
        return r <= 0.42 + 0.58 * tip ** 1.5
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "triangle":
        return _regular_polygon(r, theta, 3)
    if shape == "square":
        return _regular_polygon(r, theta, 4)
    if shape == "hexagon":
        return _regular_polygon(r, theta, 6)
    if shape == "cross":
        return ((np.abs(u) < 0.33) & (np.abs(v) < 1)) | ((np.abs(u) < 1) & (np.abs(v) < 0.33))
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.5, v) > 0.8)
    if shape == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "blob":
        p1, p2 = rng.uniform(0, 2 * np.pi, 2)
        return r <= 0.75 + 0.15 * np.sin(3 * theta + p1) + 0.1 * np.cos(2 * theta + p2)
    if shape == "arrow":
        shaft = (np.abs(v) < 0.22) & (u > -1) & (u < 0.15)
        head = (u >= 0.15) & (u <= 1) & (np.abs(v) <= (1 - u) * 0.88)
        return shaft | head
    raise ValueError(f"unknown shape {shape!r}")


# ---- textures: HxWx3 float colours over object-frame coordinates ------------------------------

def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart that the pattern is visible."""
    while True:
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.abs(c1 - c2).sum() > 0.9:
            return c1, c2


def texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c1, c2 = _two_colours(rng)
    p = rng.uniform(0.28, 0.45)  # pattern period in object radii
    if kind == "striped":
        t = (np.sin(2 * np.pi * u / p) > 0).astype(np.float32)
    elif kind == "dotted":
        t = (((np.mod(u / p, 1) - 0.5) ** 2 + (np.mod(v / p, 1) - 0.5) ** 2) < 0.09).astype(np.float32)
    elif kind == "checkered":
        t = (np.mod(np.floor(u / p) + np.floor(v / p), 2) == 0).astype(np.float32)
    elif kind == "gradient":
        t = np.clip((u + 1) / 2, 0, 1).astype(np.float32)
    elif kind == "speckled":
        t = (rng.random(u.shape) < 0.35).astype(np.float32)
    elif kind == "wavy":
        t = (np.sin(2 * np.pi * (u + 0.18 * np.sin(2 * np.pi * v / 0.6)) / p) > 0).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return t[..., None] * c1 + (1 - t[..., None]) * c2


def _object_frame(h, w, rng, cy, cx, radius):
    """Grid coordinates in a rotated, anisotropically scaled frame centred on (cy, cx)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.8, 1.25)
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u = (np.cos(angle) * dx + np.sin(angle) * dy) * aspect
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / aspect
    return u, v


def _smooth_noise(h, w, cells, rng):
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def render(k: int, n: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """Image and 0/255 mask of member n of class k."""
    rng = np.random.default_rng([seed, k, n])
    tex, shape = class_spec(k)
    h, w = (int(x) for x in rng.integers(96, 129, size=2))
    side = min(h, w)

    # background: a tinted gradient plus smooth noise
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base, tint = rng.uniform(0.15, 0.85, 3), rng.uniform(-0.3, 0.3, 3)
    ramp = (xx / w * np.cos(rng.uniform(0, 2 * np.pi)) + yy / h * np.sin(rng.uniform(0, 2 * np.pi)))[..., None]
    img = base + tint * ramp + 0.25 * (_smooth_noise(h, w, 6, rng)[..., None] - 0.5)

    # clutter: other shapes with other textures, never part of the mask
    for _ in range(int(rng.integers(1, 4))):
        c_shape = SHAPES[(SHAPES.index(shape) + int(rng.integers(1, len(SHAPES)))) % len(SHAPES)]
        c_tex = TEXTURES[(TEXTURES.index(tex) + int(rng.integers(1, len(TEXTURES)))) % len(TEXTURES)]
        cu, cv = _object_frame(h, w, rng, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.2) * side)
        region = shape_mask(c_shape, cu, cv, rng)
        img[region] = texture(c_tex, cu, cv, rng)[region]

    # the object of class k
    radius = rng.uniform(0.22, 0.38) * side
    cy, cx = rng.uniform(0.7 * radius, h - 0.7 * radius), rng.uniform(0.7 * radius, w - 0.7 * radius)
    u, v = _object_frame(h, w, rng, cy, cx, radius)
    mask = shape_mask(shape, u, v, rng)
    img[mask] = texture(tex, u, v, rng)[mask]

    # sometimes a small occluder in front: it is removed from the mask
    if rng.random() < 0.3:
        o_shape = SHAPES[(SHAPES.index(shape) + int(rng.integers(1, len(SHAPES)))) % len(SHAPES)]
        ou, ov = _object_frame(h, w, rng, cy + rng.normal(0, radius * 0.6), cx + rng.normal(0, radius * 0.6),
                               rng.uniform(0.08, 0.14) * side)
        occ = shape_mask(o_shape, ou, ov, rng)
        img[occ] = rng.uniform(0, 1, 3)
        mask &= ~occ

    # lighting: directional gain, a soft highlight, sensor noise
    gain = rng.uniform(0.6, 1.0) + rng.uniform(0, 0.4) * ramp
    hy, hx = rng.uniform(0, h), rng.uniform(0, w)
    highlight = 0.25 * np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * (0.35 * side) ** 2))[..., None]
    img = img * gain + highlight + rng.normal(0, 0.02, img.shape)
    image = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")
    return image, Image.fromarray(mask.astype(np.uint8) * 255, "L")


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _params(seed: int, num_classes: int, per_class: int) -> dict:
    return {"format": FORMAT_VERSION, "seed": int(seed), "num_classes": int(num_classes), "per_class": int(per_class)}


def read_marker(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_demo_dataset(root=DEFAULT_ROOT, seed: int = 0, num_classes: int = 20, per_class: int = 12) -> Path:
    """Write the demo dataset under ``root`` (same seed -> byte-identical files); skip if complete."""
    if not 4 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 4..{MAX_CLASSES}, got {num_classes}")
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2, got {per_class}")
    root = Path(root)
    params = _params(seed, num_classes, per_class)
    if read_marker(root) == params:
        return root
    if read_marker(root) is None and not (root / BUILDING).exists() and root.is_dir() and any(root.iterdir()):
        raise DatasetError(f"{root} is not empty and holds no demo build ({MARKER}); build the demo into an "
                           f"empty folder so no other file is overwritten", root)
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / BUILDING, json.dumps(params, sort_keys=True))  # ours, to finish after a kill
    (root / MARKER).unlink(missing_ok=True)  # a rebuild with other parameters is incomplete until done
    folders = class_folders(num_classes)
    for k, folder in enumerate(folders):
        expected = set()
        for n in range(1, per_class + 1):
            image, mask = render(k, n, seed)
            write_bytes_atomic(root / folder / f"{n}.jpg", _encode(image, "JPEG"))
            write_bytes_atomic(root / folder / f"{n}.png", _encode(mask, "PNG"))
            expected |= {f"{n}.jpg", f"{n}.png"}
        for stale in (root / folder).iterdir():  # left by an earlier build with more members
            if stale.is_file() and stale.name not in expected and not stale.name.startswith("."):
                stale.unlink()
    write_text_atomic(root / "classes.txt", "\n".join(folders) + "\n")
    write_text_atomic(root / MARKER, json.dumps(params, sort_keys=True))
    (root / BUILDING).unlink(missing_ok=True)
    return root


def build(root=None, fold: int = 0, split: str = "train", skip_bad: bool = False, data_seed: int | None = None,
          num_classes: int | None = None, per_class: int | None = None) -> SplitIndex:
    """Demo split of a complete build under ``root``. Reading never writes: a folder without the
    completion marker (or built with other explicit params) is an error saying how to build it."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    marker = read_marker(root)
    asked = {"seed": data_seed, "num_classes": num_classes, "per_class": per_class}
    if marker is None or any(v is not None and marker.get(k) != v for k, v in asked.items()):
        wanted = {k: (v if v is not None else (marker or {}).get(k, DEMO_DEFAULTS[k])) for k, v in asked.items()}
        build = (f"`diffss demo-data --root {root} --seed {wanted['seed']} --num-classes {wanted['num_classes']} "
                 f"--per-class {wanted['per_class']}` or diffss.data.build_demo_dataset({str(root)!r}, ...)")
        if marker is None:
            raise DatasetError(f"{root} holds no complete demo dataset ({root / MARKER} is missing); build it "
                               f"(into an empty folder or an earlier demo build) with {build}", root / MARKER)
        raise DatasetError(f"{root} holds the demo built with {marker}, not the asked {wanted}; build that one "
                           f"with {build}", root / MARKER)
    folders = read_lines(root / "classes.txt")
    if len(folders) < NUM_FOLDS:
        raise DatasetError(f"{root / 'classes.txt'} lists {len(folders)} classes; need at least {NUM_FOLDS}",
                           root / "classes.txt")
    all_ids = list(range(1, len(folders) + 1))
    training = is_training_split(split)
    novel = fold_groups(all_ids, NUM_FOLDS)[check_fold(fold, NUM_FOLDS, "demo")]
    class_ids = [c for c in all_ids if c not in novel] if training else novel
    samples, skipped = index_class_folders(root, [folders[c - 1] for c in class_ids], class_ids, skip_bad)
    return SplitIndex(samples=samples, class_ids=class_ids,
                      class_names={i + 1: readable_name(f) for i, f in enumerate(folders)}, training=training,
                      split="train" if training else "test", default_episodes=1000, default_image_size=128,
                      skipped=skipped)
