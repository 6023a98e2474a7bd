"""Few-shot episodes (query + K supports [+ X auxiliary supports]) over a list of Samples.

Train split: every sample is the query once per epoch; its supports come from an rng seeded by
(seed, epoch, index), so an epoch is reproducible whatever the DataLoader worker order.
Test split: a fixed episode list drawn from ``numpy.random.default_rng(seed)`` at construction
(``query_sampling="file"``: HSNet's list, see ``_draw_test_episodes``).

Resizing follows the official test pipelines (``resize``): "squash" to size x size (HSNet:
PIL bilinear images, nearest masks as ``F.interpolate``), or "pad" (PFENet/BAM: long side to
size, both sides floored to a multiple of 8, top-left on a canvas of 0 / 255; bilinear and
nearest as their OpenCV calls). ``original_labels=True`` adds the query's label at its original
size (``query_mask_original``); ``collate_episodes`` batches those of different sizes.

Auxiliary supports are paired with real ones by ``aux_pairing``: ``"round_robin"`` (aux j comes
from real support j % K, its (j // K)-th image) or ``"first"`` (DifFSS-BAM: every aux image comes
from the first real support, paired with its mask). A support's aux images are taken best-ranked
first (the table's order) unless ``aux_draw="random"``: then every training episode draws them
afresh among all of the support's kept images, from an rng seeded by (seed, epoch, index), so a
support with several generated images shows a different one each epoch and a resumed run draws
the same ones. Test episodes always take the best-ranked first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .auxiliary import AuxiliarySupports
from .samples import DatasetError, Sample, open_image, scan_samples

__all__ = ["EpisodeDataset", "Sample", "DatasetError", "collate_episodes"]

log = logging.getLogger(__name__)
QUERY_SAMPLING = ("cycle", "class_balanced", "file")
RESIZE_MODES = ("squash", "pad")
AUX_PAIRING = ("round_robin", "first")
AUX_DRAW = ("first", "random")


def padded_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """PFENet/BAM's test resize: the long side becomes ``size`` (the short one scaled and
    truncated), then both sides are floored to a multiple of 8 (so 473 -> 472)."""
    if height >= width:
        h, w = size, int(width * (size / height))
    else:
        h, w = int(height * (size / width)), size
    return max(8, h // 8 * 8), max(8, w // 8 * 8)


def image_tensor(image: Image.Image, size: int, resize: str = "squash") -> torch.Tensor:
    """RGB PIL image -> float32 [3, size, size] in [0, 1].

    squash: PIL bilinear to size x size (HSNet's torchvision ``Resize`` on PIL images); pad:
    bilinear without antialiasing (OpenCV's INTER_LINEAR) to ``padded_shape``, top-left on 0.
    """
    if resize == "squash":
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    rgb = np.asarray(image, dtype=np.float32)
    h, w = padded_shape(rgb.shape[0], rgb.shape[1], size)
    rows, cols = _linear_taps(rgb.shape[0], h), _linear_taps(rgb.shape[1], w)
    rgb = rgb[:, cols[0]] * (1 - cols[2])[:, None] + rgb[:, cols[1]] * cols[2][:, None]
    rgb = rgb[rows[0]] * (1 - rows[2])[:, None, None] + rgb[rows[1]] * rows[2][:, None, None]
    canvas = torch.zeros(3, size, size)
    canvas[:, :h, :w] = torch.from_numpy(rgb / 255.0).permute(2, 0, 1)
    return canvas


# The official PFENet/BAM transform resizes with OpenCV; these reproduce its sampling (its
# double-precision inverse scale, its border clamping) to float precision.
def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INTER_LINEAR along one axis: (left index, right index, right weight) per output pixel."""
    x = (np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5
    left = np.floor(x).astype(np.int64)
    weight = (x - left).astype(np.float32)
    weight[left < 0] = 0
    left = np.clip(left, 0, src - 1)
    weight[left >= src - 1] = 0
    return left, np.minimum(left + 1, src - 1), weight


def _nearest_taps(src: int, dst: int) -> np.ndarray:
    """INTER_NEAREST along one axis: the source index of each output pixel."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)


def mask_tensor(mask: np.ndarray, size: int, resize: str = "squash") -> torch.Tensor:
    """uint8 {0,1,255} mask -> int64 [size, size], nearest as the official pipelines resize:
    squash as HSNet's ``F.interpolate(mode="nearest")``; pad as OpenCV's INTER_NEAREST, top-left
    on a canvas of 255 (ignored)."""
    labels = torch.from_numpy(mask.astype(np.int64))
    if resize == "squash":
        if labels.shape != (size, size):
            labels = F.interpolate(labels[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        return labels
    h, w = padded_shape(*mask.shape, size)
    canvas = torch.full((size, size), 255, dtype=torch.int64)
    canvas[:h, :w] = labels[_nearest_taps(mask.shape[0], h)][:, _nearest_taps(mask.shape[1], w)]
    return canvas


def collate_episodes(episodes: list[dict]) -> dict:
    """``default_collate``, except that the original-size query labels (``query_mask_original``)
    of different sizes are padded with 255 (ignored) to the largest, and ``query_size`` [B,2]
    holds each one's (h, w)."""
    originals = [e.pop("query_mask_original") for e in episodes if "query_mask_original" in e]
    batch = default_collate(episodes)
    if originals:
        height, width = max(m.shape[0] for m in originals), max(m.shape[1] for m in originals)
        labels = torch.full((len(originals), height, width), 255, dtype=torch.int64)
        for i, m in enumerate(originals):
            labels[i, : m.shape[0], : m.shape[1]] = m
        batch["query_mask_original"] = labels
    return batch


class EpisodeDataset(Dataset):
    """Episodes of one split/fold. ``__getitem__`` returns the episode dict of the data contract."""

    def __init__(self, samples: Sequence[Sample], class_ids: Sequence[int], class_names: dict[int, str], *,
                 dataset_name: str = "custom", split: str = "train", training: bool | None = None,
                 fold: int | None = None, shot: int = 1, episodes: int | None = None,
                 default_episodes: int | None = 1000, seed: int = 0, image_size: int = 400,
                 aux_shot: int = 0, auxiliary: AuxiliarySupports | None = None, skip_bad: bool = False,
                 query_sampling: str = "cycle", skipped: Sequence[tuple[Path, str]] = (),
                 resize: str = "squash", original_labels: bool = False, aux_pairing: str = "round_robin",
                 aux_draw: str = "first"):
        if not isinstance(shot, (int, np.integer)) or shot < 1:
            raise ValueError(f"shot must be an int >= 1, got {shot!r}")
        if not isinstance(aux_shot, (int, np.integer)) or aux_shot < 0:
            raise ValueError(f"aux_shot must be an int >= 0, got {aux_shot!r}")
        if aux_shot and auxiliary is None:
            raise ValueError(f"aux_shot={aux_shot} needs auxiliary=AuxiliarySupports(...)")
        if episodes is not None and (not isinstance(episodes, (int, np.integer)) or episodes < 1):
            raise ValueError(f"episodes must be an int >= 1 or None, got {episodes!r}")
        if not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if query_sampling not in QUERY_SAMPLING:
            raise ValueError(f"query_sampling must be one of {QUERY_SAMPLING}, got {query_sampling!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.original_labels = bool(original_labels)
        if aux_pairing not in AUX_PAIRING:
            raise ValueError(f"aux_pairing must be one of {AUX_PAIRING}, got {aux_pairing!r}")
        self.aux_pairing = aux_pairing
        if aux_draw not in AUX_DRAW:
            raise ValueError(f"aux_draw must be one of {AUX_DRAW}, got {aux_draw!r}")
        self.aux_draw = aux_draw
        self.dataset_name = dataset_name
        self.split = split
        self.training = split in ("train", "trn") if training is None else bool(training)
        self.fold = fold
        self.shot, self.aux_shot = int(shot), int(aux_shot)
        self.auxiliary = auxiliary
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.query_sampling = query_sampling
        self.class_names = dict(class_names)
        self.skipped: list[tuple[Path, str]] = list(skipped)
        self.epoch = 0

        wanted = set(int(c) for c in class_ids)
        samples = [s for s in samples if s.class_id in wanted]
        if skip_bad:
            samples = self._drop_bad(samples)
        self.samples: list[Sample] = samples
        by_class: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            by_class.setdefault(s.class_id, []).append(i)
        self.empty_classes = [int(c) for c in class_ids if int(c) not in by_class]
        self.class_ids = [int(c) for c in class_ids if int(c) in by_class]
        if not self.class_ids:
            raise DatasetError(f"{dataset_name} {split} (fold {fold}) has no samples of classes {list(class_ids)}")
        if self.empty_classes:
            log.warning("%s %s: classes without samples left out: %s", dataset_name, split, self.empty_classes)
        for c in self.class_ids:
            if len(by_class[c]) < self.shot + 1:
                raise DatasetError(
                    f"{dataset_name} {split}: class {c} ({self.class_names.get(c, '?')}) has "
                    f"{len(by_class[c])} image(s); shot={self.shot} needs at least {self.shot + 1}")
        self._by_class = {c: np.asarray(v, dtype=np.int64) for c, v in by_class.items()}
        self._position = {i: pos for v in by_class.values() for pos, i in enumerate(v)}

        self._episodes: list[tuple[int, tuple[int, ...]]] = []
        if not self.training:
            n = episodes if episodes is not None else (default_episodes or len(samples))
            self._episodes = self._draw_test_episodes(int(n))
        self._check_auxiliary()

    # ---- construction helpers -------------------------------------------------------------

    def _drop_bad(self, samples: list[Sample]) -> list[Sample]:
        problems = scan_samples(samples)
        bad = [(s, p) for s, p in zip(samples, problems) if p is not None]
        self.skipped.extend(p for _, p in bad)
        if bad:
            log.warning("%s: skipped %d bad sample(s), e.g. %s", self.dataset_name, len(bad), bad[0][1][1])
        return [s for s, p in zip(samples, problems) if p is None]

    def _supports_for(self, query: int, rng: np.random.Generator) -> tuple[int, ...]:
        """``shot`` distinct same-class samples, never the query itself."""
        pool = self._by_class[self.samples[query].class_id]
        pick = rng.choice(len(pool) - 1, size=self.shot, replace=False)
        pick = pick + (pick >= self._position[query])  # skip over the query's slot in the pool
        return tuple(int(i) for i in pool[pick])

    def _draw_test_episodes(self, n: int) -> list[tuple[int, tuple[int, ...]]]:
        if self.query_sampling == "file":
            return self._draw_file_order_episodes(n)
        rng = np.random.default_rng(self.seed)
        if self.query_sampling == "cycle":
            # Each pass visits every sample once in a fresh random order (HSNet cycles its list).
            passes = -(-n // len(self.samples))
            queries = np.concatenate([rng.permutation(len(self.samples)) for _ in range(passes)])[:n]
            return [(int(q), self._supports_for(int(q), rng)) for q in queries]
        episodes = []  # class_balanced: uniform class, then uniform image (HSNet COCO-20i)
        for _ in range(n):
            c = self.class_ids[rng.integers(len(self.class_ids))]
            q = int(self._by_class[c][rng.integers(len(self._by_class[c]))])
            episodes.append((q, self._supports_for(q, rng)))
        return episodes

    def _draw_file_order_episodes(self, n: int) -> list[tuple[int, tuple[int, ...]]]:
        """HSNet's test list: episode i's query is sample i mod N in index order; its supports
        are drawn one at a time from the query's class with numpy's legacy ``RandomState(seed)``
        (``choice(pool, 1, replace=False)``), skipping the query, repeats allowed. HSNet's test
        seeds the global numpy generator with 0 and its loader draws the same way, so on
        PASCAL-5i seed 0 gives its very episodes."""
        state = np.random.RandomState(self.seed)
        episodes = []
        for i in range(n):
            query = i % len(self.samples)
            pool = self._by_class[self.samples[query].class_id]
            supports: list[int] = []
            while len(supports) < self.shot:
                pick = int(pool[state.choice(len(pool), 1, replace=False)[0]])
                if pick != query:
                    supports.append(pick)
            episodes.append((query, tuple(supports)))
        return episodes

    def _check_auxiliary(self) -> None:
        """Fail at construction, not mid-epoch, when a support lacks aux images."""
        if not self.aux_shot:
            return
        aux = self.auxiliary
        if self.training:  # any sample may be support 0, which needs the most
            need = self.aux_shot if self.aux_pairing == "first" else aux.max_needed(self.aux_shot, self.shot)
            for s in self.samples:
                aux.require(s.name, s.class_id, need)
        else:
            for _, supports in self._episodes:
                for pos, i in enumerate(supports):
                    s = self.samples[i]
                    aux.require(s.name, s.class_id, self._aux_needed(pos))

    def _aux_needed(self, position: int) -> int:
        """How many aux images the real support at ``position`` contributes."""
        if self.aux_pairing == "first":
            return self.aux_shot if position == 0 else 0
        return self.auxiliary.needed_per_support(self.aux_shot, self.shot, position)

    def _aux_source(self, j: int) -> tuple[int, int]:
        """(real support position, index among its aux images) of aux support ``j``."""
        return (0, j) if self.aux_pairing == "first" else (j % self.shot, j // self.shot)

    # ---- public API ---------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Train split: reseed support draws for ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples) if self.training else len(self._episodes)

    def episode_indices(self, index: int) -> tuple[int, tuple[int, ...]]:
        """(query sample index, real support sample indices) of episode ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"episode {index} out of range 0..{len(self) - 1}")
        if not self.training:
            return self._episodes[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return index, self._supports_for(index, rng)

    def episode_list(self) -> list[tuple[str, list[str]]]:
        """(query name, [real support names]) per episode (train: of the current epoch)."""
        out = []
        for k in range(len(self)):
            q, sup = self.episode_indices(k)
            out.append((self.samples[q].name, [self.samples[i].name for i in sup]))
        return out

    def __getitem__(self, index: int) -> dict:
        q, support_ids = self.episode_indices(int(index))
        query, supports = self.samples[q], [self.samples[i] for i in support_ids]
        size, resize = self.image_size, self.resize
        q_img, q_mask = query.load_pair()
        images, masks, names = [], [], []
        for s in supports:
            img, mask = s.load_pair()
            images.append(image_tensor(img, size, resize))
            masks.append(mask_tensor(mask, size, resize))
            names.append(s.name)
        draws: dict[int, np.ndarray] = {}
        for j in range(self.aux_shot):
            position, k = self._aux_source(j)
            real = supports[position]
            if self.training and self.aux_draw == "random":
                if position not in draws:  # one permutation per support: its aux images are distinct
                    available = len(self.auxiliary.for_support(real.name, real.class_id))
                    rng = np.random.default_rng([self.seed, self.epoch, int(index), 1 + position])
                    draws[position] = rng.permutation(available)
                k = int(draws[position][k])
            path = self.auxiliary.require(real.name, real.class_id, k + 1)[k]
            images.append(image_tensor(open_image(path, "RGB"), size, resize))
            masks.append(masks[position].clone())  # a generated image is paired with its support's mask
            names.append(self.auxiliary.name_of(path))
        is_aux = torch.zeros(len(images), dtype=torch.bool)
        is_aux[self.shot:] = True
        episode = {
            "query_image": image_tensor(q_img, size, resize),
            "query_mask": mask_tensor(q_mask, size, resize),
            "support_images": torch.stack(images),
            "support_masks": torch.stack(masks),
            "support_is_aux": is_aux,
            "class_id": query.class_id,
            "class_name": query.class_name,
            "query_name": query.name,
            "support_names": names,
        }
        if self.original_labels:
            episode["query_mask_original"] = torch.from_numpy(q_mask.astype(np.int64))
            episode["query_size"] = torch.tensor(q_mask.shape)
        return episode

    def problems(self, full_decode: bool = True) -> list[tuple[Path, str]]:
        """(bad file, reason) for every sample (and aux image) that cannot be loaded: missing or
        undecodable files, image/mask size mismatch, mask values the dataset does not allow, a
        mask without the class. ``full_decode=False`` checks images by header and end only."""
        found = [p for p in scan_samples(self.samples, full_decode=full_decode) if p is not None]
        if self.aux_shot:
            seen = set()
            for s in self.samples:
                for path in self.auxiliary.for_support(s.name, s.class_id):
                    if path not in seen:
                        seen.add(path)
                        if not path.is_file():
                            found.append((path, f"missing auxiliary image: {path}"))
        return found

    def validate(self, full_decode: bool = True) -> None:
        """Check every file; raise a DatasetError naming the first bad one (and how many there are)."""
        found = self.problems(full_decode)
        if found:
            path, reason = found[0]
            more = f" (and {len(found) - 1} more bad file(s))" if len(found) > 1 else ""
            raise DatasetError(f"{reason}{more}", path)

    def __repr__(self) -> str:
        return (f"EpisodeDataset({self.dataset_name}, split={self.split}, fold={self.fold}, shot={self.shot}, "
                f"aux_shot={self.aux_shot}, aux_pairing={self.aux_pairing}, aux_draw={self.aux_draw}, "
                f"samples={len(self.samples)}, classes={len(self.class_ids)}, "
                f"episodes={len(self)}, skipped={len(self.skipped)})")
