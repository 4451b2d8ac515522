"""Metrics: SSIM pairing, accuracy/confusion, seed statistics and the t quantile."""
import math

import numpy as np
import pytest

from fadjax import metrics


def test_ssim_of_an_image_with_itself_is_one():
    img = np.random.default_rng(0).uniform(size=(16, 16, 1)).astype(np.float32)
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    assert metrics.pairwise_ssim(np.stack([img, img, img])) == pytest.approx(1.0, abs=1e-5)


def test_pairwise_ssim_is_the_mean_over_unordered_pairs():
    imgs = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype(np.float32)
    pairs = [metrics.ssim(imgs[i], imgs[j]) for i in range(4) for j in range(i + 1, 4)]
    assert len(pairs) == 6
    assert metrics.pairwise_ssim(imgs) == pytest.approx(float(np.mean(pairs)), abs=1e-6)
    assert metrics.pairwise_ssim(imgs) < 0.5  # Independent noise images are dissimilar.
    assert math.isnan(metrics.pairwise_ssim(imgs[:1]))


def test_group_ssim_means_over_seeds_then_classes():
    rng = np.random.default_rng(2)
    same = np.repeat(rng.uniform(size=(1, 16, 16, 1)), 3, axis=0).astype(np.float32)
    noise = rng.uniform(size=(3, 16, 16, 1)).astype(np.float32)
    out = metrics.group_ssim({(0, "a"): same, (1, "a"): noise, (0, "b"): same}, ["a", "b"])
    noise_ssim = metrics.pairwise_ssim(noise)
    assert out["per_class"]["a"] == pytest.approx((1.0 + noise_ssim) / 2, abs=1e-5)
    assert out["per_class"]["b"] == pytest.approx(1.0, abs=1e-5)
    assert out["overall"] == pytest.approx((out["per_class"]["a"] + 1.0) / 2, abs=1e-6)
    assert out["per_class_seed"]["a"][1] == pytest.approx(noise_ssim)


def test_accuracy_and_confusion():
    labels = np.array([0, 0, 1, 2, 2, 2])
    preds = np.array([0, 1, 1, 2, 0, 2])
    assert metrics.accuracy(labels, preds) == pytest.approx(4 / 6)
    cm = metrics.confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert cm.sum() == 6


def test_mean_std_uses_ddof_1():
    mean, std = metrics.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert metrics.mean_std([0.7]) == (0.7, 0.0)


@pytest.mark.parametrize("df,p,expected", [
    (1, 0.975, 12.706204736), (2, 0.975, 4.302652730), (4, 0.975, 2.776445105), (9, 0.975, 2.262157163),
    (14, 0.975, 2.144786688), (30, 0.975, 2.042272456), (14, 0.995, 2.976842734), (1000, 0.975, 1.962339081),
    (5, 0.5, 0.0), (14, 0.025, -2.144786688)])
def test_t_quantile_known_values(df, p, expected):
    assert metrics.t_quantile(p, df) == pytest.approx(expected, abs=1e-7)


def test_t_quantile_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 7, 14, 50):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert metrics.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-8)


def test_paired_difference():
    a = [0.7, 0.8, 0.75, 0.9]
    b = [0.6, 0.65, 0.7, 0.7]
    out = metrics.paired_difference(a, b)
    d = np.subtract(a, b)
    half = 3.182446305 * d.std(ddof=1) / 2.0  # t_{0.975, 3} * sd / sqrt(4)
    assert out["n"] == 4
    assert out["mean"] == pytest.approx(d.mean())
    assert out["ci_low"] == pytest.approx(d.mean() - half, abs=1e-8)
    assert out["ci_high"] == pytest.approx(d.mean() + half, abs=1e-8)
    assert math.isnan(metrics.paired_difference([1.0], [0.5])["ci_low"])
