"""fadjax.utility: FD, precision/recall, TSTR/TRTR, augmentation gain, and `evaluate --utility`."""
import json
import math
import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from fadjax import cli
from fadjax import evaluate as evaluate_lib
from fadjax import utility
from fadjax.data import load, split
from fadjax.models import expert as expert_lib

CLASSES = ["tumor", "stroma", "empty"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One tiny recipe for every test here: one compiled train step shared by all of them (a two-stage
# ResNet of one block each: ResNet18's four stages take ~4x as long to compile on 2 cores).
SPEC = utility.ClassifierSpec(arch="resnet18", width=4, head_hidden=16, image_size=16, channels=1, lr=3e-3,
                              epochs=30, batch_size=32, stage_sizes=(1, 1))


def tiles(n, seed, shift=0.0, size=16):
    """``n`` grey tiles of 3 brightness classes (separable), labels 0,1,2,0,..."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(40.0 + 80.0 * y[:, None, None, None] + shift, 25.0, (n, size, size, 1))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int32)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert utility.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5])
    # Equal covariances: FD = |mu_a - mu_b|^2 exactly (the same sample, shifted).
    assert utility.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Independent samples of N(0, I) and N(shift, 4 I): |shift|^2 + d (1 + 4 - 2*2) = 5.25 + 3.
    b = rng.normal(size=(4000, 3)) * 2.0 + shift
    assert utility.frechet_distance(a, b) == pytest.approx(float(shift @ shift) + 3.0, rel=0.05)
    # A rank-deficient covariance (more dims than samples) still gives a finite, real number.
    assert math.isfinite(utility.frechet_distance(rng.normal(size=(5, 8)), rng.normal(size=(6, 8))))
    with pytest.raises(ValueError, match="same D"):
        utility.frechet_distance(a, a[:, :2])


def test_precision_recall_hand_checkable():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 4))
    assert utility.precision_recall(a, a, k=3) == (1.0, 1.0)
    assert utility.precision_recall(a, a + 100.0, k=3) == (0.0, 0.0)
    # Generated points collapsed near one end of a real line: precise (all inside), low recall.
    line = np.arange(20, dtype=np.float64)[:, None]  # real radii (3rd neighbour): 3 at the ends, 2 inside
    gen = np.array([[0.0], [0.2], [0.5], [0.9]])  # generated radii: 0.9, 0.7, 0.5, 0.9
    p, r = utility.precision_recall(line, gen, k=3)
    assert p == 1.0
    assert r == pytest.approx(2 / 20)  # Only the real points 0 and 1 lie in a generated ball.
    with pytest.raises(ValueError, match="more than 3 points"):
        utility.precision_recall(a, a[:3], k=3)


def test_real_reference_and_summaries():
    feats = np.random.default_rng(2).normal(size=(60, 3))
    ref = utility.real_reference(feats, seeds=(0, 1, 2))
    assert ref["n_half"] == 30
    for key in ("fd_judge2", "precision", "recall"):
        s = ref[key]
        assert set(s) >= {"mean", "per_seed", "ci95", "n"} and s["n"] == 3
        assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    assert 0.5 < ref["precision"]["mean"] <= 1.0 and ref["fd_judge2"]["mean"] < 1.0


def test_tstr_on_separable_data():
    gen, real_train, real_val = tiles(60, 0, shift=10.0), tiles(90, 1), tiles(30, 2)
    logs, cache = [], {}
    out = utility.tstr(*gen, real_train, real_val, spec=SPEC, seeds=(0, 1, 2), log=logs.append, cache=cache)
    for key in ("tstr_accuracy", "trtr_accuracy", "tstr_minus_trtr"):
        s = out[key]
        assert set(s["per_seed"]) == {"0", "1", "2"} and s["n"] == 3
        assert s["mean"] == pytest.approx(np.mean(list(s["per_seed"].values())))
        if s["std"] > 0:
            assert s["ci95"][0] < s["mean"] < s["ci95"][1]
    assert out["tstr_accuracy"]["mean"] > 0.8 and out["trtr_accuracy"]["mean"] > 0.8  # chance: 1/3
    assert out["num_train"] == {"generated": 60, "real": 60} and out["steps"] == {"tstr": 60, "trtr": 60}
    assert sum("TSTR seed" in line for line in logs) == 3 and sum("TRTR seed" in line for line in logs) == 3
    print(f"seconds per TSTR classifier (median): {out['seconds_per_classifier']:.2f}")

    # Another model with as many images per class: TRTR comes from the cache, not retrained.
    logs2 = []
    other = utility.tstr(*tiles(60, 5, shift=-10.0), real_train, real_val, spec=SPEC, seeds=(0, 1, 2),
                         log=logs2.append, cache=cache)
    assert other["trtr_accuracy"] == out["trtr_accuracy"] and len(cache) == 3
    assert not any("TRTR seed" in line and "steps" in line for line in logs2)

    # Generated images that look like another class than their label: TSTR learns the wrong map.
    mislabelled = (gen[0], (gen[1] + 1) % 3)
    bad = utility.tstr(*mislabelled, real_train, real_val, spec=SPEC, seeds=(0,), log=logs.append)
    assert bad["tstr_accuracy"]["mean"] < 0.2 and bad["tstr_accuracy"]["ci95"] == [None, None]


def fake_judge(tmp_path, spec=SPEC):
    """An ExpertRun-shaped judge: a real (untrained) tiny ResNet, tiles on disk and a split record."""
    root = tmp_path / "tiles"
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        folder = root / f"{k + 1:02d}_{name.upper()}"
        folder.mkdir(parents=True)
        for i in range(30):
            Image.fromarray(np.clip(rng.normal(40 + 80 * k, 25, (16, 16)), 0, 255).astype(np.uint8)).save(
                folder / f"{i}.png")
    source = f"folder:{root}"
    ds = load(source, image_size=16, channels=1, progress=False)
    train_idx, val_idx = split(ds.labels, seed=0, val_fraction=1 / 3)
    module = expert_lib.build_expert("resnet18", num_classes=3, width=4, head_hidden=16, stage_sizes=(1, 1))
    variables = expert_lib.init_expert(module, jax.random.key(0), image_size=16, in_channels=1)
    config = ml_collections.ConfigDict({
        "data": {"classes": None, "image_size": 16, "channels": 1, "hflip": True, "vflip": True},
        "expert": {"arch": "resnet18", "width": 4, "head_hidden": 16},
        "optim": {"lr": spec.lr, "weight_decay": 0.0}, "train": {"batch_size": 32, "num_epochs": spec.epochs}})
    return types.SimpleNamespace(
        workdir=str(tmp_path / "judge"), config=config, class_names=list(CLASSES), image_size=16, channels=1,
        val_accuracy=0.9, module=module, variables=variables,
        classify_fn=lambda x: module.apply(variables, x, train=False)[0],
        split={"train_idx": train_idx.tolist(), "val_idx": val_idx.tolist(), "files": list(ds.files),
               "source": source},
        load_val_data=lambda: (ds.images[val_idx], ds.labels[val_idx]),
        load_train_data=lambda: (ds.images[train_idx], ds.labels[train_idx]))


def write_generated(folder, seeds=(0, 1), per_class=10, size=16):
    """A fadjax.sample-style folder: seed_S/CLASS/i.png and manifest.json."""
    entries = []
    for s in seeds:
        rng = np.random.default_rng(100 + s)
        for k, c in enumerate(CLASSES):
            d = folder / f"seed_{s}" / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = np.clip(rng.normal(50 + 80 * k, 25, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
                entries.append({"seed": s, "class": c, "label": k, "index": i, "file": f"seed_{s}/{c}/{i}.png"})
    manifest = {"classes": CLASSES, "seeds": list(seeds), "num_per_class": per_class, "image_size": size,
                "channels": 1, "images": entries, "workdir": None, "counts": {"images": len(entries)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_utility_cli(tmp_path, monkeypatch):
    judge = fake_judge(tmp_path)
    monkeypatch.setitem(sys.modules, "fadjax.runs", types.SimpleNamespace(load_expert_run=lambda workdir: judge))
    gens = write_generated(tmp_path / "gens")
    out = tmp_path / "rep"
    real_spec_from_run = utility.spec_from_run
    monkeypatch.setattr(utility, "spec_from_run", lambda run, **kw: real_spec_from_run(run, stage_sizes=(1, 1), **kw))
    m = evaluate_lib.main(["--generated", gens, "--expert_workdir", "e", "--out", str(out), "--utility",
                           "--utility_seeds", "2", "--augment_fraction", "0.2"])
    saved = json.loads((out / "metrics.json").read_text())
    assert "accuracy" in saved and "utility" in saved  # The usual metrics, plus the utility ones.
    u = saved["utility"]
    assert set(utility.KEYS) <= set(u) and u == json.loads(json.dumps(m["utility"]))
    assert u["judge"]["role"] == "expert (no --judge2_workdir given)" and u["seeds"] == [0, 1]
    for key in ("tstr_accuracy", "trtr_accuracy", "augment_gain"):
        assert set(u[key]["per_seed"]) == {"0", "1"} and len(u[key]["ci95"]) == 2
    assert u["tstr_accuracy"]["mean"] > 0.6
    assert u["augment"]["fraction"] == 0.2 and u["augment"]["num_train"] == {"real": 12, "generated": 60}
    for key in ("fd_judge2", "precision", "recall"):
        assert set(u[key]["per_seed"]) == {"0", "1"} and u[key]["value"] is not None
        assert set(u["real_vs_real"][key]) >= {"mean", "ci95", "per_seed"}
    assert 0.0 <= u["precision"]["value"] <= 1.0 and 0.0 <= u["recall"]["value"] <= 1.0
    assert u["fd_judge2"]["n_real"] == 30 and u["fd_judge2"]["n_generated"] == 60
    assert "not Inception-FID" in u["notes"]
    spec = {k: v for k, v in u["classifier"].items() if k in SPEC.to_dict()}
    assert utility.ClassifierSpec(**{**spec, "stage_sizes": tuple(spec["stage_sizes"])}) == SPEC  # The judge's recipe.
    assert (out / "utility.png").stat().st_size > 0
    mem = saved["memorisation"]  # The memorisation check: generated vs validation tiles' nearest training tile.
    for space in ("pixels", "judge2"):
        assert mem[space]["n_generated"] == 60 and mem[space]["n_validation"] == 30 and mem[space]["threshold"] > 0
        assert 0.0 <= mem[space]["near_copies_generated"] <= 1.0
        assert mem[space]["near_copies_validation"] == pytest.approx(1 / 30)  # 1 of 30 below the 1% quantile.
    assert mem["n_train"] == 60 and len(mem["closest_pairs"]) == 8 and mem["same_split_as_generator"] is None
    assert all(p["generated_file"].startswith("seed_") and p["train_file"] for p in mem["closest_pairs"])
    assert (out / "memorisation.png").stat().st_size > 0

    # --judge2_workdir names the judge.
    m2 = evaluate_lib.evaluate_utility(gens, judge, str(tmp_path / "rep2"), judge_role="judge2", seeds=[0],
                                       spec_overrides={"epochs": 5})
    assert m2["judge"]["role"] == "judge2" and m2["classifier"]["epochs"] == 5
    assert m2["tstr_accuracy"]["ci95"] == [None, None]  # One seed: no interval.
    assert json.loads((tmp_path / "rep2" / "metrics.json").read_text())["utility"]["seeds"] == [0]


def test_utility_cli_bad_input(tmp_path, monkeypatch):
    for argv, needle in (
            (["--generated", str(tmp_path / "nope"), "--utility"], "--generated"),
            (["--utility"], "--utility needs --generated"),
            (["--generated", str(tmp_path), "--utility", "--augment_fraction", "0"], "--augment_fraction")):
        with pytest.raises(cli.UserError, match=needle):
            evaluate_lib.main(argv + ["--expert_workdir", "e", "--out", str(tmp_path / "o")])
    # The real command line: one line on stderr, no traceback, non-zero exit.
    proc = subprocess.run([sys.executable, "-m", "fadjax.evaluate", "--generated", str(tmp_path / "nope"),
                           "--expert_workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--utility"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_plot_several_models(tmp_path):
    from fadjax import plots
    s = utility.summarise({0: 0.8, 1: 0.7, 2: 0.75})
    d = {"value": 1.0, **utility.summarise({0: 1.1, 1: 0.9})}
    entry = {"tstr_accuracy": s, "trtr_accuracy": s, "augment_gain": utility.summarise({0: 0.02, 1: -0.01}),
             "augment": {"fraction": 0.1}, "fd_judge2": d, "precision": {**d, "value": 0.6},
             "recall": {**d, "value": 0.5}, "real_vs_real": {"fd_judge2": s, "precision": s, "recall": s}}
    plots.utility({"baseline": entry, "fad": entry}, tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 0
