"""Dataset caches: decoded, resized uint8 arrays in one `.npz` file.

The file is an uncompressed `.npz` (what `np.savez` writes) whose `images.npy` member is stored as is,
so `read(..., mmap=True)` can map the images instead of reading them (the host input path of a set
that does not fit on the device); :class:`CacheWriter` writes it in chunks, so a large folder's
cache is built without holding the set in memory.

A cache holds `images` uint8 `[N, H, W, C]`, `labels` int32 `[N]`, `class_names`, `files` and
`meta`, a JSON string recording the format version, the source string and every preprocessing
setting. `read` checks all of it against what the caller asks for and raises `CacheMismatch`
naming each difference; nothing is pickled. `write` is atomic (temporary file + rename), so an
interrupted write never leaves a half-written cache under the real name.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
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


class CacheWriter:
    """Writes a cache whose images arrive in chunks (:meth:`append`), holding one chunk at a time.

    The images go to a temporary raw file beside the cache; :meth:`finish` streams them into the
    `.npz` (written atomically) and removes it, as does leaving the ``with`` block on an error.
    """

    CHUNK_BYTES = 16 << 20

    def __init__(self, path: str):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self._raw_path = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.images.tmp")
        self._raw = open(self._raw_path, "wb")
        self.count, self.image_shape = 0, None

    def append(self, images: np.ndarray) -> None:
        """Adds uint8 ``[n, H, W, C]`` images (every chunk of one shape)."""
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if self.image_shape is None:
            self.image_shape = images.shape[1:]
        elif images.shape[1:] != self.image_shape:
            raise ValueError(f"a chunk of {images.shape[1:]} images after {self.image_shape} ones")
        self._raw.write(images.tobytes())
        self.count += images.shape[0]

    def finish(self, labels, class_names, files, config: dict[str, Any], *,
               skipped: list[str] = ()) -> None:
        """Writes the cache (atomically), with the images appended so far."""
        self._raw.close()
        if self.image_shape is None:
            raise ValueError("no images were appended")
        shape = (self.count, *self.image_shape)
        labels = np.asarray(labels)
        if labels.dtype != np.int32 or labels.shape != (self.count,) or len(files) != self.count:
            raise ValueError(f"{self.count} images but labels {labels.dtype} {labels.shape} and {len(files)} files")
        meta = dict(format=FORMAT, version=VERSION, settings=config, shape=list(shape), dtype="uint8",
                    skipped=list(skipped))
        with atomic_write(self.path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("images.npy", "w", force_zip64=True) as m, open(self._raw_path, "rb") as raw:
                np.lib.format.write_array_header_1_0(
                    m, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": shape})
                while block := raw.read(self.CHUNK_BYTES):
                    m.write(block)
            for name, array in (("labels", labels), ("class_names", np.asarray(class_names, dtype=str)),
                                ("files", np.asarray(files, dtype=str)), ("meta", np.asarray(json.dumps(meta)))):
                with z.open(f"{name}.npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, array, allow_pickle=False)
        self.close()

    def close(self) -> None:
        self._raw.close()
        if os.path.exists(self._raw_path):
            os.remove(self._raw_path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write(path: str, dataset: Dataset, config: dict[str, Any], *, skipped: list[str] = ()):
    """Writes a dataset cache atomically (the images in chunks: `dataset.images` may be a map).

    Args:
      path: the `.npz` file to write (its folder is created).
      dataset: what to store.
      config: `settings(...)` of the request that built it.
      skipped: files left out because they did not decode (`skip_bad_files`).
    """
    with CacheWriter(path) as w:
        step = max(1, CacheWriter.CHUNK_BYTES // max(1, dataset.images[0].nbytes if len(dataset) else 1))
        for start in range(0, len(dataset), step):
            w.append(np.asarray(dataset.images[start:start + step]))
        if not len(dataset):
            w.image_shape = tuple(dataset.images.shape[1:])
        w.finish(dataset.labels, dataset.class_names, dataset.files, config, skipped=skipped)


def _mapped_images(path: str) -> np.ndarray:
    """The `images.npy` member of an uncompressed `.npz`, memory-mapped (read-only), after checking its CRC-32
    in chunks (as reading it whole checks it).

    Raises:
      ValueError: the member is compressed, or its bytes do not match its CRC.
    """
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("images.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError("images.npy is compressed: it cannot be memory-mapped (rebuild the cache)")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError("bad zip local header for images.npy")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        crc, left = 0, info.file_size
        while left:
            block = f.read(min(left, CacheWriter.CHUNK_BYTES))
            if not block:
                raise ValueError("images.npy is truncated")
            crc, left = zlib.crc32(block, crc), left - len(block)
        if crc != info.CRC:
            raise ValueError("images.npy does not match its CRC-32 (a damaged file)")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        raise ValueError("images.npy is Fortran-ordered")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def read_any(path: str, *, mmap: bool = False) -> tuple[Dataset, dict[str, Any]]:
    """Reads a cache without comparing it to a request (only its own consistency is checked).

    Args:
      path: the `.npz` file.
      mmap: map the images (read-only, `np.memmap`) instead of reading them into memory.

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
            arrays = {k: z[k] for k in z.files if not (mmap and k == "images")}
        if mmap and "images" in z.files:
            arrays["images"] = _mapped_images(path)
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
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
         files: list[str] | None = None, mmap: bool = False) -> Dataset:
    """Reads a cache and checks it against a request.

    Args:
      path: the `.npz` file.
      config: `settings(...)` of the request.
      class_names: the class names the source gives now, when known.
      files: the image files the source lists now, when known (folder sources); the cache's
        files plus the ones it skipped must be exactly these.
      mmap: map the images instead of reading them (`read_any`).

    Returns:
      The cached `Dataset`.

    Raises:
      CacheMismatch: naming everything that differs.
      DataError: the file is unreadable or inconsistent.
    """
    dataset, meta = read_any(path, mmap=mmap)
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
