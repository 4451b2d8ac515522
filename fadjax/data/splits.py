"""Deterministic, stratified train/validation splits, saved as JSON with file names."""
from __future__ import annotations

import json

import numpy as np

from fadjax.workdir import write_json
from fadjax.data.dataset import DataError, Dataset

_FORMAT = "fadjax-split"
_VERSION = 1


def split(labels, *, seed: int, val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into train and validation sets, per class.

    For each class in ascending label order, one `np.random.default_rng(seed)` draws a
    permutation of that class's indices; the first `floor(val_fraction * n + 0.5)` go to
    validation, the rest to training. numpy's PCG64 stream is fixed, so the split is the same
    on every machine. 0.2 is the paper's 80/20 split.

    Args:
      labels: int `[N]`.
      seed: the split's seed.
      val_fraction: fraction of each class held out, in [0, 1).

    Returns:
      `(train_idx, val_idx)`: sorted int64 arrays, disjoint, together `0 .. N-1`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {labels.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(members.size)]
        n_val = int(np.floor(val_fraction * members.size + 0.5))
        val.append(members[:n_val])
        train.append(members[n_val:])
    empty = np.zeros(0, np.int64)
    return (np.sort(np.concatenate(train + [empty])).astype(np.int64),
            np.sort(np.concatenate(val + [empty])).astype(np.int64))


def save_split(path: str, dataset: Dataset, train_idx, val_idx, **extra):
    """Saves a split as JSON (indices and file names), atomically.

    Args:
      path: the JSON file.
      dataset: the dataset the indices refer to.
      train_idx: training indices.
      val_idx: validation indices.
      **extra: further JSON-serialisable fields to record (e.g. `seed`, `val_fraction`).
    """
    record = dict(format=_FORMAT, version=_VERSION, source=dataset.source,
                  class_names=list(dataset.class_names), num_examples=len(dataset), **extra)
    for name, idx in (("train", train_idx), ("val", val_idx)):
        idx = np.asarray(idx, np.int64)
        record[name] = dict(indices=idx.tolist(), files=[dataset.files[i] for i in idx])
    write_json(path, record)


def load_split(path: str, dataset: Dataset | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads a split saved by `save_split`.

    Args:
      path: the JSON file.
      dataset: when given, the split is checked against it: same number of examples and the
        same file name at every index.

    Returns:
      `(train_idx, val_idx)` int64 arrays.

    Raises:
      DataError: the file is not a split, or does not fit `dataset`.
    """
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != _FORMAT or record.get("version") != _VERSION:
        raise DataError(f"{path} is not a {_FORMAT} version {_VERSION} file")
    result = []
    for name in ("train", "val"):
        idx = np.asarray(record[name]["indices"], np.int64)
        if dataset is not None:
            if record["num_examples"] != len(dataset):
                raise DataError(f"split {path} is for {record['num_examples']} examples, the dataset "
                                f"({dataset.source}) has {len(dataset)}")
            wrong = [(int(i), f) for i, f in zip(idx, record[name]["files"]) if dataset.files[i] != f]
            if wrong:
                raise DataError(f"split {path} does not fit the dataset ({dataset.source}): "
                                f"{len(wrong)} {name} indices name other files, e.g. {wrong[:3]}")
        result.append(idx)
    return result[0], result[1]
