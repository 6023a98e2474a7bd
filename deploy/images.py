"""PNG/JPEG in, model tensors out, PNG mask back: the people's route's image handling.

Images become float32 RGB [3,S,S] in [0,1] (the graphs normalise inside), resized to the
model's working size S. Masks: any non-zero pixel is foreground (white-on-black PNGs and
palette/label PNGs alike), resized with nearest neighbour so they stay binary.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from deploy.errors import bad_request

ACCEPTED_FORMATS = {"PNG", "JPEG"}
# Decompression bombs: a tiny file that decodes to gigapixels. Anything above this is refused.
MAX_PIXELS = 40_000_000


def decode_image(data: bytes, field: str) -> Image.Image:
    """Open and fully decode a PNG/JPEG; ``field`` names the form field in errors."""
    if not data:
        raise bad_request(f"{field}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format, width, height = image.format, image.width, image.height
            if image_format in ACCEPTED_FORMATS and width * height <= MAX_PIXELS:
                image.load()
    except Exception as exc:  # PIL parsing untrusted bytes: any failure means a bad file
        raise bad_request(f"{field}: not a decodable PNG/JPEG image ({type(exc).__name__}: {exc})") from None
    if image_format not in ACCEPTED_FORMATS:
        raise bad_request(f"{field}: {image_format or 'unknown'} images are not accepted, send PNG or JPEG")
    if width * height > MAX_PIXELS:
        raise bad_request(f"{field}: {width}x{height} exceeds {MAX_PIXELS} pixels")
    return image


def image_tensor(image: Image.Image, size: int) -> np.ndarray:
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(rgb, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()


def mask_tensor(mask: Image.Image, image: Image.Image, size: int, field: str, image_field: str) -> np.ndarray:
    """int64 [S,S] in {0,1}; the mask must have its image's size and some foreground."""
    if mask.size != image.size:
        raise bad_request(
            f"{field} is {mask.width}x{mask.height} but {image_field} is {image.width}x{image.height}; "
            "a mask must have its image's size"
        )
    if mask.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        mask = mask.convert("L")
    elif mask.mode not in ("L", "P", "1", "I", "I;16"):
        mask = mask.convert("L")
    values = np.asarray(mask)
    foreground = (values != 0).astype(np.uint8)
    if not foreground.any():
        raise bad_request(f"{field} has no foreground pixels (non-zero = foreground)")
    resized = Image.fromarray(foreground).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.int64)


def mask_png(logits: np.ndarray, width: int, height: int) -> bytes:
    """[2,S,S] logits -> PNG (mode L, 0 background / 255 foreground) at the query's size.

    The foreground margin (logit 1 - logit 0) is resized bilinearly before thresholding, which
    gives smoother edges than resizing the hard mask.
    """
    margin = Image.fromarray((logits[1] - logits[0]).astype(np.float32))  # float32 -> mode F
    margin = margin.resize((width, height), Image.Resampling.BILINEAR)
    mask = np.where(np.asarray(margin) > 0, 255, 0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def support_tensors(image_files: list[bytes], mask_files: list[bytes], size: int) -> tuple[np.ndarray, np.ndarray]:
    """[1,K,3,S,S] float32 images and [1,K,S,S] int64 masks from paired PNG/JPEG files."""
    images, masks = [], []
    for k, (image_bytes, mask_bytes) in enumerate(zip(image_files, mask_files, strict=True)):
        image = decode_image(image_bytes, f"support_image[{k}]")
        mask = decode_image(mask_bytes, f"support_mask[{k}]")
        images.append(image_tensor(image, size))
        masks.append(mask_tensor(mask, image, size, f"support_mask[{k}]", f"support_image[{k}]"))
    return np.stack(images)[None], np.stack(masks)[None]


def query_tensor(data: bytes, size: int) -> tuple[tuple[int, int], np.ndarray]:
    """((width, height) of the query, its [1,3,S,S] float32 tensor)."""
    image = decode_image(data, "query")
    return image.size, image_tensor(image, size)[None]
