"""The host input path (``data.placement``): its batches against the device path's, step by step and
across a resume that switches paths; the streamed, memory-mapped cache it reads; the choice of path."""
import os
import pathlib

import jax
import numpy as np
import pytest

from fadjax import config_lib
from fadjax import data as data_lib
from fadjax.data import cache as cache_lib
from fadjax.data import host_feed
from fadjax.data import pipeline
from fadjax.train import common

STEPS = 20


def _parallel(mode: str, n: int) -> common.Parallel:
    devices = jax.local_devices()[:n]
    return common.Parallel(mode, jax.sharding.Mesh(np.asarray(devices), (common.DATA_AXIS,)), n)


def _mapped_split(tmp_path, n=45, size=6, seed=0):
    """A cache of ``n`` random RGB tiles written in small chunks, memory-mapped, and a training split of it
    (a lazy ``Rows`` view, as the stages hold it)."""
    rng = np.random.default_rng(seed)
    ds = data_lib.Dataset(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), (np.arange(n) % 3).astype(np.int32),
                          ["a", "b", "c"], [f"f{i}" for i in range(n)], "demo")
    path = str(tmp_path / "cache.npz")
    cache_lib.write(path, ds, {"source": "demo"})
    mapped, _ = cache_lib.read_any(path, mmap=True)
    assert isinstance(mapped.images, np.memmap)
    train_idx = np.sort(rng.permutation(n)[: n - 8])  # 37 training examples
    return ds, mapped, train_idx


def _draw_fn(par, sources, *, transpose=True, seed=3):
    keys = pipeline.RunKeys(seed)

    def draw(step, data):
        return pipeline.draw_examples(keys, step, data, sources, hflip=True, vflip=True, transpose=transpose)

    if par.mode == "pmap":
        return jax.pmap(draw, axis_name=common.DATA_AXIS, in_axes=(None, 0))
    return jax.jit(draw, out_shardings=par.batch_sharded)


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_host_and_device_paths_give_the_same_batches_across_a_switching_resume(tmp_path, mode):
    """20 steps (3 epochs of one source, 10 of a second, as DreamBooth's instance + prior images): the host
    path (memory-mapped cache, prefetching thread) gives the device path's indices, pixels, labels, flips and
    transposes; a run on the device path for 10 steps that resumes on the host path, and one the other way
    round, see the same 20 batches."""
    _, mapped, train_idx = _mapped_split(tmp_path)
    prior = np.random.default_rng(1).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    host = {"images": data_lib.Rows(mapped.images, train_idx), "labels": mapped.labels[train_idx],
            "prior_images": prior, "prior_labels": np.full(5, 2, np.int32)}
    sources = [pipeline.Source("instance", len(train_idx), 6),
               pipeline.Source("prior", 5, 2, images="prior_images", labels="prior_labels", weight=0.5)]
    par = _parallel(mode, 8)
    draw = _draw_fn(par, sources)
    device_data = par.put_replicated(jax.tree.map(np.asarray, host))
    keys = pipeline.RunKeys(3)

    def device_batch(step):
        out = draw(step, device_data)
        return [np.asarray(a[0] if mode == "pmap" else a) for a in out]

    def fetch(feed, step):
        out = draw(step, feed.get(step))
        return [np.asarray(a[0] if mode == "pmap" else a) for a in out]

    expected = [device_batch(s) for s in range(STEPS)]
    # The device path's batch is what the pipeline defines: the indices of batch_indices, those pixels, flipped.
    idx = np.asarray(pipeline.batch_indices(keys.order("instance"), 13, num_examples=len(train_idx), batch_size=6))
    raw = pipeline.augment(keys.step(13, "aug"), pipeline.to_float(
        np.concatenate([np.asarray(mapped.images)[train_idx[idx]],
                        prior[np.asarray(pipeline.batch_indices(keys.order("prior"), 13, num_examples=5, batch_size=2))]])),
        transpose=True)
    np.testing.assert_array_equal(expected[13][0], np.asarray(raw))
    assert len({e[0].tobytes() for e in expected}) == STEPS  # Every step a different batch.

    # Device path for steps 0-9, then the host path from step 10 (a resume that switches), and the reverse.
    with host_feed.HostFeed(keys, host, sources, par, start=10, stop=STEPS, depth=3) as feed:
        assert [feed.indices(s)[0].tolist() for s in (10, 11)] == [
            np.asarray(pipeline.batch_indices(keys.order("instance"), s, num_examples=len(train_idx),
                                              batch_size=6)).tolist() for s in (10, 11)]
        got = {s: fetch(feed, s) for s in range(10, STEPS)}
    with host_feed.HostFeed(keys, host, sources, par, start=0, stop=STEPS, depth=3) as feed:
        got.update({s: fetch(feed, s) for s in range(0, 10)})
        # Asked for another step than the next one (a restart at a checkpoint), it reads from there.
        got_again = fetch(feed, 4)
    for s in range(STEPS):
        for a, b in zip(got[s], expected[s]):
            np.testing.assert_array_equal(a, b, err_msg=f"step {s}")
    np.testing.assert_array_equal(got_again[0], expected[4][0])


def test_each_process_reads_only_its_rows(tmp_path):
    """With the batch's rows split over 4 'processes' (contiguous device groups), each reads only its
    rows' examples, and the union is the global batch."""
    _, mapped, train_idx = _mapped_split(tmp_path)
    read = []

    class Recording:
        def __init__(self, base):
            self.base, self.shape, self.dtype, self.ndim = base, base.shape, base.dtype, base.ndim

        def __getitem__(self, key):
            read.extend(np.atleast_1d(key).tolist())
            return self.base[key]

    host = {"images": Recording(data_lib.Rows(mapped.images, train_idx)), "labels": mapped.labels[train_idx]}
    sources = [pipeline.Source("train", len(train_idx), 8)]
    par = _parallel("sharded", 8)
    keys = pipeline.RunKeys(0)
    feed = host_feed.HostFeed(keys, host, sources, par, start=0, stop=1, depth=1)
    feed.close()
    idx = feed.indices(5)[0]
    images = []
    for lo in range(0, 8, 2):  # As process p of 4 (2 devices each) sees the batch.
        feed.lo, feed.hi = lo, lo + 2
        read.clear()
        x, y = feed.local_batch(5)
        assert sorted(read) == sorted(idx[lo:lo + 2].tolist())
        images.append(x)
    np.testing.assert_array_equal(np.concatenate(images), np.asarray(mapped.images)[train_idx[idx]])
    assert host_feed.process_rows(par, 8) == (0, 8)


def test_streamed_cache_matches_and_is_checked(tmp_path, monkeypatch):
    """A cache built in chunks holds what the in-memory path built; mapped, a flipped byte is refused."""
    monkeypatch.setattr(cache_lib.CacheWriter, "CHUNK_BYTES", 500)
    ds, mapped, _ = _mapped_split(tmp_path)
    np.testing.assert_array_equal(np.asarray(mapped.images), ds.images)
    assert os.listdir(tmp_path) == ["cache.npz"]  # No temporary file left.
    full, _ = cache_lib.read_any(str(tmp_path / "cache.npz"))
    np.testing.assert_array_equal(full.images, ds.images)
    raw = bytearray((tmp_path / "cache.npz").read_bytes())
    at = raw.find(ds.images[3].tobytes())
    raw[at + 7] ^= 0xFF
    (tmp_path / "cache.npz").write_bytes(bytes(raw))
    with pytest.raises(data_lib.DataError, match="CRC"):
        cache_lib.read_any(str(tmp_path / "cache.npz"), mmap=True)


def test_folder_is_decoded_in_chunks_into_the_cache(tmp_path, monkeypatch):
    """Building a folder's cache hands the decoded images over chunk by chunk (never the whole set), and the
    cache equals the folder read in memory."""
    from conftest import make_tile_folder
    from fadjax.data import sources
    source = make_tile_folder(tmp_path / "tiles", per_class=3)
    monkeypatch.setattr(sources, "DECODE_CHUNK", 5)
    chunks = []
    append = cache_lib.CacheWriter.append
    monkeypatch.setattr(cache_lib.CacheWriter, "append", lambda self, x: (chunks.append(len(x)), append(self, x)))
    ds = data_lib.load(source, image_size=8, channels=1, cache=str(tmp_path / "c.npz"), progress=False, mmap=True)
    assert isinstance(ds.images, np.memmap) and max(chunks) <= 5 and sum(chunks) == 24
    plain = data_lib.load(source, image_size=8, channels=1, progress=False)
    np.testing.assert_array_equal(np.asarray(ds.images), plain.images)
    assert ds.files == plain.files and ds.labels.tolist() == plain.labels.tolist()


def test_placement_choice_and_config_checks():
    assert host_feed.choose_placement("host", 10, share=0.5)[0] == "host"
    assert host_feed.choose_placement("device", 10**15, share=0.5)[0] == "device"
    limit, _ = host_feed.device_memory_bytes()
    path, why = host_feed.choose_placement("auto", int(limit * 0.3), share=0.25)
    assert path == "host" and "data.device_share 0.25" in why
    assert host_feed.choose_placement("auto", int(limit * 0.2), share=0.25)[0] == "device"
    c = config_lib.load("baseline", "tiny")
    c.data.source = "demo"
    config_lib.validate(c)
    for field, value in (("placement", "disk"), ("device_share", 0.0), ("prefetch", 0)):
        bad = config_lib.load("baseline", "tiny")
        bad.data.source = "demo"
        bad.data[field] = value
        with pytest.raises(config_lib.ConfigError, match=f"config.data.{field}"):
            config_lib.validate(bad)


def _micro_diffusion(source, **data):
    c = config_lib.load("baseline", "tiny")
    c.data.source = source
    c.data.image_size = 8
    c.model.block_out_channels = "8,16"
    c.model.attention_head_dim = 1
    c.model.cross_attention_dim = 8
    c.model.norm_num_groups = 4
    c.train.progress = False
    c.train.num_steps, c.train.checkpoint_every, c.train.log_every = 6, 3, 1
    c.data.transpose = True
    for k, v in data.items():
        c.data[k] = v
    return c


def test_training_resumes_exactly_on_the_other_path(tmp_path, killed_after_first_checkpoint):
    """A diffusion run on the host path (chosen by ``auto`` against a device budget it exceeds), killed after
    its step-3 checkpoint and resumed on the device path, ends where an uninterrupted device-path run ends."""
    import json
    from conftest import make_tile_folder
    from fadjax import runs
    from fadjax import train as train_lib
    source = make_tile_folder(tmp_path / "tiles", per_class=10)
    device = train_lib.run(_micro_diffusion(source, placement="device"), tmp_path / "device")
    assert device["input_path"] == "device"
    with killed_after_first_checkpoint():
        train_lib.run(_micro_diffusion(source, device_share=1e-9), tmp_path / "switch")
    record = json.loads((tmp_path / "switch" / "run.json").read_text())
    assert record["input_path"]["path"] == "host" and "data.device_share 1e-09" in record["input_path"]["why"]
    resumed = train_lib.run(_micro_diffusion(source, placement="device"), tmp_path / "switch")
    assert resumed["start_step"] == 3 and resumed["input_path"] == "device"
    losses = {w: [r["loss"] for r in map(json.loads, (tmp_path / w / "metrics.jsonl").read_text().splitlines())]
              for w in ("device", "switch")}
    np.testing.assert_allclose(losses["switch"], losses["device"], rtol=1e-5)
    a = runs.load_diffusion_run(tmp_path / "device", use_ema=False).params
    b = runs.load_diffusion_run(tmp_path / "switch", use_ema=False).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_expert_trains_and_validates_alike_on_both_paths(tmp_path):
    """The expert stage (BatchNorm, validation read batch by batch from the map on the host path) ends with
    the same parameters and validation accuracy on either path."""
    from fadjax import runs
    from fadjax import train as train_lib

    def config(placement):
        c = config_lib.load("expert", "tiny")
        c.data.source, c.data.image_size, c.data.placement = "demo:12", 16, placement
        c.expert.width, c.expert.head_hidden = 4, 8
        c.train.batch_size, c.train.num_epochs, c.train.eval_batch_size = 8, 2, 12
        c.train.progress = False
        return c

    a = train_lib.run(config("device"), tmp_path / "device")
    b = train_lib.run(config("host"), tmp_path / "host")
    assert (a["input_path"], b["input_path"]) == ("device", "host") and a["final_step"] == b["final_step"] == 12
    assert b["best_val_accuracy"] == pytest.approx(a["best_val_accuracy"])
    va, vb = runs.load_expert_run(tmp_path / "device").variables, runs.load_expert_run(tmp_path / "host").variables
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), va, vb)
