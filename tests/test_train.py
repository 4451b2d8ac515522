"""End-to-end training on a small generated folder of Kather-like tiles: expert, baseline, feature-aligned,
resume after a crash, data-parallel modes against one device, and config errors."""
import json
import pathlib

import jax
import numpy as np
import pytest
from conftest import make_tile_folder

from fadjax import config_lib, runs
from fadjax import train as train_lib
from fadjax.train import common

PER_CLASS = 10


@pytest.fixture(scope="session")
def tiles(tmp_path_factory):
    """A folder source of PER_CLASS generated 150x150 grayscale tiles per Kather class (conftest)."""
    return make_tile_folder(tmp_path_factory.mktemp("tiles"), per_class=PER_CLASS)


def tiny_expert_config(source):
    c = config_lib.load("expert", "tiny")
    c.data.source = source
    c.train.progress = False
    return c


def tiny_diffusion_config(source, *, align, expert_workdir=None, arg="tiny"):
    c = config_lib.load("feature_aligned" if align else "baseline", arg)
    c.data.source = source
    c.train.progress = False
    if align:
        c.align.expert_workdir = str(expert_workdir)
    return c


def micro(c):
    """An even smaller U-Net for the multi-compile tests."""
    c.data.image_size = 8
    c.model.block_out_channels = "8,16"
    c.model.attention_head_dim = 1
    c.model.cross_attention_dim = 8
    c.model.norm_num_groups = 4
    c.train.num_steps = 2
    c.train.checkpoint_every = 2
    return c


def read_metrics(workdir):
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def expert_workdir(tiles, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("expert")
    summary = train_lib.run(tiny_expert_config(tiles), workdir)
    assert summary["final_step"] > 0
    return workdir


def test_expert_trains_validates_and_keeps_best(expert_workdir):
    ev = json.loads((expert_workdir / "expert_eval.json").read_text())
    assert 0.0 <= ev["val_accuracy"] <= 1.0
    conf = np.asarray(ev["confusion"])
    assert conf.shape == (8, 8) and conf.sum() == ev["num_val"] == 16  # 20% of 10 per class
    assert (expert_workdir / "confusion.png").stat().st_size > 1000
    rows = read_metrics(expert_workdir)
    assert any("val_accuracy" in r for r in rows) and all(np.isfinite(r["loss"]) for r in rows)
    exp = runs.load_expert_run(expert_workdir)
    assert exp.class_names == ["tumor", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "empty"]
    assert exp.val_accuracy == pytest.approx(max(r["val_accuracy"] for r in rows if "val_accuracy" in r))
    logits = exp.classify_fn(np.zeros((2, 16, 16, 1), np.float32))  # resized to the expert's 32 inside
    assert logits.shape == (2, 8)


def test_feature_aligned_tiny_run_logs_both_losses(tiles, expert_workdir, tmp_path):
    c = tiny_diffusion_config(tiles, align=True, expert_workdir=expert_workdir)
    summary = train_lib.run(c, tmp_path)
    assert summary["final_step"] == 6
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # every 2 steps and at each checkpoint
    for r in rows:
        assert {"loss", "noise_loss", "align_loss", "lr", "grad_norm", "img_per_s"} <= set(r)
        assert 0.0 <= r["align_loss"] <= 2.0
        assert r["loss"] == pytest.approx(r["noise_loss"] + r["align_loss"], rel=1e-5)
    record = json.loads((tmp_path / "run.json").read_text())
    assert len(record["expert"]["sha256"]) == 64
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    run = runs.load_diffusion_run(tmp_path)
    assert run.step == 6 and "proj" in run.params and "expert" not in run.params
    # The clean-input ablation is the same step with the expert on x0.
    c2 = tiny_diffusion_config(tiles, align=True, expert_workdir=expert_workdir, arg="tiny,clean")
    c2.train.num_steps = 2
    assert c2.align.expert_input == "clean"
    train_lib.run(c2, tmp_path / "clean")
    assert "align_loss" in read_metrics(tmp_path / "clean")[-1]


def test_resume_after_crash_matches_uninterrupted_run(tiles, tmp_path, killed_after_first_checkpoint):
    c = micro(tiny_diffusion_config(tiles, align=False))
    c.train.num_steps, c.train.checkpoint_every = 6, 3  # the tiny preset's schedule on the micro U-Net
    c.train.ema_decay = 0.9
    train_lib.run(c, tmp_path / "full")

    with killed_after_first_checkpoint():
        train_lib.run(c, tmp_path / "crash")
    assert [r["step"] for r in read_metrics(tmp_path / "crash")] == [2, 3]
    summary = train_lib.run(c, tmp_path / "crash")  # the same command again resumes
    assert summary["start_step"] == 3 and summary["final_step"] == 6
    assert [r["step"] for r in read_metrics(tmp_path / "crash")] == [2, 3, 4, 6]
    a = runs.load_diffusion_run(tmp_path / "full", use_ema=False).params
    b = runs.load_diffusion_run(tmp_path / "crash", use_ema=False).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    ea = runs.load_diffusion_run(tmp_path / "full").params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ea,
                 runs.load_diffusion_run(tmp_path / "crash").params)


def test_pmap_and_sharded_on_8_devices_match_one_device(tiles, tmp_path):
    assert jax.device_count() >= 8
    results = {}
    for name, parallel, n in (("one", "sharded", 1), ("sharded", "sharded", 8), ("pmap", "pmap", 8)):
        c = micro(tiny_diffusion_config(tiles, align=False))
        c.parallel, c.num_devices = parallel, n
        train_lib.run(c, tmp_path / name)
        results[name] = runs.load_diffusion_run(tmp_path / name, use_ema=False).params
    # Adam divides by sqrt(v): a gradient entry near zero, summed in another order across devices,
    # can move its parameter by up to ~lr per step (7.5e-4 here). Seen: 7.9e-5; allowed: 2e-4.
    # The logged loss catches a wrong gradient scale, which Adam's updates would hide.
    one_loss = read_metrics(tmp_path / "one")[-1]["loss"]
    for name in ("sharded", "pmap"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-4), results["one"], results[name])
        assert read_metrics(tmp_path / name)[-1]["loss"] == pytest.approx(one_loss, rel=1e-4)


@pytest.mark.parametrize("field,value,match", [
    ("align.unet_feature", "down_9", "align.unet_feature"),
    ("data.image_size", 9, "data.image_size"),
    ("align.weight", -1.0, "align.weight"),
    ("align.expert_workdir", None, "align.expert_workdir"),
    ("train.batch_size", 6, "train.batch_size"),
])
def test_bad_config_values_are_rejected_before_compiling(tiles, expert_workdir, tmp_path, field, value, match):
    c = micro(tiny_diffusion_config(tiles, align=True, expert_workdir=expert_workdir))
    c.num_devices = 4
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        train_lib.run(c, tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_non_finite_loss_stops_the_run_naming_the_step(tiles, tmp_path):
    c = micro(tiny_diffusion_config(tiles, align=False))
    c.optim.lr = 1e30  # Adam's first update throws every weight to ~1e30: the next loss overflows.
    c.optim.schedule = "constant"
    c.train.num_steps, c.train.checkpoint_every, c.train.log_every = 6, 1, 1
    with pytest.raises(common.NonFiniteLossError, match=r"at step (\d+)") as err:
        train_lib.run(c, tmp_path)
    bad = int(__import__("re").search(r"at step (\d+)", str(err.value)).group(1))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad  # Only steps before the bad one were saved.
    params = runs.load_diffusion_run(tmp_path, use_ema=False).params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_bad_config_value_is_one_line_and_a_nonzero_exit(tmp_path):
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/baseline.py:tiny", "--workdir",
                        str(tmp_path / "w"), "--config.train.batch_size=-3"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip() == "train.py: config.train.batch_size: -3 must be > 0", r.stderr
    assert "Traceback" not in r.stdout + r.stderr
