"""Data: sources (`folder:PATH`, `tfds:NAME[:SPLIT]`, `demo[:N]`), caches, splits, batching.

    dataset = load("folder:/data/Kather_texture_2016_image_tiles_5000", image_size=64,
                   channels=1, cache="out/kather64.npz")
    train_idx, val_idx = split(dataset.labels, seed=0, val_fraction=0.2)

`python -m fadjax.data --source ...` scans a source and reports what it found (see
`fadjax/data/__main__.py`).

The batching names (`augment`, `batch_indices`, `steps_per_epoch`, `to_float`, from
`fadjax.data.pipeline`) are imported on first use, so that the data tools and
the CLI do not pay for importing JAX.
"""
import importlib

from fadjax.data.cache import CacheMismatch
from fadjax.data.dataset import BadFilesError, DataError, Dataset, Rows
from fadjax.data.loader import load
from fadjax.data.sources import ScanReport, parse_source
from fadjax.data.splits import load_split, save_split, split

__all__ = [
    "BadFilesError", "CacheMismatch", "DataError", "Dataset", "Rows",
    "ScanReport", "augment", "batch_indices", "load", "load_split", "parse_source", "save_split",
    "split", "steps_per_epoch", "to_float",
]

_PIPELINE = ("augment", "batch_indices", "steps_per_epoch", "to_float")


def __getattr__(name):
    if name in _PIPELINE:
        return getattr(importlib.import_module("fadjax.data.pipeline"), name)
    raise AttributeError(f"module 'fadjax.data' has no attribute {name!r}")
