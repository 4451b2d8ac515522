"""Batching for the trainer: global batch indices, flips, a device-resident and a streaming path.

Batch composition is a pure function of `(key, step)`: `batch_indices` permutes the examples
once per epoch (`fold_in(key, epoch)`) and slices out the step's batch, dropping the remainder.
Indices are global, so the batches are the same whatever the device or process count:

- `DeviceData` keeps the uint8 arrays on device (replicated) and gathers each batch inside the
  compiled train step (`get_batch`), for datasets that fit in device memory (Kather at 64x64
  is 19 MB).
- `HostBatches` streams numpy batches from host memory; each process gets its contiguous
  shard of the same global batch.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from fadjax.data.dataset import Dataset

# Folded into the data key to derive the augmentation stream, so that flips never reuse a
# permutation key (those are fold_in(key, epoch) with epoch far below this).
_AUGMENT_STREAM = 0x61756721


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped).

    Raises:
      ValueError: `batch_size` is not positive or exceeds `num_examples`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples available")
    return num_examples // batch_size


def batch_indices(key: jax.Array, step, *, num_examples: int, batch_size: int) -> jax.Array:
    """The global batch of a step, as example indices; jittable (`step` may be traced).

    epoch = step // steps_per_epoch; the epoch's order is
    `jax.random.permutation(fold_in(key, epoch), num_examples)`, and the step takes its
    `batch_size` consecutive entries. Every epoch visits each example at most once.

    Args:
      key: the data-order key (the same at every step).
      step: the global step (int or traced int32 scalar).
      num_examples: examples to draw from (static).
      batch_size: global batch size (static).

    Returns:
      int32 `[batch_size]`.
    """
    per_epoch = steps_per_epoch(num_examples, batch_size)
    step = jnp.asarray(step, jnp.int32)
    epoch, position = step // per_epoch, step % per_epoch
    order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)  # [N]
    return jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,)).astype(jnp.int32)


def augment(key: jax.Array, x: jax.Array, *, hflip: bool = True, vflip: bool = True) -> jax.Array:
    """Random per-example horizontal and vertical flips; jittable.

    The per-example bits are drawn with the global shape `[B]`, so the result does not depend
    on how `x` is sharded. Each flip has its own sub-key, so turning one off leaves the other's
    draws unchanged.

    Args:
      key: PRNG key.
      x: float `[B, H, W, C]`.
      hflip: flip left-right with probability 1/2.
      vflip: flip top-bottom with probability 1/2.

    Returns:
      `x` with the flips applied, same shape and dtype.
    """
    key_h, key_v = jax.random.split(key)
    batch = x.shape[0]
    if hflip:
        flip = jax.random.bernoulli(key_h, 0.5, (batch,))  # [B]
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    if vflip:
        flip = jax.random.bernoulli(key_v, 0.5, (batch,))  # [B]
        x = jnp.where(flip[:, None, None, None], x[:, ::-1, :, :], x)
    return x


# `DeviceData.get_batch`'s `augment` argument shadows the function's name there.
_flips = augment


def to_float(images) -> jax.Array:
    """uint8 images -> float32 in [0, 1] (the model boundary)."""
    return jnp.asarray(images, jnp.float32) / 255.0


@jax.tree_util.register_pytree_node_class
class DeviceData:
    """A dataset's uint8 images and labels held on device, batched inside compiled code.

    A pytree: pass it as an argument of the jitted train step (not a closure constant) and call
    `get_batch` there.

    Attributes:
      images: uint8 `[N, H, W, C]` on device.
      labels: int32 `[N]` on device.
    """

    def __init__(self, images, labels, sharding: jax.sharding.Sharding | None = None):
        """Puts the arrays on device.

        Args:
          images: uint8 `[N, H, W, C]` (numpy or jax).
          labels: int `[N]`.
          sharding: where to put them, e.g. `NamedSharding(mesh, P())` to replicate over a
            mesh; the default device when None.
        """
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [{images.shape[0]}], got {labels.shape}")
        self.images = jax.device_put(images, sharding)
        self.labels = jax.device_put(labels.astype(np.int32), sharding)

    def tree_flatten(self):
        return (self.images, self.labels), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        data = object.__new__(cls)
        data.images, data.labels = children
        return data

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, key: jax.Array, step, batch_size: int, *, augment: bool = False,
                  hflip: bool = True, vflip: bool = True) -> tuple[jax.Array, jax.Array]:
        """The step's batch; jittable.

        Args:
          key: the data key (the same at every step): the batch is
            `batch_indices(key, step, ...)`, and flips use
            `fold_in(fold_in(key, _AUGMENT_STREAM), step)`.
          step: the global step (may be traced).
          batch_size: global batch size (static).
          augment: apply random flips.
          hflip: with `augment`, flip left-right.
          vflip: with `augment`, flip top-bottom.

        Returns:
          `(x float32 [B, H, W, C] in [0, 1], y int32 [B])`.
        """
        idx = batch_indices(key, step, num_examples=len(self), batch_size=batch_size)  # [B]
        x = to_float(jnp.take(self.images, idx, axis=0))  # [B, H, W, C]
        y = jnp.take(self.labels, idx, axis=0)  # [B]
        if augment:
            aug_key = jax.random.fold_in(jax.random.fold_in(key, _AUGMENT_STREAM), step)
            x = _flips(aug_key, x, hflip=hflip, vflip=vflip)
        return x, y


_batch_indices_jit = jax.jit(batch_indices, static_argnames=("num_examples", "batch_size"))


class HostBatches:
    """Streams a process's shard of each global batch from host memory.

    Step `s` takes the global batch `indices[batch_indices(key, s, num_examples=len(indices),
    batch_size=batch_size)]` (the same composition as `DeviceData.get_batch` on
    `images[indices]`), and process `p` of `P` receives its contiguous slice
    `[p * B/P, (p + 1) * B/P)`, so no two processes see the same example in a step.

    Iterating yields `(x uint8 [B/P, H, W, C], y int32 [B/P])` numpy arrays for steps
    `start_step, start_step + 1, ...` without end; `step` is the next step to be yielded.
    """

    def __init__(self, data: Dataset | tuple[np.ndarray, np.ndarray], indices=None, *,
                 batch_size: int, key: jax.Array | None = None, seed: int | None = None,
                 process_index: int = 0, process_count: int = 1, start_step: int = 0):
        """Sets up the stream.

        Args:
          data: a `Dataset`, or `(images uint8 [N, H, W, C], labels [N])`.
          indices: the examples to draw from (e.g. the training split); all when None.
          batch_size: the global batch size.
          key: the data-order key; give exactly one of `key` and `seed`.
          seed: makes the key as `jax.random.key(seed)`.
          process_index: this process (`jax.process_index()`).
          process_count: number of processes (`jax.process_count()`).
          start_step: first step to yield (resuming).
        """
        images, labels = (data.images, data.labels) if isinstance(data, Dataset) else data
        self.images, self.labels = np.asarray(images), np.asarray(labels, np.int32)
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels {self.labels.shape} do not match images {self.images.shape}")
        self.indices = (np.arange(len(self.labels)) if indices is None
                        else np.asarray(indices, np.int64))
        if (key is None) == (seed is None):
            raise ValueError("give exactly one of key and seed")
        self.key = jax.random.key(seed) if key is None else key
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
        steps_per_epoch(len(self.indices), batch_size)  # Validates batch_size.
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.process_index = process_index
        self.step = start_step

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset indices of the whole global batch of `step`, int64 `[batch_size]`."""
        positions = _batch_indices_jit(self.key, np.int32(step), num_examples=len(self.indices),
                                       batch_size=self.batch_size)
        return self.indices[np.asarray(positions)]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        start = self.process_index * self.local_batch_size
        local = self.global_indices(self.step)[start:start + self.local_batch_size]
        self.step += 1
        return self.images[local], self.labels[local]
