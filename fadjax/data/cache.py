"""Dataset caches: decoded, resized uint8 arrays in one `.npz` file.

A cache holds `images` uint8 `[N, H, W, C]`, `labels` int32 `[N]`, `class_names`, `files` and
`meta`, a JSON string recording the format version, the source string and every preprocessing
setting. `read` checks all of it against what the caller asks for and raises `CacheMismatch`
naming each difference; nothing is pickled. `write` is atomic (temporary file + rename), so an
interrupted write never leaves a half-written cache under the real name.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from fadjax.workdir import atomic_write
from fadjax.data.dataset import DataError, Dataset

FORMAT = "fadjax-data-cache"
VERSION = 1


class CacheMismatch(DataError):
    """A cache exists but does not match the request.

    Attributes:
      path: the cache file.
      differences: one line per thing that differs.
    """

    def __init__(self, path: str, differences: list[str], note: str = ""):
        self.path, self.differences = path, differences
        super().__init__(f"cache {path} does not match the request:\n" +
                         "\n".join(f"  {d}" for d in differences) + (f"\n{note}" if note else ""))


def settings(*, source: str, image_size: int, channels: int, classes: list[str] | None,
             skip_bad_files: bool, preprocessing: str) -> dict[str, Any]:
    """The settings a cache is keyed on (stored in its meta and compared on read)."""
    return dict(source=source, image_size=int(image_size), channels=int(channels),
                classes=None if classes is None else list(classes),
                skip_bad_files=bool(skip_bad_files), preprocessing=preprocessing)


def write(path: str, dataset: Dataset, config: dict[str, Any], *, skipped: list[str] = ()):
    """Writes a dataset cache atomically.

    Args:
      path: the `.npz` file to write (its folder is created).
      dataset: what to store.
      config: `settings(...)` of the request that built it.
      skipped: files left out because they did not decode (`skip_bad_files`).
    """
    meta = dict(format=FORMAT, version=VERSION, settings=config,
                shape=list(dataset.images.shape), dtype=str(dataset.images.dtype),
                skipped=list(skipped))
    with atomic_write(path) as f:
        np.savez(f, images=dataset.images, labels=dataset.labels,
                 class_names=np.asarray(dataset.class_names, dtype=str),
                 files=np.asarray(dataset.files, dtype=str), meta=np.asarray(json.dumps(meta)))


def read_any(path: str) -> tuple[Dataset, dict[str, Any]]:
    """Reads a cache without comparing it to a request (only its own consistency is checked).

    Returns:
      `(dataset, meta)`.

    Raises:
      DataError: the file is missing, unreadable, of another format or version, or
        inconsistent.
    """
    if not os.path.isfile(path):
        raise DataError(f"cache {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cache {path} is not a readable fadjax data cache: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CacheMismatch(path, [f"format {meta.get('format')!r} version {meta.get('version')!r} "
                                   f"(cache) != {FORMAT!r} version {VERSION} (this code)"])
    missing = {"images", "labels", "class_names", "files"} - set(arrays)
    if missing:
        raise DataError(f"cache {path} lacks arrays {sorted(missing)}")
    images, labels = arrays["images"], arrays["labels"]
    problems = []
    if list(images.shape) != meta["shape"] or str(images.dtype) != meta["dtype"]:
        problems.append(f"images are {images.dtype} {list(images.shape)} but meta records "
                        f"{meta['dtype']} {meta['shape']}")
    if images.dtype != np.uint8 or images.ndim != 4:
        problems.append(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        problems.append(f"labels must be int32 [{images.shape[0]}], got {labels.dtype} {labels.shape}")
    if problems:
        raise CacheMismatch(path, problems)
    try:
        dataset = Dataset(images, labels, [str(c) for c in arrays["class_names"]],
                          [str(f) for f in arrays["files"]], meta["settings"]["source"])
    except ValueError as e:
        raise DataError(f"cache {path} is inconsistent: {e}") from e
    return dataset, meta


def read(path: str, config: dict[str, Any], *, class_names: list[str] | None = None,
         files: list[str] | None = None) -> Dataset:
    """Reads a cache and checks it against a request.

    Args:
      path: the `.npz` file.
      config: `settings(...)` of the request.
      class_names: the class names the source gives now, when known.
      files: the image files the source lists now, when known (folder sources); the cache's
        files plus the ones it skipped must be exactly these.

    Returns:
      The cached `Dataset`.

    Raises:
      CacheMismatch: naming everything that differs.
      DataError: the file is unreadable or inconsistent.
    """
    dataset, meta = read_any(path)
    differences = []
    cached = meta["settings"]
    for key in sorted(set(cached) | set(config)):
        if cached.get(key) != config.get(key):
            differences.append(f"{key}: {cached.get(key)!r} (cache) != {config.get(key)!r} (requested)")
    size, channels = config["image_size"], config["channels"]
    if dataset.images.shape[1:] != (size, size, channels):
        differences.append(f"image shape: {list(dataset.images.shape[1:])} (cache) != "
                           f"{[size, size, channels]} (requested)")
    if class_names is not None and dataset.class_names != list(class_names):
        differences.append(f"class names: {dataset.class_names} (cache) != {list(class_names)} (source)")
    if files is not None:
        had = set(dataset.files) | set(meta.get("skipped", []))
        now = set(files)
        if had != now:
            added, removed = sorted(now - had), sorted(had - now)
            differences.append(f"source files changed: {len(added)} added (e.g. {added[:3]}), "
                               f"{len(removed)} removed (e.g. {removed[:3]})")
    if differences:
        raise CacheMismatch(path, differences)
    return dataset
