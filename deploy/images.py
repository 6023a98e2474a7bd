"""PNG/JPEG in, model tensors out, PNG mask back: the people's routes' image handling.

Uploads are opened lazily: PIL reads the header (format and size) and decodes nothing, so an
image over the limits (:class:`ImageLimits`) is refused before a pixel is decoded; a 40 KB
PNG can declare 40 megapixels. Decoding happens in :func:`query_tensor` and
:func:`support_tensors`, which the server runs in its bounded pool of image workers.

Images become float32 RGB [3,S,S] in [0,1] (the graphs normalise inside), resized to the
model's working size S; a JPEG is decoded directly at the smallest DCT scale that still covers
S x S. Masks: any non-zero pixel is foreground (white-on-black PNGs and palette/label PNGs
alike), resized with nearest neighbour so they stay binary.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from deploy.errors import ApiError, bad_request

ACCEPTED_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class ImageLimits:
    """``max_side``: the largest width or height of one uploaded image or mask;
    ``max_request_pixels``: all images and masks of one request together (decoding time)."""

    max_side: int = 4096
    max_request_pixels: int = 4 * 4096 * 4096

    def __post_init__(self):
        if self.max_side < 1 or self.max_request_pixels < 1:
            raise ValueError("image limits must be positive")


@dataclass
class Upload:
    """One uploaded image, opened but not decoded; ``field`` names it in errors (``support_mask[2]``)."""

    field: str
    image: Image.Image

    @property
    def pixels(self) -> int:
        return self.image.width * self.image.height


def _bad_file(field: str, exc: Exception) -> ApiError:
    return bad_request(f"{field}: not a decodable PNG or JPEG image ({type(exc).__name__}: {exc})")


def open_upload(file: BinaryIO, field: str, limits: ImageLimits) -> Upload:
    """Read the header of one upload and check its size; decodes nothing."""
    if file.seek(0, io.SEEK_END) == 0:
        raise bad_request(f"{field}: empty file")
    file.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limits follow
            image = Image.open(file, formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{field}: {exc}; the limit is {limits.max_side} pixels per side") from None
    except Image.UnidentifiedImageError:
        raise bad_request(f"{field}: not a PNG or JPEG image (other formats are not accepted)") from None
    except Exception as exc:  # PIL parsing untrusted bytes: any failure means a bad file
        raise _bad_file(field, exc) from None
    if max(image.size) > limits.max_side:
        raise ApiError(
            413,
            f"{field}: {image.width}x{image.height} exceeds the limit of {limits.max_side} pixels per side; "
            f"resize it to at most {limits.max_side}x{limits.max_side} (the model works at a few hundred pixels)",
        )
    return Upload(field, image)


def open_request(files: dict[str, list[BinaryIO]], limits: ImageLimits) -> dict[str, list[Upload]]:
    """Open every upload of a request (``{"query": [...], "support_image": [...], ...}``), check
    each against the limits, their sum against ``max_request_pixels`` and that every mask has
    its image's size, all before any decoding."""
    opened = {
        key: [open_upload(f, key if key == "query" else f"{key}[{k}]", limits) for k, f in enumerate(items)]
        for key, items in files.items()
    }
    total = sum(u.pixels for uploads in opened.values() for u in uploads)
    if total > limits.max_request_pixels:
        raise ApiError(
            413,
            f"the request's images hold {total} pixels together, over the limit of {limits.max_request_pixels} "
            "pixels per request; send smaller images or fewer shots",
        )
    for image, mask in zip(opened.get("support_image", []), opened.get("support_mask", [])):
        if mask.image.size != image.image.size:
            raise bad_request(
                f"{mask.field} is {mask.image.width}x{mask.image.height} but {image.field} is "
                f"{image.image.width}x{image.image.height}; a mask must have its image's size"
            )
    return opened


def image_tensor(upload: Upload, size: int) -> np.ndarray:
    """Decode to float32 [3,S,S] in [0,1]."""
    image = upload.image
    try:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # DCT scaling: never smaller than requested
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
    except Exception as exc:  # truncated or corrupt pixel data
        raise _bad_file(upload.field, exc) from None
    return (np.asarray(resized, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()


def mask_tensor(upload: Upload, size: int) -> np.ndarray:
    """Decode to int64 [S,S] in {0,1}; the mask must have some foreground."""
    mask = upload.image
    try:
        mask.load()
        if mask.mode not in ("L", "P", "1", "I", "I;16"):
            mask = mask.convert("L")
        # max of the raw values (palette indices for "P"): non-zero somewhere = some foreground
        if max(mask.getextrema()) == 0:
            raise bad_request(f"{upload.field} has no foreground pixels (non-zero = foreground)")
        # nearest neighbour picks source pixels, so thresholding after it equals thresholding before
        resized = mask.resize((size, size), Image.Resampling.NEAREST)
    except ApiError:
        raise
    except Exception as exc:
        raise _bad_file(upload.field, exc) from None
    return (np.asarray(resized) != 0).astype(np.int64)


def support_tensors(images: list[Upload], masks: list[Upload], size: int) -> tuple[np.ndarray, np.ndarray]:
    """[1,K,3,S,S] float32 images and [1,K,S,S] int64 masks, decoded one upload at a time."""
    image_tensors, mask_tensors = [], []
    for image, mask in zip(images, masks, strict=True):
        image_tensors.append(image_tensor(image, size))
        mask_tensors.append(mask_tensor(mask, size))
        image.image.close()  # the decoded pixels go now, not when the request ends
        mask.image.close()
    return np.stack(image_tensors)[None], np.stack(mask_tensors)[None]


def query_tensor(upload: Upload, size: int) -> tuple[tuple[int, int], np.ndarray]:
    """((width, height) of the query, its [1,3,S,S] float32 tensor)."""
    query_size = upload.image.size
    tensor = image_tensor(upload, size)[None]
    upload.image.close()
    return query_size, tensor


def mask_png(logits: np.ndarray, width: int, height: int) -> bytes:
    """[2,S,S] logits -> PNG (mode L, 0 background / 255 foreground) at the query's size.

    The foreground margin (logit 1 - logit 0) is resized bilinearly before thresholding, which
    gives smoother edges than resizing the hard mask.
    """
    margin = Image.fromarray((logits[1] - logits[0]).astype(np.float32))  # float32 -> mode F
    margin = margin.resize((width, height), Image.Resampling.BILINEAR)
    foreground = np.asarray(margin) > 0
    del margin  # at the largest query size each full-size copy is tens of megabytes
    buffer = io.BytesIO()
    Image.fromarray(foreground.view(np.uint8) * np.uint8(255)).save(buffer, format="PNG")
    return buffer.getvalue()
