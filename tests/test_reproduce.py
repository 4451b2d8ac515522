"""``python -m fadjax.reproduce``: the micro preset end to end on the demo source (2 seeds), then the
same command again, which must skip every stage; presets, overrides, deviations and verdicts."""
import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from fadjax import checkpoints, config_lib

from fadjax.reproduce import pipeline, presets, summary
from fadjax.reproduce.__main__ import main as reproduce_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ["baseline", "fad_xt", "fad_x0"]
# XLA's CPU backend spends most of a micro run compiling; these make its compiles ~2x cheaper.
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
XLA_CACHE = os.environ.get("FADJAX_TEST_XLA_CACHE", str(pathlib.Path.home() / ".cache" / "fadjax-test-xla"))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The micro preset with 2 seeds, in a fresh process (one CPU device, its own XLA flags)."""
    out = tmp_path_factory.mktemp("reproduce") / "micro"
    argv = ["--preset", "micro", "--out", str(out), "--seeds", "0-1", "--xla_cache", XLA_CACHE, "--jobs", "3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": CPU_FAST_COMPILE, "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fadjax.reproduce", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, argv, proc.stdout, time.perf_counter() - t


def test_micro_preset_end_to_end(micro_run):
    out, _, stdout, _ = micro_run
    for m in MODELS:
        for folder in (f"runs/{m}/checkpoints", f"gens/{m}/seed_0", f"gens/{m}/seed_1"):
            assert (out / folder).is_dir(), folder
        for f in (f"gens/{m}/manifest.json", f"eval/{m}/metrics.json", f"eval2/{m}/metrics.json"):
            assert (out / f).is_file(), f
    for judge in ("expert", "judge2"):
        assert (out / "runs" / judge / "expert_eval.json").is_file()
        for f in ("report.md", "summary.json", "accuracy_per_seed.png", "ssim_per_class.png", "confusion_real.png",
                  "grid_baseline.png", "confusion_fad_xt.png", "loss_curves.png"):
            assert (out / f"report_{judge}" / f).is_file(), f
    for f in ("report.md", "summary.json", "stages.json", "accuracy_by_judge.png", "utility.png"):
        assert (out / f).is_file(), f

    # The same seeds and classes for every model.
    manifests = [json.loads((out / "gens" / m / "manifest.json").read_text()) for m in MODELS]
    assert all(mf["seeds"] == [0, 1] for mf in manifests)
    assert len({tuple(mf["classes"]) for mf in manifests}) == 1
    # Both judges trained on the same split, with different architectures.
    splits = [json.loads((out / "runs" / j / "split.json").read_text()) for j in ("expert", "judge2")]
    assert splits[0]["train"]["indices"] == splits[1]["train"]["indices"]

    s = json.loads((out / "summary.json").read_text())
    assert s["preset"] == "micro" and s["data"] == "demo:24" and s["paper_judge"] == "expert"
    assert s["seeds"] == [0, 1] and s["baseline"] == "baseline"
    assert s["judges"]["expert"]["arch"] != s["judges"]["judge2"]["arch"]
    for j in ("expert", "judge2"):
        assert 0.0 <= s["judges"][j]["val_accuracy"] <= 1.0
    assert set(s["models"]) == set(MODELS)
    for m in MODELS:
        r = s["models"][m]
        assert {"accuracy", "paired_difference_vs_baseline", "ssim_generated", "ssim_real"} <= set(r)
        for j in ("expert", "judge2"):
            acc = r["accuracy"][j]
            assert 0.0 <= acc["mean"] <= 1.0 and acc["std"] >= 0.0 and set(acc["per_seed"]) == {"0", "1"}
            assert set(acc["per_class"]) == set(manifests[0]["classes"])
        u = r["utility"]  # Usefulness: TSTR with its real-trained reference, gain, FD, precision, recall.
        for k in ("tstr_accuracy", "trtr_accuracy", "augment_gain"):
            assert set(u[k]["per_seed"]) == {"0", "1"} and len(u[k]["ci95"]) == 2, k
        assert 0.0 <= u["tstr_accuracy"]["mean"] <= 1.0 and u["fd_judge2"]["value"] >= 0.0
        assert 0.0 <= u["precision"]["value"] <= 1.0 and 0.0 <= u["recall"]["value"] <= 1.0
        assert set(u["real_vs_real"]) >= {"fd_judge2", "precision", "recall"}
        mem = r["memorisation"]  # Nearest training tiles of generated vs validation tiles, and the closest pairs.
        for space in ("pixels", "judge2"):
            assert 0.0 <= mem[space]["near_copies_generated"] <= 1.0 and mem[space]["median_validation"] > 0.0
        assert mem["same_split_as_generator"] is True and (out / mem["figure"]).is_file()
        assert mem["figure"] == f"utility/{m}/memorisation.png"
        assert r["training"]["wall_s"] > 0
        for j in ("expert", "judge2"):
            pd = r["paired_difference_vs_baseline"][j]
            if m == "baseline":
                assert pd is None
            else:
                assert pd["n"] == 2 and pd["ci_low"] <= pd["mean"] <= pd["ci_high"]
        assert 0.0 < r["ssim_real"] <= 1.0
    assert set(s["table_i_xt_minus_x0"]) == {"expert", "judge2"}
    assert len(s["conclusions"]) == 6
    assert all(re.search(r"\]: (significant \(\S+ is (better|worse)\)|not significant \(no detectable difference\))", c)
               for c in s["conclusions"]), s["conclusions"]
    assert any(d.startswith("data: demo:24") for d in s["deviations"])
    assert "sampling: 2 seeds 0-1 (paper: 15)" in s["deviations"]
    assert s["hardware"]["device_count"] >= 1 and s["hardware"]["device_kind"]
    assert "jax" in s["versions"] and s["commands"] and "--seeds 0-1" in s["commands"][-1]
    assert set(s["stages_wall_s"]) >= {"train/expert", "train/judge2", "sample/fad_x0", "eval/judge2/fad_xt"}

    report = (out / "report.md").read_text()
    for text in ("Deviations from the paper", "aligned on x_t minus baseline, judged by expert",
                 "judged by judge2", "Hardware and software", "Stages (wall time", "python -m fadjax.reproduce",
                 "report_expert/confusion_fad_xt.png", "report_judge2/accuracy_per_seed.png",
                 "## Usefulness of the synthetic data", "real vs real", "## Training of each model",
                 "## Memorisation", "utility/fad_x0/memorisation.png"):
        assert text in report, text
    assert "train/fad_x0: done" in stdout

    # Learning curves: every model sampled and judged at 1/4, 1/2, 3/4 and the end of its 4 steps (batch 8,
    # no pre-training in micro), from checkpoints kept although keep_checkpoints is 3.
    lc = s["learning_curves"]
    assert list(lc["runs"]) == MODELS and lc["num_images"] == 2 * len(manifests[0]["classes"])
    for m in MODELS:
        assert checkpoints.saved_steps(out / "runs" / m / "checkpoints") == [1, 2, 3, 4]
        points = lc["runs"][m]["points"]
        assert [p["step"] for p in points] == [1, 2, 3, 4] and [p["fraction"] for p in points] == [0.25, 0.5, 0.75, 1]
        assert [p["images_seen"] for p in points] == [8, 16, 24, 32]
        assert all(p["fd_judge2"] >= 0.0 and 0.0 <= p["accuracy_judge2"] <= 1.0 for p in points)
        assert lc["runs"][m]["used_ema"] is False  # micro keeps no EMA: the raw weights.
        assert (out / "curves" / m / "step_1" / "manifest.json").is_file()
    assert (out / "learning_curves.png").is_file() and "learning_curves.png" in report
    assert "## Learning curves" in report and "from the checkpoint's raw weights (the runs keep no EMA)" in report
    assert re.search(r"curve/baseline: done in .*4 checkpoints: FD", stdout)

    stages = json.loads((out / "stages.json").read_text())
    assert all(v["complete"] for v in stages["stages"].values()) and len(stages["stages"]) == 21
    assert stages["jobs"] == 3 and s["jobs"] == 3 and 0 < s["elapsed_s"]


def test_execute_runs_after_dependencies_and_reports_the_first_error(tmp_path):
    log = []

    def task(name, deps=(), fail=False):
        def fn():
            time.sleep(0.05)
            log.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")
        return pipeline.Task(name, tuple(deps), name, lambda: False, fn)

    book = pipeline.Book(tmp_path, "cmd", echo=False)
    pipeline.execute([task("a"), task("b", ["a"]), task("c"), task("d", ["b", "c"])], book, jobs=3)
    assert log.index("a") < log.index("b") < log.index("d") and log.index("c") < log.index("d")
    log.clear()
    (tmp_path / "2").mkdir()
    with pytest.raises(RuntimeError, match="x failed"):
        pipeline.execute([task("x", fail=True), task("y"), task("z", ["x"])],
                         pipeline.Book(tmp_path / "2", "cmd", echo=False), jobs=2)
    assert "z" not in log and "y" in log

    # An interrupt returns at once, the stage in flight recorded as incomplete with its time so far.
    (tmp_path / "3").mkdir()
    book = pipeline.Book(tmp_path / "3", "cmd", echo=False)
    # A shell's background job starts with SIGINT ignored, and Python keeps it so: restore Python's handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt():
        time.sleep(0.2)
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.3)

    t = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.execute([pipeline.Task("slow", (), "s", lambda: False, lambda: time.sleep(5)),
                              pipeline.Task("irq", (), "i", lambda: False, interrupt)], book, jobs=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t < 4
    slow = json.loads((tmp_path / "3" / "stages.json").read_text())["stages"]["slow"]
    assert not slow["complete"] and slow["wall_s"] > 0.1 and "interrupted" in slow


def test_second_invocation_skips_every_stage(micro_run):
    out, argv, _, _ = micro_run
    t = time.perf_counter()
    s = reproduce_main(argv)
    assert time.perf_counter() - t < 30
    assert s["preset"] == "micro"
    last = json.loads((out / "stages.json").read_text())["invocations"][-1]
    assert last["ran"] == [] and len(last["skipped"]) == 21  # 15 + a utility and a curve stage per model


def test_changed_training_settings_are_refused(micro_run):
    out, argv, _, _ = micro_run
    with pytest.raises(pipeline.ReproduceError, match=r"train\.num_steps: 4 \(there\) != 5 \(now\)"):
        reproduce_main(argv + ["--diffusion.train.num_steps=5"])
    # Sampling settings are not training settings: other seeds only redo sampling onwards.
    configs = presets.build("micro", data=None, seeds="0-2", expert_workdir=str(out / "runs" / "expert"),
                            cache_dir=str(out / "cache"))
    for name, c in configs.models.items():
        pipeline.check_workdir(out / "runs" / name, c)


def test_models_choice_trains_a_variant_beside_the_completed_stages(micro_run):
    out, argv, _, _ = micro_run
    s = reproduce_main(argv + ["--models", "repa_tokens_x0"])
    last = json.loads((out / "stages.json").read_text())["invocations"][-1]
    assert sorted(last["ran"]) == ["curve/repa_tokens_x0", "eval/expert/repa_tokens_x0", "eval/judge2/repa_tokens_x0",
                                   "report", "sample/repa_tokens_x0", "train/repa_tokens_x0", "utility/repa_tokens_x0"]
    assert {"train/expert", "train/judge2", "train/baseline", "sample/baseline"} <= set(last["skipped"])
    assert list(s["models"]) == ["baseline", "repa_tokens_x0"]
    assert s["models"]["repa_tokens_x0"]["label"] == "tokens+MLP on x0"
    resolved = json.loads((out / "runs" / "repa_tokens_x0" / "config.json").read_text())
    assert resolved["align"]["mode"] == "tokens" and resolved["align"]["projector"] == "mlp"
    report = (out / "report.md").read_text()
    assert "align.mode = 'tokens' (paper: one pooled vector per image)" in report
    with pytest.raises(SystemExit):
        reproduce_main(argv + ["--models", "baseline,nope"])


def test_presets_resolve_and_list_their_deviations():
    paper = presets.build("paper", data="folder:/x", seeds=None, expert_workdir="e", cache_dir="c")
    assert paper.expert.expert.arch == "resnet50" and paper.judge2.expert.arch == "resnet34"
    assert paper.judge2.seed != paper.expert.seed and paper.judge2.data.split_seed == paper.expert.data.split_seed
    assert paper.models["fad_x0"].align.expert_input == "clean" and paper.models["fad_xt"].align.expert_input == "noisy"
    assert not paper.models["baseline"].align.enabled
    assert paper.expert.data.cache == "c/data_224px_1ch.npz"
    assert paper.models["baseline"].data.cache == "c/data_64px_1ch.npz"
    # The configs' defaults differ from the paper only where weights must be supplied.
    assert presets.deviations(paper) == [
        "expert: expert.pretrained = None (paper: ImageNet-1k initialisation)",
        "diffusion (all models): model.pretrained = None (paper: segmind/tiny-sd weights (conv_in/conv_out fresh))",
        "diffusion (all models): cond.mode = 'class_embed' (paper: CLIP text features of the class name)"]

    with pytest.raises(config_lib.ConfigError, match="data.source"):  # nothing is downloaded unless named
        presets.build("fast", data=None, seeds=None, expert_workdir="e", cache_dir="c")
    fast = presets.build("fast", data="folder:/x", seeds=None, expert_workdir="e", cache_dir="c")
    d = presets.deviations(fast)
    assert "diffusion (all models): train.num_steps = 400 (paper: 20 epochs)" in d
    assert "diffusion (all models): sample.sampler = 'ddim' (paper: DDPM)" in d
    assert not any(x.startswith("sampling:") for x in d)  # 15 seeds, as the paper
    assert fast.judge2.expert.arch == "resnet18" and fast.judge2.data.image_size == 64
    assert {c.data.cache for c in (fast.expert, fast.judge2, *fast.models.values())} == {"c/data_64px_1ch.npz"}

    rest, o = presets.parse_overrides(["--diffusion.model.block_out_channels=8,16", "--judge2.expert.arch=resnet18",
                                       "--preset", "micro", "--fad_xt.align.weight=0.5",
                                       "--diffusion.train.ema_decay=None", "--jobs=2"])
    assert rest == ["--preset", "micro", "--jobs=2"]  # The flags that are not config fields.
    tiny = presets.build("micro", data="demo:10", seeds="3,5", expert_workdir="e", cache_dir=None, overrides=o)
    assert tiny.models["fad_x0"].model.block_out_channels == "8,16" and tiny.judge2.expert.arch == "resnet18"
    assert tiny.models["fad_xt"].align.weight == 0.5 and tiny.models["fad_x0"].align.weight == 1.0
    assert tiny.sample.seeds == "3,5" and tiny.expert.data.source == "demo:10" and tiny.expert.data.cache is None
    assert "fad_xt: align.weight = 0.5 (paper: w2 = 1)" in presets.deviations(tiny)  # only fad_xt has it
    with pytest.raises(presets.PresetError, match="unknown config group 'model'"):
        presets.parse_overrides(["--model.x=1"])
    with pytest.raises(presets.PresetError, match="expected --GROUP.FIELD=VALUE"):
        presets.parse_overrides(["--diffusion.train.num_steps", "3"])
    with pytest.raises(presets.PresetError, match="no field 'num_stepz'"):
        presets.build("micro", data=None, seeds=None, expert_workdir="e", cache_dir=None,
                      overrides=presets.parse_overrides(["--diffusion.train.num_stepz=3"])[1])
    with pytest.raises(presets.PresetError, match="sample"):
        presets.build("micro", data=None, seeds=None, expert_workdir="e", cache_dir=None,
                      overrides=presets.parse_overrides(["--fad_xt.sample.steps=7"])[1])
    with pytest.raises(presets.PresetError, match="no shared pre-training"):
        presets.build("micro", data=None, seeds=None, expert_workdir="e", cache_dir=None,
                      overrides=presets.parse_overrides(["--pretrain.train.num_steps=7"])[1])


def test_a_preset_with_a_pretrain_group_starts_every_model_from_one_pretraining(tmp_path):
    _, o = presets.parse_overrides(["--pretrain.train.num_steps=30", "--diffusion.train.num_steps=7"])
    c = presets.build("tiny", data=None, seeds=None, expert_workdir="e", cache_dir=None, overrides=o,
                      pretrain_workdir="runs/pretrain")
    assert c.pretrain is not None and not c.pretrain.align.enabled and c.pretrain.init_from is None
    assert c.pretrain.train.num_steps == 30 and c.pretrain.model == c.models["baseline"].model
    assert {m.init_from for m in c.models.values()} == {"runs/pretrain"}
    assert {m.train.num_steps for m in c.models.values()} == {7}
    assert any("shared pre-training of the U-Net here (30 steps" in d for d in presets.deviations(c))
    tasks, paths = pipeline.plan(c, tmp_path)
    by = {t.name: t for t in tasks}
    assert "train/pretrain" in by["train/baseline"].deps and "train/pretrain" in by["train/fad_xt"].deps
    assert set(by["train/fad_x0"].deps) == {"train/pretrain", "train/expert"}
    assert paths["runs"]["pretrain"] == tmp_path / "runs" / "pretrain"
    with pytest.raises(presets.PresetError, match="pretrain_workdir"):
        presets.build("tiny", data=None, seeds=None, expert_workdir="e", cache_dir=None)


def test_verdict_sentences_follow_the_numbers():
    sig = {"n": 15, "mean": 0.031, "ci_low": 0.002, "ci_high": 0.06}
    assert summary.verdict("A", "B", "expert", sig) == (
        "A minus B, judged by expert: +3.1 points over 15 seed(s), 95% CI [+0.2, +6.0]: significant (A is better).")
    worse = {"n": 15, "mean": -0.05, "ci_low": -0.08, "ci_high": -0.01}
    assert summary.verdict("A", "B", "j", worse).endswith("significant (A is worse).")
    ns = {"n": 15, "mean": 0.01, "ci_low": -0.02, "ci_high": 0.04}
    assert summary.verdict("A", "B", "j", ns).endswith("not significant (no detectable difference).")
    one = {"n": 1, "mean": 0.1, "ci_low": None, "ci_high": None}
    assert "no interval" in summary.verdict("A", "B", "j", one)
