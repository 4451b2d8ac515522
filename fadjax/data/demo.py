"""A built-in procedural texture dataset for trying the tools without downloading anything.

`demo` is a stand-in, not medical data: five texture classes (stripes, checks, rings, blobs,
noise) drawn with per-image randomness from a fixed seed, generated directly at any size and
channel count. Every image depends only on (class, index, size, channels): the random numbers
come from numpy's PCG64 (`default_rng([seed, class, index])`, uniform draws only) and the
patterns use only IEEE-exact arithmetic (no sin/exp, whose last bits vary between machines),
so the bytes are the same on every machine.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

CLASS_NAMES = ("stripes", "checks", "rings", "blobs", "noise")
# Images per class for a bare `demo` source (`demo:N` overrides).
DEFAULT_PER_CLASS = 100
_SEED = 20240501


def _triangle(t: np.ndarray) -> np.ndarray:
    """A period-1 triangle wave in [0, 1]."""
    return np.abs(2.0 * (t - np.floor(t)) - 1.0)


def _direction(rng: np.random.Generator) -> tuple[float, float]:
    """A random unit vector (without trigonometry)."""
    while True:
        x, y = rng.random(2) * 2.0 - 1.0
        norm = np.sqrt(x * x + y * y)
        if 0.1 < norm <= 1.0:
            return x / norm, y / norm


def _stripes(rng, u, v, size):
    dx, dy = _direction(rng)
    freq = 3.0 + 5.0 * rng.random()
    return _triangle(freq * (u * dx + v * dy) + rng.random())


def _checks(rng, u, v, size):
    cells = 3 + int(rng.integers(0, 6))
    ox, oy = rng.random(2)
    parity = (np.floor(u * cells + ox) + np.floor(v * cells + oy)) % 2.0
    return 0.15 + 0.7 * parity


def _rings(rng, u, v, size):
    cx, cy = rng.random(2)
    freq = 4.0 + 6.0 * rng.random()
    radius = np.sqrt((u - cx) ** 2 + (v - cy) ** 2)
    return _triangle(freq * radius + rng.random())


def _blobs(rng, u, v, size):
    out = np.zeros_like(u)
    for _ in range(4 + int(rng.integers(0, 7))):
        cx, cy = rng.random(2)
        r2 = (0.06 + 0.14 * rng.random()) ** 2
        bump = np.maximum(0.0, 1.0 - ((u - cx) ** 2 + (v - cy) ** 2) / r2)
        out = out + bump * bump
    return np.minimum(out, 1.0)


def _noise(rng, u, v, size):
    width = 1 + int(rng.integers(0, 3))
    padded = rng.random((size + 2 * width, size + 2 * width))
    # Box blur of the given half-width, by summing shifted copies.
    out = np.zeros((size, size))
    for i in range(2 * width + 1):
        for j in range(2 * width + 1):
            out = out + padded[i:i + size, j:j + size]
    out = out / (2 * width + 1) ** 2
    return np.clip((out - 0.5) * (2 * width + 1) + 0.5, 0.0, 1.0)


_PATTERNS: tuple[Callable, ...] = (_stripes, _checks, _rings, _blobs, _noise)


def image(class_index: int, index: int, *, image_size: int, channels: int) -> np.ndarray:
    """Draws one demo image.

    Args:
      class_index: index into `CLASS_NAMES`.
      index: the image's number within its class.
      image_size: side of the square image.
      channels: 1 (gray) or 3 (a random tint per image).

    Returns:
      uint8 `[image_size, image_size, channels]`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    rng = np.random.default_rng([_SEED, class_index, index])
    coords = (np.arange(image_size) + 0.5) / image_size
    v, u = np.meshgrid(coords, coords, indexing="ij")  # [S, S] each
    pattern = _PATTERNS[class_index](rng, u, v, image_size)  # [S, S] in [0, 1]
    low = 0.2 * rng.random()
    high = 0.8 + 0.2 * rng.random()
    pattern = low + (high - low) * pattern + 0.06 * (rng.random(pattern.shape) - 0.5)
    if channels == 1:
        pixels = pattern[..., None]
    else:
        tint = 0.6 + 0.4 * rng.random(3)
        pixels = pattern[..., None] * tint
    return np.clip(np.floor(pixels * 255.0 + 0.5), 0, 255).astype(np.uint8)


def generate(*, per_class: int, image_size: int, channels: int,
             class_indices: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Generates the demo dataset.

    Args:
      per_class: images per class.
      image_size: side of the square images.
      channels: 1 or 3.
      class_indices: which of `CLASS_NAMES` to generate, in this order (labels 0..k-1 follow
        it); all classes when None.

    Returns:
      `(images uint8 [N, S, S, C], labels int32 [N], ids)`, classes in order.
    """
    if per_class < 1:
        raise ValueError(f"the demo source needs at least one image per class, got {per_class}")
    class_indices = list(range(len(CLASS_NAMES))) if class_indices is None else class_indices
    images, labels, ids = [], [], []
    for label, class_index in enumerate(class_indices):
        for index in range(per_class):
            images.append(image(class_index, index, image_size=image_size, channels=channels))
            labels.append(label)
            ids.append(f"demo/{CLASS_NAMES[class_index]}/{index:05d}")
    return np.stack(images), np.asarray(labels, np.int32), ids
