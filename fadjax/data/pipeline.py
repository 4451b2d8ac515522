"""Every batch fadjax makes: the training steps' draws and the fixed-size batches of inference.

Training (inside the compiled step): the uint8 images stay on the device(s) (Kather at 64x64 is
19 MB) and each step gathers its batch there; a set too large for the device stays on the host
instead (``data.placement``, :mod:`fadjax.data.host_feed`), which gathers the same examples and
hands them to the step, where the same augmentation runs. Batch composition is a pure function of the run's
seed and the step (:class:`RunKeys`): `batch_indices` permutes a source's examples once per epoch
(`fold_in(key, epoch)`) and slices out the step's batch, dropping the remainder; indices are
global, so the batches are the same whatever the device or process count; `draw_examples`
concatenates the step's examples of one or more :class:`Source`s (DreamBooth: instance and prior
images) and flips them.

Inference (judging, features, sampling): `fixed_batches` / `batched` cut inputs into batches of
one size (the last padded), so one compiled program serves every batch.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def epoch_order(key: jax.Array, epoch, num_examples: int) -> jax.Array:
    """The order of an epoch's examples: ``jax.random.permutation(fold_in(key, epoch), num_examples)``."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def batch_indices(key: jax.Array, step, *, num_examples: int, batch_size: int) -> jax.Array:
    """The global batch of a step, as example indices; jittable (`step` may be traced).

    epoch = step // steps_per_epoch; the epoch's order is :func:`epoch_order` (`jax.random.permutation(
    fold_in(key, epoch), num_examples)`), and the step takes its `batch_size` consecutive entries. Every
    epoch visits each example at most once.

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
    order = epoch_order(key, epoch, num_examples)  # [N]
    return jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,)).astype(jnp.int32)


def augment(key: jax.Array, x: jax.Array, *, hflip: bool = True, vflip: bool = True,
            transpose: bool = False) -> jax.Array:
    """Random per-example flips and transposes (the 8 symmetries of a square with all three); jittable.

    The per-example bits are drawn with the global shape `[B]`, so the result does not depend
    on how `x` is sharded. Each operation has its own sub-key, so turning one off leaves the others'
    draws unchanged (and runs without the transpose draw the flips they always drew).

    Args:
      key: PRNG key.
      x: float `[B, H, W, C]`.
      hflip: flip left-right with probability 1/2.
      vflip: flip top-bottom with probability 1/2.
      transpose: swap height and width with probability 1/2, before the flips (square images): with
        both flips, every one of the dihedral group's 8 elements is drawn with probability 1/8.

    Returns:
      `x` with the symmetries applied, same shape and dtype.
    """
    key_h, key_v = jax.random.split(key)
    batch = x.shape[0]
    if transpose:
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"transpose needs square images, got {x.shape[1]}x{x.shape[2]}")
        swap = jax.random.bernoulli(jax.random.fold_in(key, 2), 0.5, (batch,))  # [B]
        x = jnp.where(swap[:, None, None, None], jnp.swapaxes(x, 1, 2), x)
    if hflip:
        flip = jax.random.bernoulli(key_h, 0.5, (batch,))  # [B]
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    if vflip:
        flip = jax.random.bernoulli(key_v, 0.5, (batch,))  # [B]
        x = jnp.where(flip[:, None, None, None], x[:, ::-1, :, :], x)
    return x


def to_float(images) -> jax.Array:
    """uint8 images -> float32 in [0, 1] (the model boundary)."""
    return jnp.asarray(images, jnp.float32) / 255.0


class RunKeys:
    """Every random draw of a run's batches, from its one seed (``config.seed``).

    ``order(name)``: the fixed key of a source's example order (``batch_indices``); ``step(step,
    name)``: the key of one kind of draw at one step ("aug", "noise", "t", "drop"). Both fold a
    stable number of the name into one of two roots, so adding a source or a kind of draw leaves
    the others unchanged, and a step's draws depend only on the seed and the step (a resumed run
    continues exactly).
    """

    def __init__(self, seed: int):
        self._order_root, self._step_root = jax.random.split(jax.random.key(int(seed)))

    @staticmethod
    def _number(name: str) -> int:
        return zlib.crc32(name.encode()) & 0x7FFFFFFF

    def order(self, name: str) -> jax.Array:
        return jax.random.fold_in(self._order_root, self._number(name))

    def step(self, step, name: str) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self._step_root, step), self._number(name))


@dataclasses.dataclass(frozen=True)
class Source:
    """Examples a step draws from: ``data[images]``/``data[labels]`` (device-resident), ``batch_size`` of
    its ``num_examples`` per step, in the order of ``RunKeys.order(name)``; ``weight`` is the share of
    the loss its examples carry in all (each example ``weight / batch_size``)."""

    name: str
    num_examples: int
    batch_size: int
    images: str = "images"
    labels: str = "labels"
    weight: float = 1.0


# The key of ``draw_examples``'s ``data`` that holds a batch gathered on the host (``fadjax.data.host_feed``):
# ``{GATHERED: {"images": uint8 [B,H,W,C], "labels": int32 [B]}}``, the step's examples in the sources' order.
GATHERED = "gathered"


def gather_examples(keys: RunKeys, step, data: dict, sources: Sequence[Source]):
    """The step's examples before augmentation: ``(uint8 [B,H,W,C], int32 [B])``, the sources' examples one
    after the other; jittable. On the host path ``data`` holds them already (``data[GATHERED]``, gathered
    by ``fadjax.data.host_feed`` with the same :func:`batch_indices`)."""
    if GATHERED in data:
        return data[GATHERED]["images"], data[GATHERED]["labels"]
    xs, ys = [], []
    for s in sources:
        idx = batch_indices(keys.order(s.name), step, num_examples=s.num_examples, batch_size=s.batch_size)
        xs.append(data[s.images][idx])
        ys.append(data[s.labels][idx])
    return jnp.concatenate(xs), jnp.concatenate(ys)


def draw_examples(keys: RunKeys, step, data: dict, sources: Sequence[Source], *, hflip: bool, vflip: bool,
                  transpose: bool = False):
    """The step's global batch: ``(x float32 [B,H,W,C] in [0, 1], flipped; labels int32 [B]; weights [B])``,
    the sources' examples one after the other (``B`` = the sum of their batch sizes); jittable. ``data``:
    the device-resident arrays the sources name, or a batch gathered on the host (:func:`gather_examples`);
    both give the same batch, augmented here in either case."""
    images, labels = gather_examples(keys, step, data, sources)
    x = augment(keys.step(step, "aug"), to_float(images), hflip=hflip, vflip=vflip, transpose=transpose)
    weights = np.concatenate([np.full(s.batch_size, s.weight / s.batch_size) for s in sources]).astype(np.float32)
    return x, jnp.asarray(labels), jnp.asarray(weights)


def fixed_batches(items, batch_size: int):
    """``(batch, n)`` over ``items`` (an array or a list) in order: every batch exactly ``batch_size`` long
    (the last padded by repeating its last item; ``n`` of it are real), so one compiled shape serves all."""
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        n, pad = len(chunk), batch_size - len(chunk)
        if pad:
            chunk = (np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if isinstance(chunk, np.ndarray)
                     else list(chunk) + [chunk[-1]] * pad)
        yield chunk, n


def batched(fn, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` (a compiled function of one fixed-size batch) over ``images`` in :func:`fixed_batches`; the
    real rows of its outputs, concatenated (empty input: an empty array)."""
    from fadjax.data.dataset import Rows  # A lazy view (the host path's validation images) is read batch by batch.
    images = images if isinstance(images, Rows) else np.asarray(images)
    out = [np.asarray(fn(chunk))[:n] for chunk, n in fixed_batches(images, batch_size)]
    return np.concatenate(out) if out else np.zeros((0,))
