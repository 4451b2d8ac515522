"""Tests of fadjax.data: sources, bad files, caches, splits, batching, the CLI."""
import hashlib
import io
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from fadjax import data
from fadjax.data import cache as cache_lib
from fadjax.data import demo
from fadjax.data import images as images_lib
from fadjax.data import pipeline
from fadjax.data import sources
from fadjax.workdir import atomic_write

KATHER_NAMES = ["tumor", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "empty"]
REPO = pathlib.Path(__file__).resolve().parents[1]


def _subset(src: pathlib.Path, dst: pathlib.Path, per_class: int) -> pathlib.Path:
    """Symlinks the first `per_class` files of each class folder of `src` into `dst`."""
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_class]:
            (dst / folder.name / f.name).symlink_to(f)
    return dst


def _noise(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _toy_folder(root: pathlib.Path, per_class=(3, 2), size=20) -> pathlib.Path:
    """Class folders 01_ALPHA, 02_BETA, ... of small noise PNGs."""
    for c, n in enumerate(per_class):
        folder = root / f"{c + 1:02d}_{'ALPHA BETA GAMMA'.split()[c]}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_noise([c, i], (size, size))).save(folder / f"img{i}.png")
    return root


def _add_bad_files(root: pathlib.Path) -> list[str]:
    """Adds three undecodable 'images' and some ignorable files; returns the bad paths."""
    alpha, beta = root / "01_ALPHA", root / "02_BETA"
    empty = alpha / "empty.png"
    empty.write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(_noise(7, (64, 64))).save(buf, format="PNG")
    truncated = beta / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    html = beta / "page.png"
    html.write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    (alpha / "notes.txt").write_text("not an image")
    (alpha / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (beta / "._img0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (beta / ".hidden.png").write_text("hidden")
    return [str(empty), str(truncated), str(html)]


# ---------------------------------------------------------------- Kather tiles (real when ../shared is there)


def test_real_gray_tiles_subset(kather_dir, tmp_path):
    root = _subset(kather_dir, tmp_path / "k", per_class=10)
    ds = data.load(f"folder:{root}", image_size=32, channels=1, progress=False)
    assert ds.class_names == KATHER_NAMES
    assert [sources.class_name_from_folder(f) for f in sorted(os.listdir(kather_dir))] == KATHER_NAMES
    assert ds.images.shape == (80, 32, 32, 1) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.class_counts() == [10] * 8
    assert ds.files[0].startswith("01_TUMOR/") and ds.files[-1].startswith("08_EMPTY/")
    assert ds.images.min() < 60 and ds.images.max() > 180
    x = data.to_float(ds.images)
    assert x.dtype == jnp.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # Luma at full size is the file itself (the tiles are already 8-bit grayscale).
    full = data.load(f"folder:{root}", image_size=150, channels=1, progress=False)
    first = np.asarray(Image.open(root / ds.files[0]))
    np.testing.assert_array_equal(full.images[0, ..., 0], first)


def test_real_rgb_sample_one_and_three_channels(kather_dir, tmp_path):
    rgb_dir = kather_dir.parent / "kather2016_rgb_sample"
    root = _subset(rgb_dir, tmp_path / "rgb", per_class=2)
    rgb = data.load(f"folder:{root}", image_size=32, channels=3, progress=False)
    gray = data.load(f"folder:{root}", image_size=32, channels=1, progress=False)
    assert rgb.class_names == KATHER_NAMES and rgb.images.shape == (16, 32, 32, 3)
    assert gray.images.shape == (16, 32, 32, 1)
    assert np.abs(rgb.images[..., 0].astype(int) - rgb.images[..., 2]).mean() > 5  # H&E colour
    img = Image.open(root / rgb.files[0]).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(gray.images[0, ..., 0], np.asarray(img))


# ---------------------------------------------------------------- folder rules


def test_bad_files_listed_in_one_error(tmp_path):
    root = _toy_folder(tmp_path / "toy")
    bad = _add_bad_files(root)
    reports = []
    with pytest.raises(data.BadFilesError) as e:
        data.load(f"folder:{root}", image_size=8, channels=1, progress=False, on_scan=reports.append)
    assert sorted(e.value.files) == sorted(bad)
    message = str(e.value)
    assert all(path in message for path in bad)
    assert "img0.png" not in message and "notes.txt" not in message and ".hidden" not in message
    report = reports[0]
    assert report.counts == [3, 2] and sorted(p for p, _ in report.bad) == sorted(bad)
    ignored = {os.path.basename(p) for p in report.ignored}
    assert ignored == {"notes.txt", ".DS_Store", "._img0.png", ".hidden.png"}
    assert "truncated" in report.format()


def test_skip_bad_files_keeps_only_good(tmp_path):
    root = _toy_folder(tmp_path / "toy")
    _add_bad_files(root)
    ds = data.load(f"folder:{root}", image_size=8, channels=1, skip_bad_files=True, progress=False)
    assert ds.class_counts() == [3, 2]
    assert all(os.path.basename(f).startswith("img") for f in ds.files)


def test_modes_and_formats(tmp_path):
    gray = _noise(1, (12, 12))
    rgb = _noise(2, (12, 12, 3))
    a, b = tmp_path / "01_A", tmp_path / "02_B"
    a.mkdir()
    b.mkdir()
    rgba = np.concatenate([rgb, np.zeros((12, 12, 1), np.uint8)], -1)  # fully transparent
    Image.fromarray(rgba).save(a / "0_rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(a / "1_sixteen.png")
    Image.fromarray(gray).save(a / "2_gray.tif")
    Image.fromarray(rgb).save(a / "3_rgb.bmp")
    Image.fromarray(rgb).save(b / "4_rgb.jpg", quality=95)
    Image.fromarray(gray).convert("P").save(b / "5_palette.png")
    ds3 = data.load(f"folder:{tmp_path}", image_size=12, channels=3, progress=False)
    ds1 = data.load(f"folder:{tmp_path}", image_size=12, channels=1, progress=False)
    assert ds3.images.shape == (6, 12, 12, 3) and ds1.images.shape == (6, 12, 12, 1)
    np.testing.assert_array_equal(ds3.images[0], rgb)  # alpha dropped, not composited
    np.testing.assert_array_equal(ds1.images[0, ..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    np.testing.assert_array_equal(ds1.images[1, ..., 0], gray)  # 16-bit scaled, not clipped
    np.testing.assert_array_equal(ds1.images[2, ..., 0], gray)
    np.testing.assert_array_equal(ds3.images[3], rgb)
    np.testing.assert_array_equal(ds3.images[2], np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(ds1.images[5, ..., 0], gray)
    # Non-square images are centre-cropped, then resized.
    wide = Image.fromarray(np.pad(gray, ((0, 0), (4, 4))))
    np.testing.assert_array_equal(images_lib.to_array(wide, image_size=12, channels=1)[..., 0], gray)


def test_empty_class_folder_is_an_error(tmp_path):
    root = _toy_folder(tmp_path / "toy", per_class=(2, 2, 0))
    (root / "03_GAMMA" / "readme.txt").write_text("nothing here")
    with pytest.raises(data.DataError, match=r"03_GAMMA.*contains no image files"):
        data.load(f"folder:{root}", image_size=8, channels=1, progress=False)


def test_fewer_than_two_classes_is_an_error(tmp_path):
    root = _toy_folder(tmp_path / "toy", per_class=(2,))
    with pytest.raises(data.DataError, match=r"1 class\(es\) \['alpha'\]; at least two"):
        data.load(f"folder:{root}", image_size=8, channels=1, progress=False)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'nope'}", image_size=8, channels=1, progress=False)


def test_class_restriction(tmp_path):
    root = _toy_folder(tmp_path / "toy", per_class=(1, 2, 3))
    ds = data.load(f"folder:{root}", image_size=8, channels=1, classes=["gamma", "Alpha"],
                   progress=False)
    assert ds.class_names == ["gamma", "alpha"] and ds.class_counts() == [3, 1]
    assert all(f.startswith("03_GAMMA/") for f, y in zip(ds.files, ds.labels) if y == 0)
    with pytest.raises(data.DataError, match=r"unknown class\(es\) \['delta'\].*available"):
        data.load(f"folder:{root}", image_size=8, channels=1, classes="alpha,delta", progress=False)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "fadjax.data", "--progress=false", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_exit_codes_and_counts(tmp_path):
    root = _toy_folder(tmp_path / "toy")
    bad = _add_bad_files(root)
    failed = _cli(f"--source=folder:{root}", "--image_size=8")
    assert failed.returncode == 1
    listed = [line.split(": ")[0].strip() for line in failed.stderr.splitlines()
              if line.startswith("  ")]
    assert sorted(listed) == sorted(bad)
    assert "01_ALPHA" in failed.stdout and "alpha" in failed.stdout  # the scan is printed first
    ok = _cli(f"--source=folder:{root}", "--image_size=8", "--skip_bad_files",
              f"--cache={tmp_path / 'c.npz'}")
    assert ok.returncode == 0, ok.stderr
    assert "0  01_ALPHA                 alpha                 3 images" in ok.stdout
    assert "1  02_BETA                  beta                  2 images" in ok.stdout
    assert "sizes seen: 20x20: 5" in ok.stdout and "modes seen: L: 5" in ok.stdout
    assert data.load(f"folder:{root}", image_size=8, channels=1, skip_bad_files=True,
                     cache=str(tmp_path / "c.npz"), progress=False).class_counts() == [3, 2]


# ---------------------------------------------------------------- caches


def test_cache_round_trip(tmp_path):
    root = _toy_folder(tmp_path / "toy")
    path = str(tmp_path / "out" / "toy.npz")
    built = data.load(f"folder:{root}", image_size=8, channels=1, cache=path, progress=False)
    assert os.listdir(tmp_path / "out") == ["toy.npz"]  # no temporary file left behind
    with mock.patch.object(sources, "read", side_effect=AssertionError("cache not used")):
        cached = data.load(f"folder:{root}", image_size=8, channels=1, cache=path, progress=False)
    np.testing.assert_array_equal(cached.images, built.images)
    np.testing.assert_array_equal(cached.labels, built.labels)
    assert (cached.class_names, cached.files, cached.source) == (built.class_names, built.files,
                                                                 built.source)
    # An interrupted write leaves the cache as it was, and no temporary file.
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path / "out") == ["toy.npz"]
    np.testing.assert_array_equal(cache_lib.read_any(path)[0].images, built.images)
    # A corrupt cache is rebuilt while the source is there.
    pathlib.Path(path).write_bytes(b"<html>not a cache</html>")
    again = data.load(f"folder:{root}", image_size=8, channels=1, cache=path, progress=False)
    np.testing.assert_array_equal(again.images, built.images)


def test_cache_mismatch_rebuilt_or_rejected(tmp_path, caplog):
    root = _toy_folder(tmp_path / "toy")
    path = str(tmp_path / "toy.npz")
    data.load(f"folder:{root}", image_size=8, channels=1, cache=path, progress=False)
    rebuilt = data.load(f"folder:{root}", image_size=6, channels=1, cache=path, progress=False)
    assert rebuilt.images.shape[1:] == (6, 6, 1)
    assert "image_size: 8 (cache) != 6 (requested)" in caplog.text
    assert cache_lib.read_any(path)[0].images.shape[1:] == (6, 6, 1)
    # A new file in the source makes the cache stale.
    Image.fromarray(_noise(9, (20, 20))).save(root / "02_BETA" / "new.png")
    assert len(data.load(f"folder:{root}", image_size=6, channels=1, cache=path, progress=False)) == 6
    # Without the source, a matching cache is used and a mismatching one rejected.
    root.rename(tmp_path / "moved")
    assert len(data.load(f"folder:{root}", image_size=6, channels=1, cache=path, progress=False)) == 6
    with pytest.raises(data.CacheMismatch, match=r"image_size: 6 \(cache\) != 8 \(requested\)"):
        data.load(f"folder:{root}", image_size=8, channels=1, cache=path, progress=False)
    with pytest.raises(data.CacheMismatch, match=r"channels: 1 \(cache\) != 3"):
        data.load(f"folder:{root}", image_size=6, channels=3, cache=path, progress=False)


# ---------------------------------------------------------------- splits


def test_split_deterministic_stratified_disjoint(tmp_path):
    labels = np.repeat(np.arange(4), [50, 30, 20, 10]).astype(np.int32)
    np.random.default_rng(0).shuffle(labels)
    train, val = data.split(labels, seed=3, val_fraction=0.2)
    again = data.split(labels, seed=3, val_fraction=0.2)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, data.split(labels, seed=4)[1])
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert np.bincount(labels[val]).tolist() == [10, 6, 4, 2]
    # Pinned: the split must be the same on every machine.
    assert hashlib.sha256(val.tobytes()).hexdigest()[:12] == _PINNED_SPLIT

    ds = data.load("demo:4", image_size=8, channels=1, progress=False)
    tr, va = data.split(ds.labels, seed=0)
    data.save_split(str(tmp_path / "split.json"), ds, tr, va, seed=0)
    tr2, va2 = data.load_split(str(tmp_path / "split.json"), ds)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    other = data.load("demo:5", image_size=8, channels=1, progress=False)
    with pytest.raises(data.DataError, match="is for 20 examples"):
        data.load_split(str(tmp_path / "split.json"), other)


_PINNED_SPLIT = "451c168e9782"


# ---------------------------------------------------------------- batching


def test_batch_indices_cover_epoch_and_jit():
    key = jax.random.key(0)
    n, b = 23, 5
    assert data.steps_per_epoch(n, b) == 4
    with pytest.raises(ValueError, match="exceeds"):
        data.steps_per_epoch(4, 5)
    traces = []

    @jax.jit
    def fn(key, step):
        traces.append(step)
        return data.batch_indices(key, step, num_examples=n, batch_size=b)

    batches = [np.asarray(fn(key, jnp.int32(s))) for s in range(8)]
    assert len(traces) == 1  # step is traced: one compilation serves every step
    epoch0, epoch1 = np.concatenate(batches[:4]), np.concatenate(batches[4:])
    assert epoch0.dtype == np.int32 and len(set(epoch0.tolist())) == 20
    assert epoch0.min() >= 0 and epoch0.max() < n
    assert len(set(epoch1.tolist())) == 20 and not np.array_equal(epoch0, epoch1)


def test_augment_flips_per_example():
    x = jnp.asarray(np.random.default_rng(0).random((16, 4, 4, 1)), jnp.float32)
    out = np.asarray(jax.jit(data.augment)(jax.random.key(1), x))
    kinds = set()
    for orig, got in zip(np.asarray(x), out):
        for kind, cand in enumerate([orig, orig[:, ::-1], orig[::-1], orig[::-1, ::-1]]):
            if np.array_equal(got, cand):
                kinds.add(kind)
                break
        else:
            raise AssertionError("an example is not a flip of its input")
    assert len(kinds) > 1
    np.testing.assert_array_equal(data.augment(jax.random.key(1), x, hflip=False, vflip=False), x)


def test_draws_depend_on_seed_and_step_only_and_sources_concatenate():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    labels = np.arange(40, dtype=np.int32) % 4
    prior = np.full((6, 1, 1, 1), 200, np.uint8)
    dev = {"images": jnp.asarray(images), "labels": jnp.asarray(labels),
           "prior_images": jnp.asarray(prior), "prior_labels": jnp.full((6,), 9, jnp.int32)}
    one = [pipeline.Source("train", 40, 8)]
    two = [pipeline.Source("train", 40, 8), pipeline.Source("prior", 6, 2, images="prior_images",
                                                              labels="prior_labels", weight=0.5)]
    keys = pipeline.RunKeys(3)
    x1, y1, w1 = pipeline.draw_examples(keys, 5, dev, one, hflip=False, vflip=False)
    x2, y2, w2 = pipeline.draw_examples(pipeline.RunKeys(3), jnp.int32(5), dev, two, hflip=False, vflip=False)
    idx = np.asarray(pipeline.batch_indices(keys.order("train"), 5, num_examples=40, batch_size=8))
    np.testing.assert_array_equal(np.rint(np.asarray(x1)[:, 0, 0, 0] * 255), idx)  # The seed and step fix the batch.
    np.testing.assert_array_equal(np.asarray(y1), labels[idx])
    np.testing.assert_array_equal(np.asarray(x2)[:8], np.asarray(x1))  # Adding a source leaves the first's draws.
    assert np.asarray(y2)[8:].tolist() == [9, 9] and np.allclose(np.asarray(x2)[8:], 200 / 255)
    np.testing.assert_allclose(np.asarray(w1), np.full(8, 1 / 8))
    np.testing.assert_allclose(np.asarray(w2), [1 / 8] * 8 + [0.25, 0.25])
    other = pipeline.draw_examples(pipeline.RunKeys(4), 5, dev, one, hflip=False, vflip=False)[0]
    assert not np.array_equal(np.asarray(other), np.asarray(x1))  # Another seed: another batch.


def test_fixed_batches_pad_the_last_batch_and_batched_keeps_the_real_rows():
    batches = list(pipeline.fixed_batches(np.arange(7), 3))
    assert [(b.tolist(), n) for b, n in batches] == [([0, 1, 2], 3), ([3, 4, 5], 3), ([6, 6, 6], 1)]
    assert list(pipeline.fixed_batches(["a", "b"], 3)) == [(["a", "b", "b"], 2)]
    shapes = []

    def fn(x):
        shapes.append(x.shape)
        return x * 2

    np.testing.assert_array_equal(pipeline.batched(fn, np.arange(7), 3), np.arange(7) * 2)
    assert set(shapes) == {(3,)}  # One shape: one compiled program.
    assert pipeline.batched(fn, np.zeros((0,)), 3).shape == (0,)


# ---------------------------------------------------------------- demo and TFDS


def test_demo_deterministic():
    ds = data.load("demo:3", image_size=16, channels=1, progress=False)
    assert ds.class_names == list(demo.CLASS_NAMES) and ds.num_classes == 5
    assert ds.images.shape == (15, 16, 16, 1) and ds.class_counts() == [3] * 5
    again = data.load("demo:3", image_size=16, channels=1, progress=False)
    np.testing.assert_array_equal(ds.images, again.images)
    assert hashlib.sha256(ds.images.tobytes()).hexdigest()[:12] == _PINNED_DEMO
    rgb = data.load("demo:2", image_size=24, channels=3, classes=["rings", "noise"], progress=False)
    assert rgb.images.shape == (4, 24, 24, 3) and rgb.class_names == ["rings", "noise"]
    assert len(data.load("demo", image_size=4, channels=1, progress=False)) == 5 * demo.DEFAULT_PER_CLASS
    means = ds.images.reshape(5, 3, -1).astype(float).std(-1).mean(-1)
    assert np.all(means > 10)  # every class is a visible texture, not a flat image


_PINNED_DEMO = "0245456a357a"


def test_tfds_mock_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        ds = data.load("tfds:colorectal_histology", image_size=16, channels=1, progress=False)
        rgb = data.load("tfds:colorectal_histology:train", image_size=16, channels=3,
                        classes=["stroma", "tumor"], progress=False)
    assert ds.class_names == KATHER_NAMES and ds.images.shape == (64, 16, 16, 1)
    assert ds.files[0].startswith("tfds:colorectal_histology/train/0")
    assert rgb.class_names == ["stroma", "tumor"] and rgb.images.shape[1:] == (16, 16, 3)
    assert set(rgb.labels.tolist()) == {0, 1}


def test_tfds_unprepared_without_tensorflow_says_what_to_install(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with mock.patch.object(sources, "tensorflow_available", return_value=False):
        with pytest.raises(data.DataError, match=r"pip install 'fadjax\[tfds\]'"):
            data.load("tfds:colorectal_histology", image_size=16, channels=1,
                      data_dir=str(tmp_path), progress=False)
