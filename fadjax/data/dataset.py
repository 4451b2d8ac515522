"""The in-memory dataset every source produces, and the errors the data package raises."""
from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """A data source or cache cannot be used as asked; the message says why."""


class BadFilesError(DataError):
    """Files that claim to be images could not be decoded.

    Attributes:
      files: the paths of every such file, in scan order.
    """

    def __init__(self, bad: list[tuple[str, str]]):
        self.files = [path for path, _ in bad]
        lines = [f"  {path}: {reason}" for path, reason in bad]
        super().__init__(
            f"{len(bad)} file(s) could not be decoded as images (fix or remove them, or pass "
            "skip_bad_files=True / --skip_bad_files to skip them):\n" + "\n".join(lines))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held in host memory.

    Attributes:
      images: uint8 `[N, H, W, C]`.
      labels: int32 `[N]`, in `0 .. len(class_names) - 1`.
      class_names: name of each label.
      files: where each example came from (for folder sources the path relative to the folder,
        e.g. `01_TUMOR/x.png`; an id otherwise).
      source: the source string it was loaded from (`folder:...`, `tfds:...`, `demo...`).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str]
    source: str

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int32 [{images.shape[0]}], got {labels.dtype} {labels.shape}")
        if len(self.files) != images.shape[0]:
            raise ValueError(f"{len(self.files)} file names for {images.shape[0]} images")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"labels outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> list[int]:
        """Number of examples of each class, in label order."""
        return np.bincount(self.labels, minlength=self.num_classes).tolist()


def take(array, index) -> np.ndarray:
    """``array[index]`` read in ascending order of the rows (a memory map then reads forwards), in memory."""
    index = np.asarray(index, np.int64)
    order = np.argsort(index, kind="stable")
    out = np.empty((len(index), *array.shape[1:]), array.dtype)
    out[order] = array[index[order]]
    return out


class Rows:
    """The rows ``base[index]`` of an array (e.g. a memory-mapped cache), read only when asked for.

    ``rows[i]`` / ``rows[a:b]`` / ``rows[idx]`` read those rows; ``np.asarray(rows)`` reads them all. The
    training split of a set on the host path stays such a view: only each step's batch is read.
    """

    def __init__(self, base, index):
        self.base, self.index = base, np.asarray(index, np.int64)
        self.shape = (len(self.index), *base.shape[1:])
        self.dtype, self.ndim = base.dtype, base.ndim

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        index = self.index[key]
        if np.ndim(index) == 0:
            return np.asarray(self.base[int(index)])
        return take(self.base, index)

    def __array__(self, dtype=None, copy=None):
        out = take(self.base, self.index)
        return out if dtype is None else out.astype(dtype)
