"""A run's dataset and its train/validation split, from its config (training and inference load them alike)."""
from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from fadjax import config_lib
from fadjax import distributed
from fadjax import data as data_lib


def load_dataset(config, workdir: pathlib.Path, *, mmap: bool = False):
    """The run's images (cached in the workdir unless ``data.cache`` says where); with ``mmap`` the cache's
    images memory-mapped (training: only what a step or the device copy reads is read)."""
    d = config.data
    cache = d.cache or str(workdir / "data_cache.npz")
    ds = data_lib.load(d.source, image_size=d.image_size, channels=d.channels,
                       classes=config_lib.parse_names(d.classes), skip_bad_files=d.skip_bad_files,
                       cache=cache, data_dir=d.data_dir, manual_dir=d.manual_dir, mmap=mmap)
    if d.max_per_class is not None:
        keep = np.concatenate([np.flatnonzero(ds.labels == k)[: d.max_per_class] for k in range(len(ds.class_names))])
        keep.sort()
        ds = data_lib.Dataset(images=data_lib.Rows(ds.images, keep) if mmap else ds.images[keep],
                              labels=ds.labels[keep], class_names=ds.class_names,
                              files=[ds.files[i] for i in keep], source=ds.source)
    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    logging.info("data %s: %d images %s, classes %s", d.source, len(ds.labels), ds.images.shape[1:],
                 dict(zip(ds.class_names, counts.tolist())))
    return ds


def load_split(config, workdir: pathlib.Path, ds):
    """The stratified split from ``data.split_seed``; stored as ``split.json`` in the workdir."""
    train_idx, val_idx = data_lib.split(ds.labels, seed=config.data.split_seed, val_fraction=config.data.val_fraction)
    if distributed.is_main_process():
        data_lib.save_split(workdir / "split.json", ds, train_idx, val_idx)
    return np.asarray(train_idx), np.asarray(val_idx)
