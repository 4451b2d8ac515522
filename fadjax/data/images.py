"""Decoding one image and converting it to the arrays the models train on.

Every source goes through `to_array`: whatever the file's mode, the result is a uint8 array
`[size, size, channels]`.

- Modes: 1 channel is PIL's `convert("L")` (ITU-R 601-2 luma), as the paper's grayscale tiles;
  3 channels is `convert("RGB")` (grayscale input is replicated). Alpha is dropped, not
  composited. 16-bit images (`I;16*`, and `I` holding 16-bit values) are scaled to 8 bits
  (`round(v * 255 / 65535)`) rather than clipped as PIL's own conversion would.
- Geometry: a non-square image is centre-cropped to a square first, then resized with PIL's
  LANCZOS filter. PIL's `resize` is antialiased (the filter support widens with the reduction
  factor), so downscaling 150 -> 64 does not alias. An image already at the target size is not
  resampled.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# File extensions read as images (lower case). Anything else in a class folder is ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Recorded in caches so that a change of preprocessing invalidates them.
PREPROCESSING = "center-crop,lanczos,L=luma601,16bit=round(v*255/65535),alpha=dropped"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(path: str) -> Image.Image:
    """Opens and fully decodes an image file.

    PIL opens files lazily; `load()` forces the whole decode so that truncated files fail here
    rather than later.

    Args:
      path: the file.

    Returns:
      The decoded PIL image (any mode).

    Raises:
      OSError, ValueError, SyntaxError, Image.DecompressionBombError: the file is not a
        decodable image.
    """
    with Image.open(path) as img:
        img.load()
    return img


def from_array(array: np.ndarray) -> Image.Image:
    """Wraps an `[H, W]` or `[H, W, C]` (C = 1, 3, 4) uint8/uint16 array as a PIL image."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a uint8 or uint16 image array, got dtype {array.dtype}")
    if array.dtype == np.uint16 and array.ndim != 2:
        raise ValueError(f"16-bit images must be single-channel, got shape {array.shape}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))  # L, I;16, RGB or RGBA.
    raise ValueError(f"expected an image array [H, W] or [H, W, 1|3|4], got shape {array.shape}")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Returns an 8-bit `L` or `RGB` image with alpha dropped and 16-bit values scaled."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)  # [H, W]
        values = np.clip(values, 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode in ("1", "L", "LA", "La"):
        return img.convert("L")
    if img.mode == "F":
        raise ValueError("floating-point images (PIL mode F) are not supported")
    return img.convert("RGB")


def to_array(img: Image.Image, *, image_size: int, channels: int) -> np.ndarray:
    """Converts a decoded image to the training format.

    Args:
      img: a PIL image of any supported mode and size.
      image_size: side of the square output.
      channels: 1 (luma) or 3 (RGB).

    Returns:
      uint8 array `[image_size, image_size, channels]`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _to_8bit(img).convert("L" if channels == 1 else "RGB")
    width, height = img.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.asarray(img, dtype=np.uint8)
    return array.reshape(image_size, image_size, channels)


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[N,H,W,C]`` to ``channels`` (gray repeated to RGB; RGB to ITU-R 601-2 luma as PIL "L")."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.round(luma)[..., None].astype(np.uint8)
