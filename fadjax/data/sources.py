"""Data sources: class folders (`folder:PATH`), TFDS datasets (`tfds:NAME[:SPLIT]`) and `demo[:N]`.

`read(source, ...)` turns any of them into a `Dataset` plus a `ScanReport` of what it found.

Class folders: one sub-folder per class, taken in sorted order (class index = position); the
class name is the folder name with a leading `NN_` removed, lower-cased (`01_TUMOR` -> `tumor`).
Files are read by extension (`images.IMAGE_EXTENSIONS`, any case); other files and hidden
files (`.DS_Store`, `._x.png`) are ignored and listed in the report. Files with an image
extension that do not decode are collected, and the read stops with one `BadFilesError` listing
them all, unless `skip_bad_files` is set (then they are skipped, and listed in a warning and the
report).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.util
import os
import re
from typing import Callable, Iterable

from absl import logging
import numpy as np
from PIL import Image
import tqdm

from fadjax.data import demo
from fadjax.data import images as images_lib
from fadjax.data.dataset import BadFilesError, DataError, Dataset

_TFDS_INSTALL = "pip install 'fadjax[tfds]'"
_DECODE_THREADS = 8
DECODE_CHUNK = 1024  # Files decoded at a time (a cache streams each chunk to disk: see `read`'s sink).


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source string.

    Attributes:
      kind: 'folder', 'tfds' or 'demo'.
      path: folder path (folder sources).
      name: TFDS dataset name (tfds sources).
      split: TFDS split (tfds sources; 'train' by default).
      per_class: images per class (demo).
    """

    kind: str
    path: str | None = None
    name: str | None = None
    split: str | None = None
    per_class: int | None = None


def parse_source(source: str) -> SourceSpec:
    """Parses `folder:PATH`, `tfds:NAME[:SPLIT]`, `demo` or `demo:N`.

    Raises:
      DataError: the string is none of these.
    """
    kind, _, rest = source.partition(":")
    if kind == "folder" and rest:
        return SourceSpec("folder", path=rest)
    if kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return SourceSpec("tfds", name=name, split=split or "train")
    if kind == "demo":
        if not rest:
            return SourceSpec("demo", per_class=demo.DEFAULT_PER_CLASS)
        if rest.isdigit() and int(rest) > 0:
            return SourceSpec("demo", per_class=int(rest))
    raise DataError(f"unknown data source {source!r}: expected 'folder:PATH', 'tfds:NAME[:SPLIT]', "
                    "'demo' or 'demo:N' (N images per class)")


def class_name_from_folder(folder: str) -> str:
    """`01_TUMOR` -> `tumor`: strips a leading `NN_` and lower-cases."""
    return re.sub(r"^\d+_", "", folder).lower()


@dataclasses.dataclass
class ScanReport:
    """What a source turned out to contain.

    Attributes:
      source: the source string.
      classes: `(index, folder, name)` per kept class, in label order (`folder` is the class
        folder for folder sources, the dataset's own label index or name otherwise).
      counts: good images per kept class, in label order.
      sizes: how many images had each original `(width, height)`.
      modes: how many images had each original PIL mode.
      ignored: files skipped because they are not images (by name).
      bad: `(path, reason)` for each file that claims to be an image but does not decode.
      skipped_bad: whether the bad files were skipped (`skip_bad_files`) rather than fatal.
    """

    source: str
    classes: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    modes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ignored: list[str] = dataclasses.field(default_factory=list)
    bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped_bad: bool = False

    def format(self) -> str:
        """A human-readable summary (what `python -m fadjax.data` prints)."""
        lines = [f"source: {self.source}", f"classes: {len(self.classes)}"]
        for (index, folder, name), count in zip(self.classes, self.counts):
            lines.append(f"  {index:3d}  {folder:<24s} {name:<16s} {count:6d} images")
        lines.append(f"images: {sum(self.counts)}")
        sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.sizes.items()))
        lines.append(f"sizes seen: {sizes or '-'}")
        modes = ", ".join(f"{m}: {n}" for m, n in sorted(self.modes.items()))
        lines.append(f"modes seen: {modes or '-'}")
        if self.ignored:
            lines.append(f"ignored (not image files): {len(self.ignored)}")
            lines.extend(f"  {path}" for path in self.ignored)
        if self.bad:
            verb = "skipped" if self.skipped_bad else "PROBLEM"
            lines.append(f"undecodable image files ({verb}): {len(self.bad)}")
            lines.extend(f"  {path}: {reason}" for path, reason in self.bad)
        else:
            lines.append("problems: none")
        return "\n".join(lines)


def _select_classes(names: list[str], classes: Iterable[str] | None, where: str) -> list[int]:
    """Resolves a class restriction to indices into `names`, in the requested order."""
    if classes is None:
        return list(range(len(names)))
    wanted = [c.strip().lower() for c in classes]
    if len(set(wanted)) != len(wanted):
        raise DataError(f"classes {list(classes)} name a class more than once")
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise DataError(f"unknown class(es) {unknown} in {where}; available: {names}")
    return [names.index(c) for c in wanted]


def _require_two(names: list[str], where: str):
    if len(names) < 2:
        raise DataError(f"{where} has {len(names)} class(es) {names}; at least two are needed")


def _decode_all(paths: list[str], convert: Callable[[Image.Image], np.ndarray]
                ) -> list[tuple[np.ndarray | None, tuple | None, str]]:
    """Decodes files in a thread pool (PIL releases the GIL while decoding).

    Returns, per path and in order, `(array, (width, height, mode), "")` or
    `(None, None, reason)` when the file does not decode.
    """

    def one(path):
        try:
            img = images_lib.open_image(path)
            return convert(img), (img.size[0], img.size[1], img.mode), ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, None, f"{type(e).__name__}: {e}"

    workers = max(1, min(_DECODE_THREADS, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, paths))


def list_class_folders(root: str) -> tuple[list[str], list[str]]:
    """Lists the class folders of a folder source.

    Args:
      root: the folder holding one sub-folder per class.

    Returns:
      `(folders, ignored)`: class folder names in sorted order, and paths of other entries
      of `root` that were ignored.

    Raises:
      DataError: `root` is not a folder.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist or is not a folder")
    folders, ignored = [], []
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if os.path.isdir(full) and not entry.startswith("."):
            folders.append(entry)
        else:
            ignored.append(full)
    return folders, ignored


def list_image_files(folder: str) -> tuple[list[str], list[str]]:
    """Splits a class folder's entries into image files (sorted) and ignored paths."""
    files, ignored = [], []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        is_image = (not entry.startswith(".") and os.path.isfile(full)
                    and os.path.splitext(entry)[1].lower() in images_lib.IMAGE_EXTENSIONS)
        (files if is_image else ignored).append(full)
    return files, ignored


def folder_class_names(root: str) -> list[str]:
    """Class names of a folder source, in index order (cheap: lists folders only)."""
    return [class_name_from_folder(f) for f in list_class_folders(root)[0]]


def _read_folder(source: str, root: str, *, image_size: int, channels: int,
                 classes: Iterable[str] | None, skip_bad_files: bool,
                 progress: bool, on_scan: Callable[[ScanReport], None] | None,
                 sink: Callable[[np.ndarray], None] | None = None):
    """The folder's images, decoded `DECODE_CHUNK` files at a time: a `Dataset`, or with `sink` (which gets
    each chunk's decoded images, uint8 `[n, H, W, C]`, in order) `(labels, class_names, files)`, holding
    one chunk of images at a time."""
    report = ScanReport(source=source, skipped_bad=skip_bad_files)
    folders, report.ignored = list_class_folders(root)
    names = [class_name_from_folder(f) for f in folders]
    _require_two(names, f"data folder {root!r}")
    if len(set(names)) != len(names):
        raise DataError(f"class folders {folders} in {root!r} give duplicate class names {names}")
    keep = _select_classes(names, classes, f"data folder {root!r}")
    _require_two([names[i] for i in keep], "the class selection")

    paths, path_labels = [], []
    for label, index in enumerate(keep):
        folder = os.path.join(root, folders[index])
        files, ignored = list_image_files(folder)
        report.ignored.extend(ignored)
        if not files:
            raise DataError(f"class folder {folder!r} (class {names[index]!r}) contains no image "
                            f"files (looked for {', '.join(images_lib.IMAGE_EXTENSIONS)})")
        report.classes.append((label, folders[index], names[index]))
        paths.extend(files)
        path_labels.extend([label] * len(files))
    if report.ignored:
        logging.info("Ignored %d non-image entries in %s", len(report.ignored), root)

    convert = lambda img: images_lib.to_array(img, image_size=image_size, channels=channels)
    arrays, labels, files = [], [], []
    bar = tqdm.tqdm(total=len(paths), desc=f"decoding {root}", unit="img", disable=None if progress else True,
                    leave=False)
    for start in range(0, len(paths), DECODE_CHUNK):
        chunk = []
        for path, label, (array, info, reason) in zip(
                paths[start:start + DECODE_CHUNK], path_labels[start:start + DECODE_CHUNK],
                _decode_all(paths[start:start + DECODE_CHUNK], convert)):
            if array is None:
                report.bad.append((path, reason))
                continue
            report.sizes[info[:2]] += 1
            report.modes[info[2]] += 1
            chunk.append(array)
            labels.append(label)
            files.append(os.path.relpath(path, root))
        bar.update(min(DECODE_CHUNK, len(paths) - start))
        if chunk and sink is not None:
            sink(np.stack(chunk))
        elif chunk:
            arrays.extend(chunk)
    bar.close()
    report.counts = np.bincount(np.asarray(labels, np.int64), minlength=len(keep)).tolist()
    if on_scan is not None:
        on_scan(report)
    if report.bad:
        if not skip_bad_files:
            raise BadFilesError(report.bad)
        logging.warning("Skipped %d undecodable image file(s):\n%s", len(report.bad),
                        "\n".join(f"  {p}: {r}" for p, r in report.bad))
    empty = [name for (_, _, name), n in zip(report.classes, report.counts) if n == 0]
    if empty:
        raise DataError(f"class(es) {empty} in {root!r} have no decodable images")
    class_names = [name for _, _, name in report.classes]
    if sink is not None:
        return np.asarray(labels, np.int32), class_names, files
    return Dataset(np.stack(arrays), np.asarray(labels, np.int32), class_names, files, source)


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # Imported lazily: only TFDS sources need it.

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"unknown TFDS dataset {name!r}: {str(e).splitlines()[0]}") from e


def _tfds_label_keys(builder) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    return "image", "label"


def tfds_class_names(name: str, data_dir: str | None = None) -> list[str]:
    """Class names (the label `ClassLabel`'s names) of a TFDS dataset, from its metadata."""
    builder = _tfds_builder(name, data_dir)
    _, label_key = _tfds_label_keys(builder)
    return list(builder.info.features[label_key].names)


def _tfds_examples(builder, split: str, manual_dir: str | None):
    """Yields the examples of a TFDS split as numpy dicts, preparing the dataset if needed.

    Prepared datasets in array_record format are read through `as_data_source`, which needs no
    TensorFlow; preparing a dataset, or reading a tfrecord-only one, needs TensorFlow.
    """
    import tensorflow_datasets as tfds

    name = builder.name
    if not builder.is_prepared():
        if not tensorflow_available():
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}, and preparing it "
                f"needs TensorFlow, which is not installed. Install it with: {_TFDS_INSTALL} "
                "(or pass data_dir= pointing at an already prepared copy).")
        logging.info("Preparing TFDS dataset %s in %s", name, builder.data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            file_format="array_record")
    try:
        data = builder.as_data_source(split=split)
    except NotImplementedError:  # Prepared as tfrecord only: tf.data reads it.
        if not tensorflow_available():
            raise DataError(
                f"TFDS dataset {name!r} in {builder.data_dir} is stored as tfrecord, which needs "
                f"TensorFlow to read: {_TFDS_INSTALL}") from None
        yield from tfds.as_numpy(builder.as_dataset(split=split))
        return
    for i in range(len(data)):
        yield data[i]


def _read_tfds(source: str, name: str, split: str, *, image_size: int, channels: int,
               classes: Iterable[str] | None, data_dir: str | None, manual_dir: str | None,
               progress: bool, on_scan: Callable[[ScanReport], None] | None) -> Dataset:
    builder = _tfds_builder(name, data_dir)
    image_key, label_key = _tfds_label_keys(builder)
    label_feature = builder.info.features[label_key]
    if not hasattr(label_feature, "names"):
        raise DataError(f"TFDS dataset {name!r}: feature {label_key!r} is not a ClassLabel")
    names = list(label_feature.names)
    _require_two(names, f"TFDS dataset {name!r}")
    keep = _select_classes(names, classes, f"TFDS dataset {name!r}")
    _require_two([names[i] for i in keep], "the class selection")
    relabel = {index: label for label, index in enumerate(keep)}

    report = ScanReport(source=source, classes=[(label, str(index), names[index])
                                                for label, index in enumerate(keep)])
    arrays, labels, ids = [], [], []
    examples = _tfds_examples(builder, split, manual_dir)
    for i, example in enumerate(tqdm.tqdm(examples, desc=f"reading {source}", unit="img",
                                          disable=not progress, leave=False)):
        original = int(example[label_key])
        if original not in relabel:
            continue
        img = images_lib.from_array(example[image_key])
        report.sizes[img.size] += 1
        report.modes[img.mode] += 1
        arrays.append(images_lib.to_array(img, image_size=image_size, channels=channels))
        labels.append(relabel[original])
        filename = example.get("filename") if isinstance(example, dict) else None
        if isinstance(filename, bytes):
            filename = filename.decode("utf-8", "replace")
        ids.append(f"tfds:{name}/{split}/{i}" + (f"/{filename}" if filename else ""))
    report.counts = np.bincount(np.asarray(labels, np.int64), minlength=len(keep)).tolist()
    if on_scan is not None:
        on_scan(report)
    empty = [names[index] for index, n in zip(keep, report.counts) if n == 0]
    if empty:
        raise DataError(f"TFDS dataset {name!r} split {split!r} has no examples of class(es) {empty}")
    return Dataset(np.stack(arrays), np.asarray(labels, np.int32), [names[i] for i in keep], ids,
                   source)


def _read_demo(source: str, per_class: int, *, image_size: int, channels: int,
               classes: Iterable[str] | None,
               on_scan: Callable[[ScanReport], None] | None) -> Dataset:
    names = list(demo.CLASS_NAMES)
    keep = _select_classes(names, classes, "the demo source")
    _require_two([names[i] for i in keep], "the class selection")
    images, labels, ids = demo.generate(per_class=per_class, image_size=image_size,
                                        channels=channels, class_indices=keep)
    report = ScanReport(
        source=source,
        classes=[(label, f"(demo {index})", names[index]) for label, index in enumerate(keep)],
        counts=[per_class] * len(keep),
        sizes=collections.Counter({(image_size, image_size): len(ids)}),
        modes=collections.Counter({"L" if channels == 1 else "RGB": len(ids)}))
    if on_scan is not None:
        on_scan(report)
    return Dataset(images, labels, [names[i] for i in keep], ids, source)


def available(source: str, *, data_dir: str | None = None) -> bool:
    """Whether `read` could (re)build from this source here, judged cheaply."""
    spec = parse_source(source)
    if spec.kind == "folder":
        return os.path.isdir(spec.path)
    if spec.kind == "tfds":
        return tensorflow_available() or _tfds_builder(spec.name, data_dir).is_prepared()
    return True


def image_files(source: str, *, classes: Iterable[str] | None = None) -> list[str] | None:
    """The image files a folder source lists now, relative to its folder, as `Dataset.files`.

    Lists without decoding; None for other sources and missing folders.
    """
    spec = parse_source(source)
    if spec.kind != "folder" or not os.path.isdir(spec.path):
        return None
    folders = list_class_folders(spec.path)[0]
    names = [class_name_from_folder(f) for f in folders]
    keep = _select_classes(names, classes, f"data folder {spec.path!r}")
    return [os.path.relpath(path, spec.path)
            for i in keep for path in list_image_files(os.path.join(spec.path, folders[i]))[0]]


def class_names(source: str, *, classes: Iterable[str] | None = None,
                data_dir: str | None = None) -> list[str] | None:
    """The class names a source would give, without decoding images.

    Returns None when the source is not available here (a missing folder).
    """
    spec = parse_source(source)
    if spec.kind == "folder":
        if not os.path.isdir(spec.path):
            return None
        names = folder_class_names(spec.path)
        where = f"data folder {spec.path!r}"
    elif spec.kind == "tfds":
        names, where = tfds_class_names(spec.name, data_dir), f"TFDS dataset {spec.name!r}"
    else:
        names, where = list(demo.CLASS_NAMES), "the demo source"
    return [names[i] for i in _select_classes(names, classes, where)]


def read(source: str, *, image_size: int, channels: int, classes: Iterable[str] | None = None,
         skip_bad_files: bool = False, data_dir: str | None = None,
         manual_dir: str | None = None, progress: bool = True,
         on_scan: Callable[[ScanReport], None] | None = None,
         sink: Callable[[np.ndarray], None] | None = None):
    """Reads a source into memory (no caching; see `fadjax.data.load`), or streams its images to `sink`.

    Args:
      source: `folder:PATH`, `tfds:NAME[:SPLIT]`, `demo` or `demo:N`.
      image_size: side of the square output images.
      channels: 1 (luma) or 3 (RGB).
      classes: class names to keep, in the order wanted (labels 0..k-1 follow it); all when None.
      skip_bad_files: skip undecodable image files (with a warning) instead of failing.
      data_dir: TFDS data directory.
      manual_dir: TFDS manual download directory (e.g. holding the Kather zip).
      progress: show a progress bar while decoding.
      on_scan: called with the `ScanReport` once the source has been scanned, before any
        error about bad files is raised.
      sink: given, it receives the images in order, in chunks (uint8 `[n, H, W, C]`); a folder
        source then holds one chunk of images in memory at a time.

    Returns:
      The `Dataset`; with `sink`, `(labels, class_names, files)` of the images it received.

    Raises:
      DataError: the source is unusable (`BadFilesError` for undecodable files).
    """
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    spec = parse_source(source)
    if spec.kind == "folder":
        return _read_folder(source, spec.path, image_size=image_size, channels=channels,
                            classes=classes, skip_bad_files=skip_bad_files, progress=progress,
                            on_scan=on_scan, sink=sink)
    if sink is not None:  # TFDS and the demo are read whole, then handed over.
        ds = read(source, image_size=image_size, channels=channels, classes=classes, skip_bad_files=skip_bad_files,
                  data_dir=data_dir, manual_dir=manual_dir, progress=progress, on_scan=on_scan)
        sink(ds.images)
        return ds.labels, ds.class_names, ds.files
    if spec.kind == "tfds":
        return _read_tfds(source, spec.name, spec.split, image_size=image_size, channels=channels,
                          classes=classes, data_dir=data_dir, manual_dir=manual_dir,
                          progress=progress, on_scan=on_scan)
    return _read_demo(source, spec.per_class, image_size=image_size, channels=channels,
                      classes=classes, on_scan=on_scan)
