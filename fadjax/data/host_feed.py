"""The host input path: a training set too large for the device(s) stays on the host.

``data.placement`` picks the path (:func:`choose_placement`): ``device`` copies the training images
to every device, where each step gathers its batch (the fast path, ``pipeline.draw_examples``);
``host`` leaves them on the host (the cache memory-mapped, ``fadjax.data.Rows`` views of it) and a
:class:`HostFeed` hands each step its gathered batch; ``auto`` takes the host path when the images
exceed ``data.device_share`` of one device's memory.

The feed reads exactly what the device path would gather: the same ``RunKeys`` order
(``pipeline.epoch_order``, computed on the CPU once per epoch) gives each step's global indices, each
process reads only the rows of the global batch its own devices hold, and
``jax.make_array_from_process_local_data`` assembles the global batch. The step then augments it
(``pipeline.draw_examples``) as it does on the device path, so both paths train on the same batches
and a run may resume on the other path.

A background thread prefetches ``data.prefetch`` steps ahead (reading and the host-to-device copy). Not
grain: it is not installable here, and its samplers would not give this run's order (the device
path's ``jax.random.permutation``), which the two paths must share; what is needed is a bounded queue
of batches that are a pure function of the step, so a restart at any step is exact.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Sequence

import jax
import numpy as np
from absl import logging

from fadjax.data import pipeline
from fadjax.data.dataset import take

PLACEMENTS = ("auto", "device", "host")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def device_memory_bytes() -> tuple[int, str]:
    """``(bytes, what)``: one local device's memory limit, or the host's RAM on a CPU backend (no limit reported)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory statistics)
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM (CPU devices)"


def data_bytes(data: dict) -> int:
    """Bytes the device path would place: every array of the training data."""
    return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in data.values()))


def choose_placement(placement: str, nbytes: int, *, share: float) -> tuple[str, str]:
    """``(path, why)``: ``"device"`` or ``"host"`` for ``data.placement`` and ``nbytes`` of training data.

    ``auto`` keeps the data on the device while it takes at most ``share`` of one device's memory. Every
    process takes process 0's choice (they compile the same step).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {PLACEMENTS}")
    if placement != "auto":
        return placement, f"data.placement={placement!r}; training data {_gb(nbytes)}"
    limit, what = device_memory_bytes()
    host = nbytes > share * limit
    from fadjax import distributed
    host = bool(distributed.agreed_step(int(host)))  # Process 0's choice, on every process.
    return ("host" if host else "device"), (
        f"data.placement='auto': training data {_gb(nbytes)} {'>' if host else '<='} data.device_share "
        f"{share:g} of {what} {_gb(limit)}")


def process_rows(par, batch: int) -> tuple[int, int]:
    """``[lo, hi)``: the rows of the global batch this process's devices hold (all of them under pmap)."""
    if par.mode == "pmap":
        return 0, batch
    spans = sorted({(s[0].start or 0, batch if s[0].stop is None else s[0].stop)
                    for s in par.batch_sharded.addressable_devices_indices_map((batch,)).values()})
    if not spans:  # None of this process's devices is in the mesh (num_devices): it reads nothing.
        return 0, 0
    lo, hi = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a != hi:
            raise ValueError(f"this process's rows of the batch are not contiguous: {spans}")
        hi = b
    return lo, hi


class HostFeed:
    """Each step's gathered batch, ``{pipeline.GATHERED: {"images", "labels"}}`` on the devices, prefetched.

    Args:
      keys: the run's ``RunKeys``.
      data: the host arrays the ``sources`` name (``np.ndarray``, ``np.memmap`` or ``Rows``).
      sources: the step's sources, as the device path's draw takes them.
      par: the devices (``fadjax.train.common.Parallel``).
      start: the first step :meth:`get` will ask for.
      stop: one past the last step (the thread reads no further).
      depth: steps prefetched ahead.
    """

    def __init__(self, keys: pipeline.RunKeys, data: dict, sources: Sequence[pipeline.Source], par, *,
                 start: int, stop: int, depth: int = 4):
        self.keys, self.data, self.sources, self.par = keys, data, list(sources), par
        self.batch = sum(s.batch_size for s in self.sources)
        self.lo, self.hi = process_rows(par, self.batch)
        self.image_shape = tuple(data[self.sources[0].images].shape[1:])
        self.stop, self.depth = int(stop), max(1, int(depth))
        try:  # The epoch's order is computed on the CPU (the accelerators stay free for the steps).
            self._cpu = jax.local_devices(backend="cpu")[0]
        except RuntimeError:  # No CPU backend (JAX_PLATFORMS without cpu): the default device.
            self._cpu = None
        self._orders: dict[str, tuple[int, np.ndarray]] = {}
        self._thread = None
        self._start(int(start))

    # -------------------------------------------------------------- what a step reads
    def indices(self, step: int) -> list[np.ndarray]:
        """Each source's global example indices at ``step`` (``pipeline.batch_indices``, on the host)."""
        out = []
        for s in self.sources:
            per = pipeline.steps_per_epoch(s.num_examples, s.batch_size)
            epoch, position = divmod(int(step), per)
            cached = self._orders.get(s.name)
            if cached is None or cached[0] != epoch:
                key = self.keys.order(s.name)
                if self._cpu is None:
                    order = pipeline.epoch_order(key, epoch, s.num_examples)
                else:
                    with jax.default_device(self._cpu):
                        order = pipeline.epoch_order(jax.device_put(key, self._cpu), epoch, s.num_examples)
                cached = (epoch, np.asarray(order))
                self._orders[s.name] = cached
            out.append(cached[1][position * s.batch_size:(position + 1) * s.batch_size].astype(np.int32))
        return out

    def local_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows ``[lo, hi)`` of the step's global batch: ``(uint8 images, int32 labels)``."""
        images, labels, offset = [], [], 0
        for s, idx in zip(self.sources, self.indices(step)):
            a, b = max(self.lo, offset), min(self.hi, offset + s.batch_size)
            if a < b:
                mine = idx[a - offset:b - offset]
                images.append(take(self.data[s.images], mine))
                labels.append(np.asarray(self.data[s.labels])[mine].astype(np.int32))
            offset += s.batch_size
        if not images:
            return np.zeros((0, *self.image_shape), np.uint8), np.zeros((0,), np.int32)
        return np.concatenate(images), np.concatenate(labels)

    def _on_devices(self, images: np.ndarray, labels: np.ndarray) -> dict:
        if self.par.mode == "pmap":  # One process: every device gets the global batch and takes its share.
            tree = self.par.put_replicated({"images": images, "labels": labels})
        else:
            sharding = self.par.batch_sharded
            tree = {"images": jax.make_array_from_process_local_data(sharding, images, (self.batch, *self.image_shape)),
                    "labels": jax.make_array_from_process_local_data(sharding, labels, (self.batch,))}
        return {pipeline.GATHERED: tree}

    def spec(self) -> dict:
        """What :meth:`get`'s batches look like, to compile the step ahead of them: their shapes, dtypes and
        shardings (under pmap a batch itself, placed as every batch is)."""
        if self.par.mode == "pmap":
            return self._on_devices(*self.local_batch(self._next))
        sharding = self.par.batch_sharded
        return {pipeline.GATHERED: {
            "images": jax.ShapeDtypeStruct((self.batch, *self.image_shape), np.uint8, sharding=sharding),
            "labels": jax.ShapeDtypeStruct((self.batch,), np.int32, sharding=sharding)}}

    # -------------------------------------------------------------- the prefetching thread
    def _start(self, step: int) -> None:
        self._next = step
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(step, self._queue, self._halt),
                                        name="fadjax-host-feed", daemon=True)
        self._thread.start()

    @staticmethod
    def _put(out: queue.Queue, halt: threading.Event, item) -> None:
        while not halt.is_set():
            try:
                return out.put(item, timeout=0.1)
            except queue.Full:
                continue

    def _work(self, step: int, out: queue.Queue, halt: threading.Event) -> None:
        try:
            while step < self.stop and not halt.is_set():
                self._put(out, halt, (step, self._on_devices(*self.local_batch(step))))
                step += 1
        except BaseException as e:  # noqa: BLE001  (handed to the training loop, which raises it)
            self._put(out, halt, (step, e))

    def get(self, step: int) -> dict:
        """The batch of ``step`` on the devices (a step other than the next one restarts the reading there)."""
        if not 0 <= step < self.stop:
            raise ValueError(f"step {step} is outside the feed's steps [0, {self.stop})")
        if step != self._next or self._thread is None:
            logging.info("host feed: (re)starting at step %d (next was %d)", step, self._next)
            self.close()
            self._start(step)
        got, item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        assert got == step, (got, step)
        self._next = step + 1
        return item

    def close(self) -> None:
        """Stops the thread (batches read ahead are dropped)."""
        if self._thread is None:
            return
        self._halt.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
