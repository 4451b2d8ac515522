"""Is the synthetic data useful? TSTR, augmentation gain and distribution metrics.

The expert's accuracy on generated images says whether they look like their class to one
classifier (the very one the aligned model is trained towards). This module measures what a
user of synthetic data needs to know, with a classifier trained from scratch (the second
judge's architecture and recipe, fresh seeds) and the second judge's feature space:

* **TSTR** (train on synthetic, test on real): a classifier trained only on a model's generated
  images, tested on the real validation split of the same classes (``tstr_accuracy``). Beside it
  **TRTR**, the same recipe trained on the same number of real images per class drawn from the
  real training split (``trtr_accuracy``). One classifier per seed; both use the same seeds.
* **Augmentation gain**: the classifier trained on a small stratified real subset (``fraction``
  of the training split, drawn per seed) with and without all generated images added, tested on
  the real validation split. Both arms run the same number of optimizer steps (those of the
  larger, augmented set), so a gain is not bought with more compute. ``augment_gain`` =
  accuracy with minus without, paired over seeds (a fraction: x100 = points).
* **Distribution metrics** in judge2's pooled features (``features['pooled']``): the Fréchet
  distance ``fd_judge2`` = ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` -- the FID
  formula, but **not Inception-FID** (no ImageNet Inception weights offline; the numbers are not
  comparable with published FIDs, only between models judged in the same feature space) -- and
  precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
  around its points with radius the distance to the point's k-th nearest neighbour (k=3) in the
  same set; precision = share of generated points inside the real manifold, recall = share of
  real points inside the generated manifold. Computed per generation seed (the interval over
  seeds) and on all generated images together (``value``). ``real_vs_real`` gives the same
  three numbers between two disjoint random halves of the real validation features (one random
  halving per seed), the values a perfect generator would get at that sample size.

Intervals are two-sided 95% Student-t intervals over seeds (:func:`fadjax.metrics.mean_interval`).
Accuracies are fractions. Nothing here imports the training stages: the classifier loop below is
a small self-contained one (Adam/AdamW, per-step cosine learning rate, random flips, BatchNorm).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fadjax import metrics
from fadjax.data import images as data_images
from fadjax.data import pipeline

KEYS = ("tstr_accuracy", "trtr_accuracy", "augment_gain", "fd_judge2", "precision", "recall", "real_vs_real")


# ----------------------------------------------------------------------------- statistics

def summarise(per_seed: Mapping[Any, float]) -> dict:
    """``{"mean", "std", "n", "per_seed": {str(seed): v}, "ci95": [low, high]}`` (None bounds for n < 2).

    The interval is the 95% Student-t interval of :func:`fadjax.metrics.mean_interval`.
    """
    values = [float(v) for v in per_seed.values()]
    iv = metrics.mean_interval(values)
    return metrics.json_safe({"mean": iv["mean"], "std": iv["std"], "n": iv["n"],
                   "per_seed": {str(k): float(v) for k, v in per_seed.items()},
                   "ci95": [iv["ci_low"], iv["ci_high"]]})


# ----------------------------------------------------------------------------- distribution metrics

def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (float64).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` with sample covariances (ddof=1). When
    the product is singular enough for ``sqrtm`` to fail, ``1e-6 I`` is added to both covariances;
    imaginary parts from rounding (up to 1e-3 of the trace scale) are dropped.

    Raises:
      ValueError: fewer than 2 samples in a set, or feature widths that differ.
    """
    from scipy import linalg
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] of the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Fréchet distance needs >= 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # Singular products (fewer samples than dimensions) are expected.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.all(np.isfinite(covmean)):
            eye = np.eye(len(s_a)) * 1e-6
            covmean = linalg.sqrtm((s_a + eye) @ (s_b + eye))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(np.trace(s_a)) + np.abs(np.trace(s_b))))
        if np.max(np.abs(covmean.imag)) > 1e-3 * scale:
            logging.warning("sqrtm has a large imaginary part (%.3g); using its real part",
                            float(np.max(np.abs(covmean.imag))))
        covmean = covmean.real
    d = mu_a - mu_b
    return float(max(d @ d + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean), 0.0))


def _sq_dists(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]`` (float64, clipped at 0)."""
    bb = np.sum(b * b, 1)
    out = np.empty((len(a), len(b)))
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk]
        out[i:i + chunk] = np.maximum(np.sum(x * x, 1)[:, None] + bb[None] - 2.0 * x @ b.T, 0.0)
    return out


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of the same set."""
    d = _sq_dists(feats, feats)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Share of ``points`` within ``radii`` (squared) of at least one of ``centres``."""
    return float(np.mean(np.any(_sq_dists(points, centres) <= radii[None], axis=1)))


def precision_recall(real_feats, gen_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Returns:
      ``(precision, recall)``: the share of generated points inside the real manifold, and of
      real points inside the generated manifold.

    Raises:
      ValueError: a set has at most ``k`` points (no k-th neighbour), or the widths differ.
    """
    r, g = np.asarray(real_feats, np.float64), np.asarray(gen_feats, np.float64)
    if r.ndim != 2 or g.ndim != 2 or r.shape[1] != g.shape[1]:
        raise ValueError(f"feature sets must be [N, D] of the same D, got {r.shape} and {g.shape}")
    if min(len(r), len(g)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, "
                         f"got {len(r)} real and {len(g)} generated")
    return _coverage(g, r, _knn_radii(r, k)), _coverage(r, g, _knn_radii(g, k))


def distribution_metrics(real_feats, gen_feats, k: int = 3) -> dict:
    """``{"fd_judge2", "precision", "recall", "n_real", "n_generated"}`` of two feature sets."""
    p, r = precision_recall(real_feats, gen_feats, k)
    return {"fd_judge2": frechet_distance(real_feats, gen_feats), "precision": p, "recall": r,
            "n_real": int(len(real_feats)), "n_generated": int(len(gen_feats))}


def real_reference(real_feats, *, seeds: Sequence[int] = (0, 1, 2), k: int = 3) -> dict:
    """FD / precision / recall between two disjoint random halves of ``real_feats``, one halving per seed.

    Returns:
      ``{"fd_judge2": summary, "precision": summary, "recall": summary, "n_half": int}`` where each
      summary is :func:`summarise` over the seeds.
    """
    real_feats = np.asarray(real_feats, np.float64)
    half = len(real_feats) // 2
    per = {key: {} for key in ("fd_judge2", "precision", "recall")}
    for s in seeds:
        perm = np.random.default_rng([int(s), 7919]).permutation(len(real_feats))
        m = distribution_metrics(real_feats[perm[:half]], real_feats[perm[half:2 * half]], k)
        for key in per:
            per[key][int(s)] = m[key]
    return {**{key: summarise(v) for key, v in per.items()}, "n_half": int(half)}


@functools.lru_cache(maxsize=8)
def _feature_fn(module, size: int):
    @jax.jit
    def feats(variables, x):
        if x.shape[1] != size or x.shape[2] != size:
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
        return module.apply(variables, x, train=False)[1]["pooled"].astype(jnp.float32)
    return feats


def pooled_features(expert_run, images: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
    """``features['pooled']`` ``[N, D]`` (float64) of a judge (an ``ExpertRun``) for uint8 ``[N,H,W,C]`` images.

    Images are matched to the judge's channels and resized (bilinear) to its size, in fixed-size
    padded batches (one compiled shape per input size), eval mode.
    """
    fn = _feature_fn(expert_run.module, int(expert_run.image_size))
    images = data_images.match_channels(np.asarray(images), int(expert_run.channels))
    if not len(images):
        raise ValueError("pooled_features: no images")
    return pipeline.batched(lambda x: fn(expert_run.variables, x.astype(np.float32) / 255.0), images,
                            batch_size).astype(np.float64)


# ----------------------------------------------------------------------------- the classifier

@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """Architecture and recipe of the utility classifiers (trained from scratch).

    Attributes:
      arch: an expert architecture of :func:`fadjax.models.expert.build_expert` (resnet18/34/50/101).
      width: ResNet stem width.
      head_hidden: hidden width of the head (None = one Linear).
      image_size: side the classifier sees (every input is resized to it).
      channels: input channels.
      lr: peak learning rate of the per-step cosine schedule (to 0 at the last step).
      weight_decay: decoupled weight decay (AdamW) when > 0, else Adam.
      epochs: passes over the training set (steps = epochs * ceil(N / batch_size), at least ``min_steps``).
      batch_size: batch size (always full: a set smaller than a batch fills it from consecutive
        permutations, so every training run shares one compiled step).
      hflip, vflip: random flips during training.
      min_steps: lower bound on the number of optimizer steps.
      stage_sizes: residual blocks per stage overriding the arch's layout (e.g. ``(1, 1)`` for a
        quick test); None = the arch's (ResNet18: 2, 2, 2, 2).
    """

    arch: str = "resnet18"
    width: int = 16
    head_hidden: int | None = 256
    image_size: int = 32
    channels: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    hflip: bool = True
    vflip: bool = True
    min_steps: int = 0
    stage_sizes: tuple[int, ...] | None = None

    def steps_for(self, num_examples: int) -> int:
        return max(int(self.epochs) * math.ceil(num_examples / self.batch_size), int(self.min_steps), 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def spec_from_run(run, **overrides) -> ClassifierSpec:
    """The :class:`ClassifierSpec` of a judge run's saved config (``config.json``), with ``overrides``.

    Takes ``expert.arch/width/head_hidden``, ``data.image_size/channels/hflip/vflip``,
    ``optim.lr/weight_decay`` and ``train.batch_size/num_epochs`` (a run set in steps gets
    ``ceil(num_steps / (train images / batch))`` epochs when it knows its split, else 20). The
    schedule is always a per-step cosine and the weights start from scratch (no ``pretrained``).
    """
    c = run.config
    e, d, o, t = c.get("expert", {}), c.get("data", {}), c.get("optim", {}), c.get("train", {})
    epochs = t.get("num_epochs")
    if epochs is None:
        steps, n_train = t.get("num_steps"), len(getattr(run, "split", {}).get("train_idx", []) or [])
        bs = int(t.get("batch_size", 64))
        epochs = max(1, math.ceil(steps / max(1, n_train // bs))) if steps and n_train >= bs else 20
    kw = dict(arch=e.get("arch", "resnet18"), width=int(e.get("width", 16)), head_hidden=e.get("head_hidden", 256),
              image_size=int(d.get("image_size", run.image_size)), channels=int(d.get("channels", run.channels)),
              lr=float(o.get("lr", 3e-3)), weight_decay=float(o.get("weight_decay", 0.0)), epochs=int(epochs),
              batch_size=int(t.get("batch_size", 64)), hflip=bool(d.get("hflip", True)),
              vflip=bool(d.get("vflip", True)))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if kw.get("stage_sizes") is not None:
        kw["stage_sizes"] = tuple(int(v) for v in kw["stage_sizes"])
    return ClassifierSpec(**kw)


@functools.lru_cache(maxsize=16)
def _programs(spec: ClassifierSpec, num_classes: int):
    """``(module, init, train_step, predict)`` for a spec: one compile per spec and batch shape."""
    from fadjax.models import expert as expert_lib
    kw = {"head_hidden": spec.head_hidden}
    if spec.arch.startswith("resnet"):
        kw["width"] = spec.width
        if spec.stage_sizes is not None:
            kw["stage_sizes"] = tuple(spec.stage_sizes)
    module = expert_lib.build_expert(spec.arch, num_classes=num_classes, **kw)
    parts = [optax.scale_by_adam()]
    if spec.weight_decay > 0:
        parts.append(optax.add_decayed_weights(spec.weight_decay))
    tx = optax.chain(*parts)
    size, ch = spec.image_size, spec.channels

    def prep(x_uint8):
        x = jnp.asarray(x_uint8, jnp.float32) / 255.0
        if x.shape[1] != size or x.shape[2] != size:
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
        return x

    @jax.jit
    def init(key):
        variables = module.init(key, jnp.zeros((1, size, size, ch), jnp.float32), train=False)
        return variables, tx.init(variables["params"])

    @jax.jit
    def train_step(variables, opt_state, x_uint8, y, key, lr):
        x = prep(x_uint8)
        kh, kv = jax.random.split(key)
        b = x.shape[0]
        if spec.hflip:
            x = jnp.where(jax.random.bernoulli(kh, 0.5, (b,))[:, None, None, None], x[:, :, ::-1], x)
        if spec.vflip:
            x = jnp.where(jax.random.bernoulli(kv, 0.5, (b,))[:, None, None, None], x[:, ::-1], x)

        def loss_fn(params):
            v = {**variables, "params": params}
            mutable = ["batch_stats"] if "batch_stats" in variables else []
            (logits, _), upd = module.apply(v, x, train=True, mutable=mutable)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
            return loss, upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = jax.tree.map(lambda p, u: p - lr * u, variables["params"], updates)
        return {**variables, **upd, "params": params}, opt_state, loss

    @jax.jit
    def predict(variables, x_uint8):
        return jnp.argmax(module.apply(variables, prep(x_uint8), train=False)[0], -1)

    return module, init, train_step, predict


def train_classifier(images: np.ndarray, labels: np.ndarray, *, spec: ClassifierSpec, seed: int,
                     num_classes: int | None = None, steps: int | None = None,
                     log: Callable[[str], None] | None = None, name: str = "classifier") -> dict:
    """Trains a fresh classifier on uint8 ``[N,H,W,C]`` images and integer labels.

    Batches are drawn from per-epoch permutations (``np.random.default_rng([seed, 1])``; epochs
    run on across the permutation boundary so every batch is full); the learning rate follows a
    cosine from ``spec.lr`` to 0 over the run.

    Args:
      images, labels: the training set (labels in ``[0, num_classes)``).
      spec: architecture and recipe.
      seed: initialisation, data order and augmentation seed.
      num_classes: classes of the head (default: ``max(labels) + 1``).
      steps: optimizer steps (default ``spec.steps_for(len(images))``).
      log: progress callback (one line when done); None = absl logging.
      name: what the progress line calls the run.

    Returns:
      ``{"variables", "spec", "num_classes", "steps", "seconds", "final_loss"}``.
    """
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"{name}: need images and labels of the same non-zero length, "
                         f"got {len(images)} and {len(labels)}")
    images = data_images.match_channels(images, spec.channels)
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    _, init, train_step, _ = _programs(spec, num_classes)
    steps = int(steps) if steps is not None else spec.steps_for(len(images))
    b = spec.batch_size
    t0 = time.time()
    key = jax.random.key(int(seed))
    variables, opt_state = init(jax.random.fold_in(key, 0))
    rng = np.random.default_rng([int(seed), 1])
    order = np.zeros(0, np.int64)
    loss = jnp.nan
    for step in range(steps):
        while len(order) < b:
            order = np.concatenate([order, rng.permutation(len(images))])
        idx, order = order[:b], order[b:]
        lr = np.float32(spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / steps)))
        variables, opt_state, loss = train_step(variables, opt_state, images[idx], labels[idx],
                                                jax.random.fold_in(key, step + 1), lr)
    loss = float(loss)
    seconds = time.time() - t0
    (log or logging.info)(f"{name}: {spec.arch} w{spec.width} at {spec.image_size}px, {len(images)} images, "
                          f"{steps} steps of {b}, seed {seed}: final loss {loss:.3f} ({seconds:.1f} s)")
    return {"variables": variables, "spec": spec, "num_classes": num_classes, "steps": steps,
            "seconds": seconds, "final_loss": loss}


def predict(classifier: dict, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Predicted labels of a :func:`train_classifier` result for uint8 images (padded batches)."""
    spec = classifier["spec"]
    _, _, _, fn = _programs(spec, classifier["num_classes"])
    images = data_images.match_channels(np.asarray(images), spec.channels)
    return pipeline.batched(lambda x: fn(classifier["variables"], x), images, batch_size).astype(np.int64)


def accuracy(classifier: dict, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of a :func:`train_classifier` result on ``(images, labels)``."""
    return metrics.accuracy(labels, predict(classifier, images))


# ----------------------------------------------------------------------------- TSTR and augmentation

def _classes_of(gen_labels: np.ndarray) -> np.ndarray:
    classes = np.unique(np.asarray(gen_labels))
    if classes.size < 2:
        raise ValueError(f"utility metrics need generated images of at least 2 classes, got {classes.tolist()}")
    return classes


def _restrict(x: np.ndarray, y: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``classes`` with labels remapped to their position in ``classes``."""
    y = np.asarray(y)
    keep = np.isin(y, classes)
    lut = {int(c): i for i, c in enumerate(classes)}
    return np.asarray(x)[keep], np.array([lut[int(v)] for v in y[keep]], np.int32)


def _draw_per_class(y: np.ndarray, counts: Mapping[int, int], seed: int, salt: int) -> np.ndarray:
    """Sorted indices: ``counts[c]`` of each class ``c`` of ``y`` without replacement (all when fewer)."""
    picks = []
    for c, n in counts.items():
        pool = np.flatnonzero(y == c)
        n = min(int(n), pool.size)
        picks.append(np.random.default_rng([int(seed), salt, int(c)]).choice(pool, size=n, replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def _fingerprint(*arrays) -> str:
    """A cheap content key of arrays (shapes, dtypes and CRC-32 of the bytes), for ``cache``."""
    h = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.append(f"{a.shape}{a.dtype}{zlib.crc32(a.view(np.uint8).ravel()) if a.size else 0}")
    return "|".join(h)


def _cached(cache: dict | None, key, fn: Callable[[], float]) -> float:
    """``fn()``, or the value ``cache`` holds under ``key`` (stored there after a call)."""
    if cache is None:
        return fn()
    if key not in cache:
        cache[key] = fn()
    else:
        logging.info("utility: reusing the cached reference accuracy %s", key[0])
    return cache[key]


def _check_val(val_y: np.ndarray) -> None:
    if len(val_y) == 0:
        raise ValueError("the real validation split holds no image of the generated classes")


def tstr(gen_images, gen_labels, real_train, real_val, *, spec: ClassifierSpec, seeds: Sequence[int] = (0, 1, 2),
         log: Callable[[str], None] | None = None, cache: dict | None = None) -> dict:
    """Train-on-synthetic-test-on-real, with the real-trained reference on as many images per class.

    Args:
      gen_images, gen_labels: generated uint8 images and their class indices.
      real_train, real_val: ``(images, labels)`` of the real training and validation splits, labels
        in the same index space as ``gen_labels`` (only the generated classes are used).
      spec: classifier architecture and recipe.
      seeds: classifier seeds (TSTR and TRTR use the same ones; TRTR's real draw per class is
        ``default_rng([seed, 2, class])``).
      cache: a dict shared between calls (e.g. one per judge across models): TRTR accuracies
        (which depend only on the real data, the counts per class, the recipe and the seed) are
        computed once and reused.

    Returns:
      ``{"tstr_accuracy": summary, "trtr_accuracy": summary, "tstr_minus_trtr": summary (paired),
      "num_train": {"generated", "real"}, "num_val", "steps": {"tstr", "trtr"}, "seconds_per_classifier"
      (median wall time of one training, the first one's compile included in its own)}``,
      summaries as :func:`summarise`.
    """
    gen_labels = np.asarray(gen_labels)
    classes = _classes_of(gen_labels)
    gx, gy = _restrict(gen_images, gen_labels, classes)
    tx_, ty = _restrict(*real_train, classes)
    vx, vy = _restrict(*real_val, classes)
    _check_val(vy)
    counts = {i: int(np.sum(gy == i)) for i in range(len(classes))}
    t_acc, r_acc, secs, steps, n_real = {}, {}, [], {}, 0
    for s in seeds:
        clf = train_classifier(gx, gy, spec=spec, seed=s, num_classes=len(classes), log=log,
                               name=f"TSTR seed {s}")
        t_acc[int(s)] = accuracy(clf, vx, vy)
        steps["tstr"] = clf["steps"]
        secs.append(clf["seconds"])
        idx = _draw_per_class(ty, counts, s, 2)
        if len(idx) < len(gy):
            logging.warning("TRTR: the real training split has %d images of the generated classes, "
                            "fewer than the %d generated ones", len(idx), len(gy))

        def trtr_run(idx=idx, s=s):
            clf = train_classifier(tx_[idx], ty[idx], spec=spec, seed=s, num_classes=len(classes), log=log,
                                   name=f"TRTR seed {s}")
            secs.append(clf["seconds"])
            return accuracy(clf, vx, vy)

        key = ("trtr", spec, int(s), tuple(sorted(counts.items())), _fingerprint(tx_, ty, vx, vy))
        r_acc[int(s)] = _cached(cache, key, trtr_run)
        steps["trtr"], n_real = spec.steps_for(len(idx)), int(len(idx))
        (log or logging.info)(f"seed {s}: TSTR accuracy {t_acc[int(s)]:.3f}, TRTR accuracy {r_acc[int(s)]:.3f}")
    diff = {s: t_acc[s] - r_acc[s] for s in t_acc}
    return {"tstr_accuracy": summarise(t_acc), "trtr_accuracy": summarise(r_acc), "tstr_minus_trtr": summarise(diff),
            "num_train": {"generated": int(len(gy)), "real": n_real}, "num_val": int(len(vy)), "steps": steps,
            "seconds_per_classifier": float(np.median(secs))}


def augment_gain(gen_images, gen_labels, real_train, real_val, *, spec: ClassifierSpec, fraction: float = 0.1,
                 seeds: Sequence[int] = (0, 1, 2), log: Callable[[str], None] | None = None,
                 cache: dict | None = None) -> dict:
    """Real-validation accuracy of a classifier on a small real subset, with and without the generated images.

    The subset holds ``max(1, round(fraction * n_c))`` real training images of each generated class
    ``c`` (``default_rng([seed, 3, class])``); both arms use the same seed, subset and number of
    steps (``spec.steps_for`` of the augmented set). ``cache`` as in :func:`tstr` (the real-only
    arm depends only on the real data, fraction, steps, recipe and seed).

    Returns:
      ``{"augment_gain": summary of with - without (paired), "accuracy_real_only": summary,
      "accuracy_augmented": summary, "fraction", "num_train": {"real", "generated"}, "steps"}``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"augment fraction must be in (0, 1], got {fraction}")
    gen_labels = np.asarray(gen_labels)
    classes = _classes_of(gen_labels)
    gx, gy = _restrict(gen_images, gen_labels, classes)
    tx_, ty = _restrict(*real_train, classes)
    vx, vy = _restrict(*real_val, classes)
    _check_val(vy)
    counts = {i: max(1, int(round(fraction * np.sum(ty == i)))) for i in range(len(classes))}
    gx = data_images.match_channels(gx, spec.channels)
    if gx.shape[1:3] != tx_.shape[1:3]:  # One image size for the concatenation: the real one.
        gx = np.asarray(jax.image.resize(jnp.asarray(gx, jnp.float32), (len(gx),) + tx_.shape[1:3] + gx.shape[3:],
                                         "bilinear").round().clip(0, 255).astype(jnp.uint8))
    tx_ = data_images.match_channels(tx_, spec.channels)
    without, with_, n_real, steps = {}, {}, 0, 0
    for s in seeds:
        idx = _draw_per_class(ty, counts, s, 3)
        ax, ay = np.concatenate([tx_[idx], gx]), np.concatenate([ty[idx], gy])
        steps = spec.steps_for(len(ax))

        def real_only(idx=idx, s=s, steps=steps):
            clf = train_classifier(tx_[idx], ty[idx], spec=spec, seed=s, num_classes=len(classes), steps=steps,
                                   log=log, name=f"augment seed {s}: real only")
            return accuracy(clf, vx, vy)

        key = ("real_only", spec, int(s), float(fraction), int(steps), _fingerprint(tx_, ty, vx, vy))
        without[int(s)] = _cached(cache, key, real_only)
        clf = train_classifier(ax, ay, spec=spec, seed=s, num_classes=len(classes), steps=steps, log=log,
                               name=f"augment seed {s}: real + generated")
        with_[int(s)] = accuracy(clf, vx, vy)
        n_real = int(len(idx))
        (log or logging.info)(f"seed {s}: real-only accuracy {without[int(s)]:.3f}, "
                              f"augmented {with_[int(s)]:.3f}")
    gain = {s: with_[s] - without[s] for s in with_}
    return {"augment_gain": summarise(gain), "accuracy_real_only": summarise(without),
            "accuracy_augmented": summarise(with_), "fraction": float(fraction),
            "num_train": {"real": n_real, "generated": int(len(gy))}, "steps": int(steps)}


def _per_seed_distribution(real_feats, gen_feats, gen_seeds, k: int) -> dict:
    out = {"value": distribution_metrics(real_feats, gen_feats, k)}
    per = {key: {} for key in ("fd_judge2", "precision", "recall")}
    gen_seeds = np.asarray(gen_seeds)
    for s in np.unique(gen_seeds):
        f = gen_feats[gen_seeds == s]
        if len(f) <= k:
            logging.warning("seed %s has only %d generated images: no per-seed distribution metrics", s, len(f))
            continue
        m = distribution_metrics(real_feats, f, k)
        for key in per:
            per[key][int(s)] = m[key]
    sizes = {"n_real": out["value"]["n_real"], "n_generated": out["value"]["n_generated"]}
    return {key: {"value": out["value"][key], **(summarise(per[key]) if per[key] else {}), **sizes} for key in per}


def utility_metrics(gen_images, gen_labels, real_train, real_val, *, judge, gen_seeds=None,
                    spec: ClassifierSpec | None = None, seeds: Sequence[int] = (0, 1, 2),
                    augment_fraction: float = 0.1, k: int = 3, judge_role: str = "judge2",
                    log: Callable[[str], None] | None = None, cache: dict | None = None) -> dict:
    """All utility numbers of one model's generations; strict-JSON-serialisable (None where undefined).

    Args:
      gen_images: uint8 ``[N,H,W,C]`` generated images (any size: resized to the judge's).
      gen_labels: their class indices in the judge's class list.
      real_train, real_val: ``(uint8 images, labels)`` of the judge's real training and validation
        splits (judge's class indices).
      judge: the judge (an ``ExpertRun``: ``module``, ``variables``, ``image_size``, ``channels``,
        ``config``): its pooled features are the feature space and, unless ``spec`` is given, its
        saved config is the classifier recipe (:func:`spec_from_run`).
      gen_seeds: the generation seed of each image (per-seed distribution metrics and intervals);
        None = one group.
      spec: classifier recipe; None = the judge's.
      seeds: classifier seeds (and real halvings of ``real_vs_real``).
      augment_fraction: real training share of the augmentation experiment.
      k: neighbourhood size of precision/recall.
      judge_role: what to call the judge in the record (e.g. ``"expert (no judge2 given)"``).
      log: progress callback, one line per trained classifier; None = absl logging.
      cache: a dict to pass to every call for the same judge and real data (e.g. across the models
        of one report): the real-only references (TRTR, the augmentation's real-only arm) are then
        trained once for models with the same number of generated images per class.

    Returns:
      ``{"tstr_accuracy", "trtr_accuracy", "tstr_minus_trtr", "augment_gain", "augment": {...},
      "fd_judge2", "precision", "recall", "real_vs_real": {"fd_judge2", "precision", "recall",
      "n_half"}, "judge", "classifier", "seeds", "k", "num_generated", "num_real_val", "notes"}``;
      accuracy-like entries are summaries ``{"mean", "std", "n", "per_seed", "ci95"}``; the
      distribution entries add ``"value"`` (all generated images against all real validation
      images; ``mean``/``ci95`` over generation seeds) and ``n_real``, ``n_generated``.
      Undefined numbers (e.g. the ci95 of a single seed) are None.
    """
    spec = spec or spec_from_run(judge)
    seeds = [int(s) for s in seeds]
    gen_images, gen_labels = np.asarray(gen_images), np.asarray(gen_labels)
    gen_seeds = np.zeros(len(gen_images), np.int64) if gen_seeds is None else np.asarray(gen_seeds)
    t0 = time.time()
    t = tstr(gen_images, gen_labels, real_train, real_val, spec=spec, seeds=seeds, log=log, cache=cache)
    a = augment_gain(gen_images, gen_labels, real_train, real_val, spec=spec, fraction=augment_fraction,
                     seeds=seeds, log=log, cache=cache)
    classes = _classes_of(gen_labels)
    vx, _ = _restrict(*real_val, classes)
    real_feats = pooled_features(judge, vx)
    gen_feats = pooled_features(judge, gen_images)
    dist = _per_seed_distribution(real_feats, gen_feats, gen_seeds, k)
    ref = real_reference(real_feats, seeds=seeds, k=k)
    result = {
        "tstr_accuracy": t["tstr_accuracy"], "trtr_accuracy": t["trtr_accuracy"],
        "tstr_minus_trtr": t["tstr_minus_trtr"],
        "augment_gain": a["augment_gain"],
        "augment": {key: a[key] for key in ("accuracy_real_only", "accuracy_augmented", "fraction", "num_train",
                                            "steps")},
        "fd_judge2": dist["fd_judge2"], "precision": dist["precision"], "recall": dist["recall"],
        "real_vs_real": ref,
        "judge": {"workdir": str(getattr(judge, "workdir", "")), "role": judge_role,
                  "feature": "pooled", "feature_dim": int(real_feats.shape[1])},
        "classifier": {**spec.to_dict(), "steps": t["steps"], "num_train": t["num_train"],
                       "seconds_per_classifier": t["seconds_per_classifier"]},
        "seeds": seeds, "k": int(k), "num_generated": int(len(gen_images)), "num_real_val": int(len(vx)),
        "seconds": time.time() - t0,
        "notes": ("fd_judge2 is the Fréchet distance in the judge's pooled features, not Inception-FID "
                  "(no ImageNet Inception weights offline): compare it only between models judged by the same "
                  "judge, and with real_vs_real (two disjoint halves of the real validation images; FD and the k-NN "
                  "radii depend on the sample sizes, given as n_real / n_generated / n_half). Accuracies and "
                  "augment_gain are fractions (x100 = points)."),
    }
    return metrics.json_safe(result)


