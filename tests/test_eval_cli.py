"""sample -> evaluate -> report on tiny fake runs (objects shaped like fadjax.runs' loaded runs)."""
import json
import os
import sys
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from fadjax import cli
from fadjax import evaluate as evaluate_lib
from fadjax import report as report_lib
from fadjax import sample as sample_lib
from fadjax import sampling
from fadjax.data import load, split
from fadjax.diffusion import make_schedule

CLASSES = ["tumor", "stroma", "empty"]
W = jnp.asarray([0.3, -0.2, 0.5], jnp.float32)


def toy_eps(params, x, t, labels):
    return jnp.tanh(params * x + W[labels][:, None, None, None]) + (t.astype(jnp.float32) / 100.0)[:, None, None, None]


def toy_logits(x):
    """A fixed linear 'expert' on the mean brightness: dark -> tumor, mid -> stroma, bright -> empty."""
    m = jnp.mean(x, axis=(1, 2, 3))
    return jnp.stack([-8.0 * m + 2.0, jnp.zeros_like(m), 8.0 * m - 6.0], axis=-1)


def fake_run(workdir, params=0.5):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in (10, 20, 30):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "noise_loss": 0.8 / step,
                                "align_loss": 0.2 / step}) + "\n")
    config = ml_collections.ConfigDict({"sample": {
        "sampler": "ddim", "steps": 4, "num_per_class": 3, "seeds": "0-1", "exclude_classes": "empty",
        "guidance_scale": 1.0, "batch_size": 5}})
    return types.SimpleNamespace(
        workdir=str(workdir), config=config, step=30, class_names=list(CLASSES), params=params, eps_fn=toy_eps,
        schedule=make_schedule(20), image_size=8, channels=1,
        condition_labels={c: i for i, c in enumerate(CLASSES)}, null_label=None, used_ema=True, data_range="[0,1]")


def write_tiles(root, per_class=6, size=12, offset=0):
    rng = np.random.default_rng(offset)
    for k, name in enumerate(CLASSES):
        folder = os.path.join(root, f"{k + 1:02d}_{name.upper()}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            level = 40 + 80 * k
            Image.fromarray(np.clip(rng.normal(level, 30, (size, size)), 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{i}.png"))
    return f"folder:{root}"


def fake_expert(tmp_path, class_names=CLASSES):
    source = write_tiles(str(tmp_path / "tiles"))
    ds = load(source, image_size=16, channels=1, progress=False)
    train_idx, val_idx = split(ds.labels, seed=0, val_fraction=0.5)
    return types.SimpleNamespace(
        workdir=str(tmp_path / "expert"), config=ml_collections.ConfigDict({"data": {"classes": None}}),
        class_names=list(class_names), image_size=16, channels=1, val_accuracy=0.9, classify_fn=toy_logits,
        split={"train_idx": train_idx.tolist(), "val_idx": val_idx.tolist(), "files": list(ds.files),
               "source": source},
        load_val_data=lambda: (ds.images[val_idx], ds.labels[val_idx]))


def read_all(folder, manifest):
    return np.stack([evaluate_lib.read_png(os.path.join(folder, e["file"])) for e in manifest["images"]])


def test_generate_writes_images_and_manifest(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    out = str(tmp_path / "gens")
    manifest = sample_lib.generate(run, out, seeds=[0, 1], num_per_class=3, progress=False)
    assert manifest["classes"] == ["tumor", "stroma"]  # "empty" excluded by the run's config.
    assert manifest["counts"]["images"] == 12 and len(manifest["images"]) == 12
    assert manifest["sampler"] == "ddim" and manifest["steps"] == 4 and manifest["used_ema"]
    assert {"seed", "class", "label", "file"} <= set(manifest["images"][0])
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == manifest
    images = read_all(out, manifest)
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    assert os.path.exists(os.path.join(out, "seed_1", "stroma", "2.png"))

    # Another batch size, and a different class list, give the same images for the same (seed, class, i).
    other = sample_lib.generate(run, str(tmp_path / "gens_b1"), seeds=[1, 0], num_per_class=3, batch_size=1,
                                classes=["stroma", "tumor"], progress=False)
    again = {(e["seed"], e["class"], e["index"]): img
             for e, img in zip(other["images"], read_all(str(tmp_path / "gens_b1"), other))}
    for e, img in zip(manifest["images"], images):
        np.testing.assert_array_equal(img, again[(e["seed"], e["class"], e["index"])])

    # A re-run with the same settings samples nothing.
    def no_sampling(*a, **k):
        raise AssertionError("complete seeds must be skipped")
    monkeypatch.setattr(sampling, "sample", no_sampling)
    assert sample_lib.generate(run, out, seeds=[0, 1], num_per_class=3, progress=False) == manifest


def test_interrupted_generate_leaves_no_manifest(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run")
    out = str(tmp_path / "gens")
    sample_lib.generate(run, out, seeds=[0], num_per_class=2, progress=False)
    writes = []
    real_write = sample_lib._write_png

    def failing_write(path, image):
        writes.append(path)
        if len(writes) > 3:
            raise KeyboardInterrupt
        real_write(path, image)

    monkeypatch.setattr(sample_lib, "_write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        sample_lib.generate(run, out, seeds=[0, 1], num_per_class=3, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(FileNotFoundError, match="manifest"):
        evaluate_lib.read_manifest(out)
    monkeypatch.setattr(sample_lib, "_write_png", real_write)
    manifest = sample_lib.generate(run, out, seeds=[0, 1], num_per_class=3, progress=False)
    assert all(os.path.exists(os.path.join(out, e["file"])) for e in manifest["images"])


def test_evaluate_and_report(tmp_path):
    expert = fake_expert(tmp_path)
    reports = []
    for name, params in (("baseline", 0.5), ("fad", 0.9)):
        gens = str(tmp_path / "gens" / name)
        sample_lib.generate(fake_run(tmp_path / "runs" / name, params), gens, seeds=[0, 1, 2], num_per_class=3,
                            progress=False)
        out = str(tmp_path / "reports" / name)
        m = evaluate_lib.evaluate(gens, expert, out)
        reports.append(out)
        for png in ("confusion_generated.png", "confusion_real.png", "ssim.png", "grid.png"):
            assert os.path.getsize(os.path.join(out, png)) > 0
        with open(os.path.join(out, "metrics.json")) as f:
            assert json.load(f)["accuracy"]["mean"] == pytest.approx(m["accuracy"]["mean"])
        acc = m["accuracy"]
        assert set(acc["per_seed"]) == {"0", "1", "2"}
        assert acc["mean"] == pytest.approx(np.mean(list(acc["per_seed"].values())))
        assert acc["std"] == pytest.approx(np.std(list(acc["per_seed"].values()), ddof=1))
        cm = np.array(m["confusion_generated"]["counts"])
        assert cm.shape == (2, 3) and cm.sum() == 18
        assert m["confusion_generated"]["rows"] == ["tumor", "stroma"] and m["confusion_generated"]["cols"] == CLASSES
        assert 0.0 < m["ssim"]["generated"]["overall"] <= 1.0 and 0.0 < m["ssim"]["real"]["overall"] <= 1.0
        assert "validation split" in m["ssim"]["real_source"]
        val = m["expert_validation"]
        assert val["num_images"] == 9 and np.array(val["confusion"]["counts"]).sum() == 9
        assert val["accuracy"] == 1.0  # The toy tiles are separable by brightness.
        assert m["diffusion_run"]["metrics_jsonl"].endswith("metrics.jsonl")

    # Real images from another source than the expert's data.
    other = write_tiles(str(tmp_path / "other_tiles"), per_class=4, offset=1)
    m = evaluate_lib.evaluate(str(tmp_path / "gens" / "fad"), expert, str(tmp_path / "reports" / "other"), real=other)
    assert "all images" in m["ssim"]["real_source"]

    summary = report_lib.make_report(reports, str(tmp_path / "compare"))
    assert summary["baseline"] == "baseline"
    pd = summary["runs"]["fad"]["paired_difference_vs_baseline"]
    assert pd["n"] == 3 and pd["ci_low"] <= pd["mean"] <= pd["ci_high"]
    text = (tmp_path / "compare" / "report.md").read_text()
    assert "| baseline |" in text and "| fad |" in text and "SSIM real" in text
    for png in ("accuracy_per_seed.png", "ssim_per_class.png", "loss_curves.png", "confusion_fad.png",
                "confusion_real.png", "grid_baseline.png", "grid_fad.png"):
        assert os.path.getsize(tmp_path / "compare" / png) > 0
    assert json.loads((tmp_path / "compare" / "summary.json").read_text())["runs"]["fad"]["num_seeds"] == 3
    summary = report_lib.make_report(reports, str(tmp_path / "compare2"), labels=["B", "F"])
    assert set(summary["runs"]) == {"B", "F"}


def test_evaluate_errors(tmp_path):
    expert = fake_expert(tmp_path, class_names=["adipose", "debris", "empty"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no generated images"):
        evaluate_lib.evaluate(str(empty), expert, str(tmp_path / "r"))
    gens = str(tmp_path / "gens")
    sample_lib.generate(fake_run(tmp_path / "run"), gens, seeds=[0], num_per_class=2, progress=False)
    with pytest.raises(ValueError, match=r"expert classes \['adipose', 'debris', 'empty'\], "
                                         r"generated classes \['tumor', 'stroma'\]"):
        evaluate_lib.evaluate(gens, expert, str(tmp_path / "r"))


def test_command_lines(tmp_path, monkeypatch):
    """The three entry points with fadjax.runs replaced by loaders of the fakes."""
    run, expert = fake_run(tmp_path / "run"), fake_expert(tmp_path)
    loaded = {}

    def load_diffusion_run(workdir, *, step=None, use_ema=True):
        loaded.update(workdir=workdir, step=step, use_ema=use_ema)
        return run

    monkeypatch.setitem(sys.modules, "fadjax.runs", types.SimpleNamespace(
        load_diffusion_run=load_diffusion_run, load_expert_run=lambda workdir: expert))
    gens, rep = str(tmp_path / "gens"), str(tmp_path / "rep")
    manifest = sample_lib.main(["--workdir", run.workdir, "--out", gens, "--seeds", "0,3", "--num_per_class", "2",
                                "--classes", "stroma", "--sampler", "ddpm", "--no_ema", "--no_progress"])
    assert loaded == {"workdir": run.workdir, "step": None, "use_ema": False}
    assert manifest["seeds"] == [0, 3] and manifest["classes"] == ["stroma"]
    assert manifest["sampler"] == "ddpm" and manifest["steps"] == 20
    evaluate_lib.main(["--generated", gens, "--expert_workdir", "x", "--out", rep])
    report_lib.main(["--runs", rep, "--out", str(tmp_path / "cmp"), "--labels", "only"])
    assert (tmp_path / "cmp" / "report.md").exists()


def test_end_to_end_with_trained_runs(tmp_path):
    """train (tiny expert, micro U-Net) -> sample -> evaluate -> report through the command lines."""
    from fadjax import config_lib
    from fadjax import train as train_lib

    c = config_lib.load("expert", "tiny")
    c.data.source, c.data.image_size, c.data.val_fraction = "demo:4", 16, 0.5
    c.train.progress, c.train.num_epochs, c.train.batch_size = False, 1, 8
    train_lib.run(c, tmp_path / "expert")
    c = config_lib.load("baseline", "tiny")
    c.data.source, c.data.image_size, c.train.progress = "demo:4", 8, False
    c.model.block_out_channels, c.model.attention_head_dim, c.model.cross_attention_dim = "8,16", 1, 8
    c.model.norm_num_groups, c.train.num_steps, c.train.checkpoint_every = 4, 2, 2
    train_lib.run(c, tmp_path / "diff")

    reports = []
    for name, extra in (("ddim", []), ("ddpm", ["--sampler", "ddpm", "--steps", "20", "--batch_size", "7"])):
        gens, rep = str(tmp_path / "gens" / name), str(tmp_path / "rep" / name)
        manifest = sample_lib.main(["--workdir", str(tmp_path / "diff"), "--out", gens, "--seeds", "0-1",
                                    "--num_per_class", "2", "--no_progress"] + extra)
        assert manifest["counts"]["images"] == 2 * 2 * 5 and manifest["step"] == 2
        m = evaluate_lib.main(["--generated", gens, "--expert_workdir", str(tmp_path / "expert"), "--out", rep])
        assert m["accuracy"]["num_images"] == 20 and m["expert_validation"]["num_images"] == 10
        assert np.isfinite(m["ssim"]["real"]["overall"])
        reports.append(rep)
    # Without --generated the expert judges a real test set (here demo images it never saw: indices 4..9).
    real = evaluate_lib.main(["--expert_workdir", str(tmp_path / "expert"), "--real", "demo:10",
                              "--out", str(tmp_path / "test")])
    saved = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert saved["num_images"] == 50 and saved["per_class_count"] == {c: 10 for c in saved["confusion"]["rows"]}
    counts = np.asarray(saved["confusion"]["counts"])
    assert counts.sum() == 50 and saved["real_accuracy"] == pytest.approx(np.trace(counts) / 50)
    assert real["real_accuracy"] == saved["real_accuracy"] and 0 <= saved["real_accuracy"] <= 1
    assert set(saved["per_class_accuracy"]) == set(saved["confusion"]["rows"])
    assert (tmp_path / "test" / "confusion_real.png").stat().st_size > 0
    with pytest.raises(cli.UserError, match="--generated DIR"):
        evaluate_lib.main(["--expert_workdir", str(tmp_path / "expert"), "--out", str(tmp_path / "x")])
    summary = report_lib.main(["--runs", ",".join(reports), "--out", str(tmp_path / "cmp")])
    assert summary["runs"]["ddpm"]["paired_difference_vs_baseline"]["n"] == 2
    assert (tmp_path / "cmp" / "loss_curves.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        for f in ("config.json", "run.json"):
            (tmp_path / "empty" / f).write_text((tmp_path / "diff" / f).read_text())
        sample_lib.main(["--workdir", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
