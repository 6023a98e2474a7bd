"""A procedural few-shot benchmark in the FSS-1000 layout, built in seconds from numpy + PIL.

Each class is a (texture, shape) pair such as "striped star" with a palette of two typical
colours. Members vary in colours (around the palette), scale, position, rotation, aspect and
lighting, so a support can look unlike its query. Class k uses shape k % 10 and texture
(k + k // 10) % 6, so with 20 classes every novel class's shape and texture also occur, in
other pairings, among the base classes: transfer is learnable but not trivial.

Supports matter: every image shows its class's object beside a distractor, an object of another
class of the same fold group, as large and salient as the target, on a muted background. Only
the support says which object is meant, so "segment the salient object" cannot solve an episode;
and a member's colours scatter around its class palette (HUE_SPREAD) so widely that one support
can mislead where several (or auxiliary images of the class) do not.
"""

from __future__ import annotations

import colorsys
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffss.core.atomic import write_bytes_atomic, write_text_atomic
from .fss import index_class_folders, readable_name
from .samples import DatasetError, SplitIndex, check_fold, fold_groups, is_training_split, read_lines

SHAPES = ("star", "ring", "triangle", "cross", "crescent", "heart", "blob", "square", "hexagon", "arrow")
TEXTURES = ("striped", "dotted", "checkered", "gradient", "speckled", "wavy")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
DEFAULT_ROOT = Path("data/raw/demo")
MARKER = ".demo_complete.json"  # written last: its presence means every file is in place
BUILDING = ".demo_building.json"  # written first: a folder with it is a demo build to finish
FORMAT_VERSION = 4  # 2: distractor objects; 3: one distractor, muted backgrounds; 4: shared scenes
NUM_FOLDS = 4
DEMO_DEFAULTS = {"seed": 0, "num_classes": 20, "per_class": 12}  # build_demo_dataset's defaults
MAX_DISTRACTORS = 1  # objects of other classes beside the target (1..MAX_DISTRACTORS)
HUE_SPREAD = 0.1  # std of a member's hue around its class's (1 = the whole colour wheel)
MIN_SHARED_AREA = 0.02  # a distractor is a sample of its class when this share of the image shows it
BACKGROUND_SATURATION = 0.25  # backgrounds are muted: the objects, not the background, carry the colours


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

def two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart that the pattern is visible."""
    while True:
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.abs(c1 - c2).sum() > 0.9:
            return c1, c2


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def class_hue(k: int) -> float:
    """Hue of class k: the five classes of a fold group sit a fifth of the colour wheel apart."""
    return (k % 5) / 5 + (k // 5) * 0.11


def class_palette(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The two typical colours of class k, light and dark of its hue (a fixed fact of the world)."""
    h = class_hue(k)
    return _hsv(h, 0.8, 0.95), _hsv(h + 0.06, 0.7, 0.4)


def member_colours(k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Colours of one member of class k: its palette with the hue shifted by a random amount
    (std HUE_SPREAD) and saturation/brightness varied, so one member's colours are a noisy
    sample of its class's."""
    h = class_hue(k) + rng.normal(0, HUE_SPREAD)
    s, v = rng.uniform(0.8, 1.15, 2)
    light, dark = _hsv(h, 0.8 * s, 0.95 * v), _hsv(h + 0.06, 0.7 * s, 0.4 * v)
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def palette_share(image, region: np.ndarray, k: int, tolerance: float = 0.2) -> float:
    """Share of the ``region`` pixels (bool HxW) of an RGB image whose colour is one of class k's
    palette colours under some brightness gain in [0.5, 1.5], within ``tolerance`` (RGB in [0, 1]):
    how much of the region is painted like class k."""
    rgb = np.asarray(image, dtype=np.float32)[np.asarray(region, dtype=bool)] / 255.0
    if not len(rgb):
        return 0.0
    best = np.full(len(rgb), np.inf, dtype=np.float32)
    for colour in class_palette(k):
        gain = np.clip(rgb @ colour / float(colour @ colour + 1e-6), 0.5, 1.5)
        best = np.minimum(best, np.linalg.norm(rgb - gain[:, None] * colour, axis=1))
    return float((best < tolerance).mean())


def texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator,
            colours: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    c1, c2 = colours if colours is not None else two_colours(rng)
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


def object_frame(h, w, rng, cy, cx, radius):
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


def _ramp(h, w, rng):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (xx / w * np.cos(rng.uniform(0, 2 * np.pi)) + yy / h * np.sin(rng.uniform(0, 2 * np.pi)))[..., None]


def background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 float: a tinted gradient plus smooth noise, its colours muted."""
    base, tint = rng.uniform(0.15, 0.85, 3), rng.uniform(-0.3, 0.3, 3)
    img = base + tint * _ramp(h, w, rng) + 0.25 * (_smooth_noise(h, w, 6, rng)[..., None] - 0.5)
    grey = img.mean(axis=2, keepdims=True)
    return grey + BACKGROUND_SATURATION * (img - grey)


def lighting(img: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Directional gain, a soft highlight and sensor noise; returns the RGB image."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gain = rng.uniform(0.6, 1.0) + rng.uniform(0, 0.4) * _ramp(h, w, rng)
    hy, hx = rng.uniform(0, h), rng.uniform(0, w)
    highlight = 0.25 * np.exp(-((yy - hy) ** 2 + (xx - hx) ** 2) / (2 * (0.35 * min(h, w)) ** 2))[..., None]
    img = img * gain + highlight + rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")


def distractor_classes(k: int, num_classes: int) -> list[int]:
    """Classes whose objects may stand beside class k's: the other classes of k's fold group
    (scenes mix the classes of one group, as photos mix related things). So a training image
    holds base classes only and a test image novel classes only: no class is learnt as
    background in training and then asked for at test."""
    group = next(g for g in fold_groups(list(range(num_classes)), NUM_FOLDS) if k in g)
    others = [j for j in group if j != k]
    return others or [j for j in range(num_classes) if j != k]


def _place(h, w, radii, rng, tries: int = 50):
    """Centres for objects of the given radii, keeping them apart as far as the image allows."""
    best, best_gap = None, -np.inf
    for _ in range(tries):
        centres = [(rng.uniform(0.7 * r, h - 0.7 * r), rng.uniform(0.7 * r, w - 0.7 * r)) for r in radii]
        gap = min((np.hypot(a[0] - b[0], a[1] - b[1]) - 1.6 * (ra + rb) / 2
                   for i, (a, ra) in enumerate(zip(centres, radii)) for b, rb in zip(centres[i + 1:], radii[i + 1:])),
                  default=0.0)
        if gap > best_gap:
            best, best_gap = centres, gap
        if gap >= 0:
            break
    return best


def render_scene(k: int, n: int, seed: int, num_classes: int = 20) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """Image of member n of class k and the visible region (bool HxW) of each object in it, as
    (class index, region) pairs, the target first.

    The object of class k stands beside MAX_DISTRACTORS (here one) objects of other classes of the same
    size, drawn in random order (later ones occlude earlier ones), each in colours drawn around
    its own class palette. Only the support tells which of them is meant.
    """
    rng = np.random.default_rng([seed, k, n])
    h, w = (int(x) for x in rng.integers(96, 129, size=2))
    side = min(h, w)
    img = background(h, w, rng)
    others = distractor_classes(k, num_classes)
    members = [k] + [others[int(i)] for i in rng.integers(len(others), size=int(rng.integers(1, MAX_DISTRACTORS + 1)))]
    radii = [rng.uniform(0.22, 0.32) * side for _ in members]
    centres = _place(h, w, radii, rng)
    visible = [np.zeros((h, w), dtype=bool) for _ in members]
    for j in rng.permutation(len(members)):
        tex, shape = class_spec(members[j])
        u, v = object_frame(h, w, rng, *centres[j], radii[j])
        region = shape_mask(shape, u, v, rng)
        img[region] = texture(tex, u, v, rng, member_colours(members[j], rng))[region]
        for earlier in visible:
            earlier &= ~region
        visible[j] = region

    # sometimes a small occluder in front: it is removed from the mask
    if rng.random() < 0.2:
        cy, cx = centres[0]
        ou, ov = object_frame(h, w, rng, cy + rng.normal(0, radii[0] * 0.6), cx + rng.normal(0, radii[0] * 0.6),
                              rng.uniform(0.08, 0.12) * side)
        occ = shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], ou, ov, rng)
        img[occ] = rng.uniform(0, 1, 3)
        for region in visible:
            region &= ~occ
    return lighting(img, rng), list(zip(members, visible))


def render(k: int, n: int, seed: int, num_classes: int = 20) -> tuple[Image.Image, Image.Image]:
    """Image and 0/255 mask of member n of class k (see :func:`render_scene`)."""
    image, objects = render_scene(k, n, seed, num_classes)
    return image, Image.fromarray(objects[0][1].astype(np.uint8) * 255, "L")


def render_in_mask(k: int, mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Class k's texture painted into ``mask`` (bool HxW, True = object) in new colours of its
    palette, on a new background under new lighting: what an ideal generator conditioned on the
    mask would draw."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    img = background(h, w, rng)
    ys, xs = np.nonzero(mask)
    if len(ys):
        cy, cx = ys.mean(), xs.mean()
        radius = max(2.0, float(np.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max())))
        u, v = object_frame(h, w, rng, cy, cx, radius)
        img[mask] = texture(class_spec(k)[0], u, v, rng, member_colours(k, rng))[mask]
    return lighting(img, rng)


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


def build_demo_dataset(root=DEFAULT_ROOT, seed: int = 0, num_classes: int = 20, per_class: int = 12,
                       shared_scenes: bool = True) -> Path:
    """Write the demo dataset under ``root`` (same seed -> byte-identical files); skip if complete.

    Member n of class k is ``<k's folder>/<n>.jpg``. With ``shared_scenes`` each scene is also a
    sample of its distractor's class, ``<j's folder>/<k's folder>-<n>.jpg`` with the distractor's
    mask (when enough of it is visible): the same image then has two right answers, and only the
    support says which is asked, so a segmenter cannot learn the training images by heart instead
    of reading its supports. (The generator's pretraining pool shows each scene once.)
    """
    if not 4 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 4..{MAX_CLASSES}, got {num_classes}")
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2, got {per_class}")
    root = Path(root)
    params = _params(seed, num_classes, per_class)
    if not shared_scenes:
        params["shared_scenes"] = False
    if read_marker(root) == params:
        return root
    if read_marker(root) is None and not (root / BUILDING).exists() and root.is_dir() and any(root.iterdir()):
        raise DatasetError(f"{root} is not empty and holds no demo build ({MARKER}); build the demo into an "
                           f"empty folder so no other file is overwritten", root)
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / BUILDING, json.dumps(params, sort_keys=True))  # ours, to finish after a kill
    (root / MARKER).unlink(missing_ok=True)  # a rebuild with other parameters is incomplete until done
    folders = class_folders(num_classes)
    expected: dict[str, set[str]] = {folder: set() for folder in folders}

    def write(folder: str, stem: str, image: Image.Image, region: np.ndarray) -> None:
        write_bytes_atomic(root / folder / f"{stem}.jpg", _encode(image, "JPEG"))
        write_bytes_atomic(root / folder / f"{stem}.png", _encode(Image.fromarray(region.astype(np.uint8) * 255, "L"), "PNG"))
        expected[folder] |= {f"{stem}.jpg", f"{stem}.png"}

    for k, folder in enumerate(folders):
        for n in range(1, per_class + 1):
            image, objects = render_scene(k, n, seed, num_classes)
            write(folder, str(n), image, objects[0][1])
            for j, region in objects[1:] if shared_scenes else ():
                if region.sum() >= MIN_SHARED_AREA * region.size:
                    write(folders[j], f"{folder}-{n}", image, region)
    for folder in folders:  # files left by an earlier build with more members
        for stale in (root / folder).iterdir():
            if stale.is_file() and stale.name not in expected[folder] and not stale.name.startswith("."):
                stale.unlink()
    write_text_atomic(root / "classes.txt", "\n".join(folders) + "\n")
    write_text_atomic(root / MARKER, json.dumps(params, sort_keys=True))
    (root / BUILDING).unlink(missing_ok=True)
    return root


def base_class_root(root, fold: int, out) -> Path:
    """A demo root of ``fold``'s base (training) classes only, at ``out``: the place to choose
    settings on a fold without ever testing on its novel classes. Its class folders link to
    ``root``'s (nothing is copied); its fold 0 tests the first of its groups (4 of the 15 base
    classes of a 20-class demo) and trains on the others, all of them base classes of ``fold``.
    ``root`` is only read; ``out`` is rewritten (links, ``classes.txt`` and the marker, written last)."""
    root, out = Path(root), Path(out)
    marker = read_marker(root)
    if marker is None:
        raise DatasetError(f"{root} holds no complete demo dataset ({root / MARKER} is missing)", root / MARKER)
    base = build(root, fold=fold, split="train")
    folders = read_lines(root / "classes.txt")
    chosen = [folders[c - 1] for c in base.class_ids]
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    for folder in chosen:
        link = out / folder
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((root / folder).resolve(), target_is_directory=True)
    write_text_atomic(out / "classes.txt", "\n".join(chosen) + "\n")
    write_text_atomic(out / MARKER, json.dumps({**marker, "base_classes_of": {"root": str(root.resolve()), "fold": fold}}))
    return out


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
