"""`load`: a source read once, then served from a checked cache."""
from __future__ import annotations

import os
from typing import Callable, Iterable

from absl import logging

from fadjax.data import cache as cache_lib
from fadjax.data import images as images_lib
from fadjax.data import sources
from fadjax.data.dataset import DataError, Dataset


def _normalise_classes(classes: str | Iterable[str] | None) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = classes.split(",")
    return [c.strip().lower() for c in classes if c.strip()]


def load(source: str, *, image_size: int, channels: int,
         classes: str | Iterable[str] | None = None, skip_bad_files: bool = False,
         cache: str | None = None, data_dir: str | None = None, manual_dir: str | None = None,
         progress: bool = True,
         on_scan: Callable[[sources.ScanReport], None] | None = None, mmap: bool = False) -> Dataset:
    """Loads a dataset, through a cache when one is given.

    With `cache` set, a cache that matches the request (format version, source string, every
    preprocessing setting, shape and dtype, and, when the source is available here, its class
    names and file list) is used. A cache that does not match is rebuilt from the source when
    the source is available here, else rejected with a `CacheMismatch` naming what differs. A
    missing cache is built and written.

    Args:
      source: `folder:PATH`, `tfds:NAME[:SPLIT]`, `demo` or `demo:N`.
      image_size: side of the square images.
      channels: 1 (luma, as the paper) or 3 (RGB).
      classes: class names to keep (a list or a comma-separated string), in the order wanted:
        labels 0..k-1 follow that order and `class_names` keeps the original names. All
        classes, in source order, when None.
      skip_bad_files: skip image files that do not decode (listed in a warning) instead of
        failing with one error listing them all.
      cache: `.npz` path of the cache, or None for no cache.
      data_dir: TFDS data directory (TFDS sources).
      manual_dir: TFDS manual download directory, e.g. holding
        `Kather_texture_2016_image_tiles_5000.zip` for offline preparation.
      progress: show a progress bar while decoding.
      on_scan: called with the `sources.ScanReport` when the source is read (not when served
        from the cache), before an error about bad files is raised.
      mmap: with a cache, its images memory-mapped (read-only) rather than read into memory. A
        cache is built in chunks (a folder source is never held whole in memory), then read back.

    Returns:
      The `Dataset`: images uint8 `[N, image_size, image_size, channels]`, labels int32 `[N]`.

    Raises:
      DataError: the source or cache cannot be used; the message says why.
    """
    classes = _normalise_classes(classes)
    config = cache_lib.settings(source=source, image_size=image_size, channels=channels,
                                classes=classes, skip_bad_files=skip_bad_files,
                                preprocessing=images_lib.PREPROCESSING)
    if cache is not None and os.path.exists(cache):
        here = sources.available(source, data_dir=data_dir)
        try:
            dataset = cache_lib.read(
                cache, config,
                class_names=sources.class_names(source, classes=classes, data_dir=data_dir) if here else None,
                files=sources.image_files(source, classes=classes) if here else None, mmap=mmap)
        except DataError as e:
            if not here:
                note = (f"The source {source!r} is not available here to rebuild it; load with the "
                        "cache's settings or make the source available.")
                if isinstance(e, cache_lib.CacheMismatch):
                    raise cache_lib.CacheMismatch(cache, e.differences, note) from None
                raise DataError(f"{e}\n{note}") from e
            logging.warning("%s\nRebuilding it from %s.", e, source)
        else:
            logging.info("Loaded %d images of %d classes from cache %s%s", len(dataset),
                         dataset.num_classes, cache, "" if here else " (source not available here)")
            return dataset

    spec, skipped = sources.parse_source(source), []

    def scanned(report: sources.ScanReport):
        skipped.extend(os.path.relpath(path, spec.path) for path, _ in report.bad)
        if on_scan is not None:
            on_scan(report)

    if cache is not None:  # Decoded in chunks straight into the cache, then read back from it.
        with cache_lib.CacheWriter(cache) as writer:
            labels, class_names, files = sources.read(
                source, image_size=image_size, channels=channels, classes=classes,
                skip_bad_files=skip_bad_files, data_dir=data_dir, manual_dir=manual_dir, progress=progress,
                on_scan=scanned, sink=writer.append)
            logging.info("Read %d images of %d classes from %s", len(labels), len(class_names), source)
            writer.finish(labels, class_names, files, config, skipped=skipped)
        logging.info("Wrote cache %s", cache)
        return cache_lib.read_any(cache, mmap=mmap)[0]
    dataset = sources.read(source, image_size=image_size, channels=channels, classes=classes,
                           skip_bad_files=skip_bad_files, data_dir=data_dir,
                           manual_dir=manual_dir, progress=progress, on_scan=scanned)
    logging.info("Read %d images of %d classes from %s", len(dataset), dataset.num_classes, source)
    return dataset
