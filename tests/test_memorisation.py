"""The memorisation check (``fadjax.memorisation``): copies of training tiles are flagged, fresh tiles
are not, the validation reference sits at its quantile, and the closest-pairs figure is drawn."""
import json

import numpy as np
import pytest

from fadjax import memorisation

SIZE = 8
N_TRAIN, N_VAL, N_COPY, N_FRESH = 120, 300, 15, 200


def tiles(rng, n, size=SIZE, channels=1):
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def noised(rng, images, sigma=0.01):
    """Lightly noised copies: + N(0, sigma) on [0, 1] intensities, back to uint8."""
    x = images.astype(np.float64) / 255.0 + rng.normal(0.0, sigma, images.shape)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def block_means(images):
    """A stand-in feature function: means of 2x2 pixel blocks."""
    x = np.asarray(images, np.float64) / 255.0
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).reshape(n, -1)


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    train, val = tiles(rng, N_TRAIN), tiles(rng, N_VAL)
    pick = rng.choice(N_TRAIN, 2 * N_COPY, replace=False)
    copies, light = train[pick[:N_COPY]], noised(rng, train[pick[N_COPY:]])
    fresh = tiles(rng, N_FRESH)
    return {"train": train, "val": val, "copies": copies, "noised": light, "fresh": fresh, "pick": pick}


def test_nearest_is_the_brute_force_neighbour():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(37, 5)), rng.normal(size=(23, 5))
    d, j = memorisation.nearest(q, r, chunk=8)  # Several chunks, the last one partial.
    full = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(j, full.argmin(1))
    np.testing.assert_allclose(d, full.min(1), rtol=1e-12)
    d0, j0 = memorisation.nearest(r[[4, 9]], r)
    assert d0.tolist() == [0.0, 0.0] and j0.tolist() == [4, 9]  # An exact copy reads exactly 0.
    with pytest.raises(ValueError):
        memorisation.nearest(q, r[:, :3])


def test_copies_are_flagged_and_fresh_tiles_are_not(sets):
    train, val = sets["train"], sets["val"]
    gen = np.concatenate([sets["copies"], sets["noised"], sets["fresh"]])
    m = memorisation.memorisation_metrics(gen, train, val, features=block_means, feature_name="feat")
    assert json.loads(json.dumps(m, allow_nan=False)) == m  # Strict JSON.
    assert m["n_generated"] == len(gen) and m["n_train"] == N_TRAIN and m["n_validation"] == N_VAL

    # Per tile, with the same threshold rule: every copy is a near-copy, (almost) no fresh tile is.
    d_gen = memorisation.nearest(memorisation.pixel_vectors(gen), memorisation.pixel_vectors(train))[0] / SIZE
    d_val = memorisation.nearest(memorisation.pixel_vectors(val), memorisation.pixel_vectors(train))[0] / SIZE
    thr = np.quantile(d_val, 0.01)
    assert m["pixels"]["threshold"] == pytest.approx(thr)
    flagged = d_gen < thr
    assert flagged[:2 * N_COPY].all()
    assert np.all(d_gen[:N_COPY] == 0.0)
    assert np.all(d_gen[N_COPY:2 * N_COPY] < 0.02)  # sigma 0.01 per pixel, rounded to uint8.
    fresh_flagged = int(flagged[2 * N_COPY:].sum())
    assert fresh_flagged <= 0.05 * N_FRESH
    for space in ("pixels", "feat"):
        s = m[space]
        assert s["n_generated"] == len(gen) and s["n_validation"] == N_VAL
        share = s["near_copies_generated"]
        assert 2 * N_COPY / len(gen) <= share <= (2 * N_COPY + 0.05 * N_FRESH) / len(gen), space
        assert s["median_generated"] > 0 and s["median_validation"] > 0
    assert m["pixels"]["near_copies_generated"] == pytest.approx((2 * N_COPY + fresh_flagged) / len(gen))
    assert m["feat"]["feature_dim"] == (SIZE // 2) ** 2
    assert m["pixels"]["distance"] == memorisation.PIXEL_DISTANCE

    # The closest pairs are the exact copies, each with the training tile it copies.
    pairs = m["closest_pairs"]
    assert len(pairs) == 8 and [p["distance"] for p in pairs] == sorted(p["distance"] for p in pairs)
    assert all(p["distance"] == 0.0 and p["generated"] < N_COPY for p in pairs)
    assert all(p["train"] == sets["pick"][p["generated"]] for p in pairs)


def test_validation_reference_is_its_quantile_by_construction(sets):
    """Generated = the copies plus the validation tiles themselves: the share is exactly predictable."""
    gen = np.concatenate([sets["copies"], sets["noised"], sets["val"]])
    m = memorisation.memorisation_metrics(gen, sets["train"], sets["val"], features=block_means)
    for space in ("pixels", "judge2"):
        s = m[space]
        val_share = s["near_copies_validation"]
        assert abs(val_share - 0.01) <= 1.0 / N_VAL, space  # ~1%: 3 of 300 below the interpolated 1% quantile.
        n_val_flagged = round(val_share * N_VAL)
        assert s["near_copies_generated"] == pytest.approx((2 * N_COPY + n_val_flagged) / len(gen)), space
    q5 = memorisation.memorisation_metrics(gen, sets["train"], sets["val"], quantile=0.05)
    assert abs(q5["pixels"]["near_copies_validation"] - 0.05) <= 1.0 / N_VAL
    assert "judge2" not in q5  # No feature function: pixels only.


def test_a_generator_of_fresh_tiles_is_near_the_reference(sets):
    """Tiles from the validation distribution (not copies): near-copies and medians read like the reference."""
    m = memorisation.memorisation_metrics(sets["fresh"], sets["train"], sets["val"], features=block_means)
    for space in ("pixels", "judge2"):
        s = m[space]
        assert s["near_copies_generated"] <= 0.05, space
        assert s["median_generated"] == pytest.approx(s["median_validation"], rel=0.1), space


def test_cache_reuses_the_real_sets_and_sizes_are_matched(sets):
    calls = []

    def feats(images):
        calls.append(len(images))
        return block_means(images)

    cache = {}
    gen = np.concatenate([sets["copies"], sets["fresh"][:20]])
    a = memorisation.memorisation_metrics(gen, sets["train"], sets["val"], features=feats, cache=cache)
    b = memorisation.memorisation_metrics(gen, sets["train"], sets["val"], features=feats, cache=cache)
    assert a == b
    assert calls == [N_TRAIN, len(gen), N_VAL, len(gen)]  # Training and validation features once.
    # Real tiles of another size and channels are matched to the generated ones (pixel space).
    big = np.repeat(np.repeat(np.repeat(sets["train"], 2, axis=1), 2, axis=2), 3, axis=3)
    c = memorisation.memorisation_metrics(sets["copies"], big, np.zeros((0, 16, 16, 3), np.uint8))
    assert c["image_size"] == [SIZE, SIZE, 1] and c["n_train"] == N_TRAIN
    assert c["pixels"]["near_copies_generated"] is None and c["pixels"]["threshold"] is None  # No reference.
    with pytest.raises(ValueError):
        memorisation.memorisation_metrics(gen[:0], sets["train"], sets["val"])


def test_closest_pairs_figure_is_written(sets, tmp_path):
    gen = np.concatenate([sets["copies"], sets["fresh"]])
    m = memorisation.memorisation_metrics(gen, sets["train"], sets["val"])
    path = tmp_path / memorisation.FIGURE
    memorisation.closest_pairs_figure(gen, sets["train"], m["closest_pairs"], path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    memorisation.closest_pairs_figure(gen, sets["train"], m["closest_pairs"][:3], tmp_path / "three.png")
    assert (tmp_path / "three.png").stat().st_size > 0


def test_generator_split_matches(tmp_path):
    split = {"train_idx": [0, 2, 3], "val_idx": [1]}
    (tmp_path / "split.json").write_text(json.dumps({"train": {"indices": [0, 2, 3]}, "val": {"indices": [1]}}))
    assert memorisation.generator_split_matches(str(tmp_path), split) is True
    assert memorisation.generator_split_matches(str(tmp_path), {**split, "train_idx": [0, 2]}) is False
    assert memorisation.generator_split_matches(str(tmp_path / "none"), split) is None
    assert memorisation.generator_split_matches(None, split) is None
