"""Evaluation metrics of generated images (paper §V-D): accuracy, confusion, SSIM, seed statistics.

SSIM diversity pairing rule: within each ``(seed, class)`` group, SSIM is computed for every
unordered pair ``i < j`` of its images (``dm-pix`` ``pix.ssim`` on ``[0, 1]`` images, Gaussian
11x11 window, sigma 1.5, ``max_val=1``; colour channels averaged), averaged over the pairs; a
class's SSIM is the mean of its groups over seeds, and the overall SSIM is the mean over
classes. Lower SSIM = more diverse samples. Seed statistics use the sample standard deviation
(``ddof=1``) over seeds.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _ssim_pairs(a: jax.Array, b: jax.Array) -> jax.Array:
    return pix.ssim(a, b, max_val=1.0)


def ssim(a, b) -> np.ndarray:
    """SSIM of image pairs ``[..., H, W, C]`` in ``[0, 1]`` (``pix.ssim``, ``max_val=1``)."""
    return np.asarray(_ssim_pairs(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


def pairwise_ssim(images) -> float:
    """Mean SSIM over all unordered pairs ``i < j`` of ``images`` ``[N, H, W, C]`` in ``[0, 1]``.

    Returns:
      The mean (NaN when ``N < 2``: no pair).
    """
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, k=1)
    return float(np.mean(ssim(images[i], images[j])))


def group_ssim(groups: Mapping[tuple[int, str], np.ndarray], class_names: Sequence[str]) -> dict:
    """SSIM diversity of ``{(seed, class): images [N,H,W,C] in [0,1]}`` by the module's pairing rule.

    Returns:
      ``{"per_class": {class: mean over seeds}, "per_class_seed": {class: {seed: value}},
      "overall": mean over classes}``; groups of fewer than 2 images (no pair) and classes
      without any pair are left out; ``overall`` is NaN when no class has a pair.
    """
    per_class_seed: dict[str, dict[int, float]] = {}
    for (seed, name), images in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(images) >= 2:
            per_class_seed.setdefault(name, {})[int(seed)] = pairwise_ssim(images)
    per_class = {c: float(np.mean(list(per_class_seed[c].values()))) for c in class_names if c in per_class_seed}
    overall = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"per_class": per_class, "per_class_seed": per_class_seed, "overall": overall}


def accuracy(labels, predictions) -> float:
    """Share of ``predictions`` equal to ``labels`` (NaN when empty)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return float(np.mean(labels == predictions)) if labels.size else float("nan")


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Counts ``[num_classes, num_classes]``: rows are true labels, columns predictions."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (inverse of :func:`t_cdf`, by bisection to ~1e-12).

    Args:
      p: probability in ``(0, 1)``, e.g. 0.975 for a two-sided 95% interval.
      df: degrees of freedom (> 0).
    """
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of ``values`` (e.g. one per seed) with a two-sided Student-t interval.

    Returns:
      ``{"n", "mean", "std" (ddof=1), "ci_low", "ci_high", "t"}``; the interval is
      ``mean -/+ t_{(1+confidence)/2, n-1} * std / sqrt(n)`` (NaN bounds when ``n < 2``).

    Raises:
      ValueError: no values.
    """
    v = np.asarray(values, np.float64).ravel()
    n = int(v.size)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean, std = mean_std(v)
    if n < 2:
        return {"n": n, "mean": mean, "std": std, "ci_low": float("nan"), "ci_high": float("nan"), "t": float("nan")}
    q = t_quantile(0.5 + confidence / 2.0, n - 1)
    half = q * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "t": q}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired difference ``a - b`` over matching seeds with a two-sided t-interval.

    Args:
      a: per-seed values of the compared run.
      b: per-seed values of the reference run, same seeds and order.
      confidence: coverage of the interval.

    Returns:
      :func:`mean_interval` of the differences: ``{"n", "mean", "std" (ddof=1), "ci_low",
      "ci_high", "t"}`` (NaN bounds when ``n < 2``).
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        raise ValueError("paired_difference needs at least one pair")
    return mean_interval(d, confidence)


def json_safe(obj):
    """Strict-JSON-safe: numpy scalars to Python, NaN/inf to None (e.g. the interval of a single seed)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
