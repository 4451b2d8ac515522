"""Does a generator copy its training tiles? Nearest-neighbour distances to the training split.

Synthetic tiles are meant to stand in for real patients' tiles; a generator that scores well by
reproducing its training tiles has failed at that. For every generated tile this module finds
the nearest tile of the training split (the split the diffusion models trained on) and compares
that distance with the same distance for real **validation** tiles (same source, never trained
on): the reference of how close an unseen real tile happens to come to the training set.

Two spaces:

* **pixels**: the root of the mean squared difference per pixel, intensities as floats in
  ``[0, 1]`` (``sqrt(mean((a - b)^2))`` = L2 distance / sqrt(H*W*C)), at the generated images'
  size (real tiles are resized, bilinear, when the sizes differ);
* **features**: the Euclidean distance between feature vectors given by a function (in
  ``fadjax.evaluate`` judge2's pooled features, :func:`fadjax.utility.pooled_features`).

**Near-copies**: the share of generated tiles nearer to a training tile (strictly) than the
``quantile`` (default 1%) quantile of the validation tiles' nearest-training distances, in each
space. For the validation tiles themselves the share is about ``quantile`` by construction (it is
measured and reported beside, since with few tiles it is coarser: at least 1 / n). A generator
whose share is far above the validation share places many tiles closer to a training tile than
unseen real tiles come. Medians of both distance sets are reported too.

Nearest neighbours are exact: argmin over chunked squared distances (float64), then the distance
to the chosen neighbour recomputed directly (an exact copy reads 0).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fadjax import utility
from fadjax.data import images as data_images

PIXEL_DISTANCE = "root mean squared difference per pixel, intensities in [0, 1]"
FEATURE_DISTANCE = "Euclidean distance between feature vectors"
FIGURE = "memorisation.png"


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N,H,W,C]`` images as float64 ``[N, H*W*C]`` rows in ``[0, 1]``."""
    images = np.asarray(images)
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def nearest(queries, references, *, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance to, and index of, each query's nearest reference row.

    Args:
      queries: ``[N, D]``.
      references: ``[M, D]``, ``M >= 1``.
      chunk: queries per block of the ``[chunk, M]`` squared-distance matrix.

    Returns:
      ``(distances [N] float64, indices [N] int64)``.

    Raises:
      ValueError: not 2-D, different widths, or no references.
    """
    q, r = np.asarray(queries, np.float64), np.asarray(references, np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and references must be [N, D] of the same D, got {q.shape} and {r.shape}")
    if not len(r):
        raise ValueError("nearest: no reference rows")
    idx = np.empty(len(q), np.int64)
    dist = np.empty(len(q), np.float64)
    for i in range(0, len(q), chunk):
        x = q[i:i + chunk]
        j = np.argmin(utility._sq_dists(x, r), axis=1)  # pylint: disable=protected-access
        idx[i:i + chunk] = j
        dist[i:i + chunk] = np.sqrt(np.sum((x - r[j]) ** 2, axis=1))  # Exact: a copy reads 0, not rounding.
    return dist, idx


def near_copy_summary(gen_dist, val_dist, *, quantile: float = 0.01) -> dict:
    """Near-copy shares and medians of nearest-training distances in one space.

    Args:
      gen_dist: each generated tile's distance to its nearest training tile.
      val_dist: the same for the real validation tiles (the reference); may be empty.
      quantile: the validation quantile below which a tile counts as a near-copy.

    Returns:
      ``{"threshold", "quantile", "near_copies_generated", "near_copies_validation",
      "median_generated", "median_validation", "n_generated", "n_validation"}``: shares are
      fractions (tiles strictly nearer than ``threshold``); None where there are no validation tiles.
    """
    g, v = np.asarray(gen_dist, np.float64), np.asarray(val_dist, np.float64)
    thr = float(np.quantile(v, quantile)) if len(v) else None
    return {"threshold": thr, "quantile": float(quantile),
            "near_copies_generated": None if thr is None else float(np.mean(g < thr)),
            "near_copies_validation": None if thr is None else float(np.mean(v < thr)),
            "median_generated": float(np.median(g)) if len(g) else None,
            "median_validation": float(np.median(v)) if len(v) else None,
            "n_generated": int(len(g)), "n_validation": int(len(v))}


def _resize_uint8(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if tuple(images.shape[1:3]) == tuple(hw):
        return images
    x = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), *hw, images.shape[3]), "bilinear")
    return np.asarray(x.round().clip(0, 255).astype(jnp.uint8))


def _reference_features(features: Callable[[np.ndarray], np.ndarray], images: np.ndarray, cache: dict | None,
                        tag: str) -> np.ndarray:
    """``features(images)``, kept in ``cache`` under the images' content (the real sets repeat per model)."""
    if cache is None:
        return np.asarray(features(images), np.float64)
    key = ("memorisation_features", tag, utility._fingerprint(images))  # pylint: disable=protected-access
    if key not in cache:
        cache[key] = np.asarray(features(images), np.float64)
    return cache[key]


def memorisation_metrics(gen_images, train_images, val_images, *,
                         features: Callable[[np.ndarray], np.ndarray] | None = None, feature_name: str = "judge2",
                         quantile: float = 0.01, num_pairs: int = 8, cache: dict | None = None) -> dict:
    """Nearest-training-tile distances of generated and validation tiles, in pixels and features.

    Args:
      gen_images: uint8 ``[N,H,W,C]`` generated tiles.
      train_images: uint8 ``[M,H',W',C']`` tiles of the training split (any size and channels:
        matched to the generated ones for the pixel space).
      val_images: uint8 real validation tiles (never trained on), like ``train_images``; may be empty.
      features: uint8 images -> ``[N, D]`` features; None = pixel space only.
      feature_name: the key of the feature space in the result (e.g. ``"judge2"``).
      quantile: validation quantile of the near-copy threshold.
      num_pairs: how many of the closest (generated, training) pairs in pixel space to list.
      cache: a dict shared between calls with the same real sets (e.g. one report's models): the
        real tiles' features and nearest-training distances are computed once.

    Returns:
      ``{"pixels": summary, feature_name: summary (when ``features``), "closest_pairs": [{"generated",
      "train", "distance"}] (pixel space, nearest first), "image_size": [H, W, C], "n_train",
      "n_generated", "n_validation", "notes"}``; each summary is :func:`near_copy_summary` plus
      ``"distance"`` (what the numbers measure). Strict-JSON-serialisable.

    Raises:
      ValueError: no generated or no training tiles.
    """
    gen = np.asarray(gen_images)
    train, val = np.asarray(train_images), np.asarray(val_images)
    if not len(gen) or not len(train):
        raise ValueError(f"memorisation needs generated and training tiles, got {len(gen)} and {len(train)}")
    hw, ch = tuple(gen.shape[1:3]), int(gen.shape[3])
    train_px = _resize_uint8(data_images.match_channels(train, ch), hw)
    train_vec = pixel_vectors(train_px)

    def val_nearest(tag, val_rows, train_rows):
        if not len(val):
            return np.zeros(0)
        if cache is None:
            return nearest(val_rows(), train_rows)[0]
        key = ("memorisation_val_nearest", tag, utility._fingerprint(train, val))  # pylint: disable=protected-access
        if key not in cache:
            cache[key] = nearest(val_rows(), train_rows)[0]
        return cache[key]

    gen_d, gen_j = nearest(pixel_vectors(gen), train_vec)
    scale = 1.0 / np.sqrt(train_vec.shape[1])  # L2 on [0, 1] -> root mean squared difference per pixel.
    val_px = lambda: pixel_vectors(_resize_uint8(data_images.match_channels(val, ch), hw))  # noqa: E731
    val_d = val_nearest(f"pixels{hw}x{ch}", val_px, train_vec)
    result = {"pixels": {**near_copy_summary(gen_d * scale, val_d * scale, quantile=quantile),
                         "distance": PIXEL_DISTANCE}}
    order = np.argsort(gen_d, kind="stable")[:num_pairs]
    result["closest_pairs"] = [{"generated": int(i), "train": int(gen_j[i]), "distance": float(gen_d[i] * scale)}
                               for i in order]
    if features is not None:
        train_f = _reference_features(features, train, cache, feature_name)
        gen_f = np.asarray(features(gen), np.float64)
        val_fd = val_nearest(feature_name, lambda: _reference_features(features, val, cache, feature_name), train_f)
        result[feature_name] = {**near_copy_summary(nearest(gen_f, train_f)[0], val_fd, quantile=quantile),
                                "distance": FEATURE_DISTANCE, "feature_dim": int(train_f.shape[1])}
    result.update(image_size=[*hw, ch], n_train=int(len(train)), n_generated=int(len(gen)), n_validation=int(len(val)),
                  notes=(f"For every generated tile, the distance to its nearest training tile; the same for the "
                         f"real validation tiles (never trained on) is the reference. near_copies_*: share of tiles "
                         f"strictly nearer than the {100 * quantile:g}% quantile of the validation distances "
                         f"(threshold); for the validation tiles about {100 * quantile:g}% by construction (at "
                         f"least 1/n_validation). "
                         f"Pixel distances: {PIXEL_DISTANCE}, at the generated size."))
    return result


def closest_pairs_figure(gen_images, train_images, pairs, path: str | os.PathLike, *, title: str = "") -> None:
    """The closest (generated, nearest training tile) pairs: generated on top, training tile below.

    Args:
      gen_images: uint8 ``[N,H,W,C]`` generated tiles.
      train_images: uint8 training tiles (shown at their own size).
      pairs: ``[{"generated", "train", "distance"}]`` (``memorisation_metrics(...)["closest_pairs"]``).
      path: output PNG.
      title: figure title.

    Draws with matplotlib's object API (no pyplot state), so stages in threads may call it at once.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    n = max(1, len(pairs))
    fig = Figure(figsize=(1.3 * n + 0.6, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for k in range(n):
        for row, (images, key) in enumerate(((gen_images, "generated"), (train_images, "train"))):
            ax = axes[row, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(pairs):
                ax.set_axis_off()
                continue
            img = np.asarray(images[pairs[k][key]])
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            if row == 0:
                ax.set_title(f"d={pairs[k]['distance']:.3f}", fontsize="small")
    axes[0, 0].set_ylabel("generated", fontsize="small")
    axes[1, 0].set_ylabel("nearest train", fontsize="small")
    fig.suptitle(title or "Closest generated tiles to the training split (pixels)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def generator_split_matches(generator_workdir: str | None, judge_split: Mapping) -> bool | None:
    """Whether a diffusion run's ``split.json`` has the judge's training and validation indices.

    Returns:
      True / False, or None when the run or its split record is not at hand.
    """
    if not generator_workdir:
        return None
    path = os.path.join(generator_workdir, "split.json")
    try:
        with open(path) as f:
            raw = json.load(f)
        return (list(raw["train"]["indices"]) == list(judge_split["train_idx"])
                and list(raw["val"]["indices"]) == list(judge_split["val_idx"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
