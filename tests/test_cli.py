"""Every command line answers a user's mistake with one line naming it and a non-zero exit, no traceback."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("args, rc, needle", [
    (["-m", "fadjax.sample", "--workdir", "{tmp}", "--out", "{tmp}/gens"], 1, "is {tmp} a fadjax run's workdir?"),
    (["-m", "fadjax.sample", "--out", "{tmp}/gens"], 2, "--workdir"),
    (["-m", "fadjax.sample", "--workdir", "{tmp}", "--out", "{tmp}/g", "--steps=many"], 2, "--steps=many"),
    (["-m", "fadjax.reproduce", "--data", "folder:{tmp}/nope", "--out", "{tmp}/r"], 2, "no such folder"),
    (["-m", "fadjax.reproduce", "--preset", "cpu", "--out", "{tmp}/r"], 2, "--preset cpu needs --data"),
    (["-m", "fadjax.reproduce", "--out", "{tmp}/r", "--diffusion.train.num_stepz=3"], 2, "no field 'num_stepz'"),
    (["-m", "fadjax.reproduce", "--out", "{tmp}/r", "--unet.x=3"], 2, "unknown config group 'unet'"),
    (["-m", "fadjax.reproduce", "--out", "{tmp}/r", "--diffusion.model.block_out_channels=32,64,64"], 2,
     "model fad_xt: config.align.unet_feature: 'down_2_shortcut' is not a U-Net feature"),
    (["-m", "fadjax.evaluate", "--expert_workdir", "{tmp}", "--out", "{tmp}/e", "--generated", "{tmp}"], 1,
     "manifest.json is missing"),
    (["-m", "fadjax.report", "--runs", "{tmp}/a,{tmp}/b", "--out", "{tmp}/c"], 1, "has no metrics.json"),
    (["train.py", "--config", "configs/baseline.py:tiny", "--workdir", "{tmp}/t", "--config.train.batch_size=-3"],
     1, "config.train.batch_size: -3 must be > 0"),
    (["train.py", "--config", "configs/feature_aligned.py:tiny", "--workdir", "{tmp}/t"], 1,
     "config.align.expert_workdir: feature alignment needs a trained expert"),
])
def test_a_users_mistake_is_one_line(tmp_path, args, rc, needle):
    r = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == rc, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert needle.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]


@pytest.mark.parametrize("module, flag", [("fadjax.sample", "--workdir"), ("fadjax.evaluate", "--expert_workdir"),
                                          ("fadjax.report", "--runs"), ("fadjax.reproduce", "--GROUP.FIELD=VALUE")])
def test_help_lists_the_flags(module, flag):
    r = run("-m", module, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: python -m {module} [flags]") and flag in r.stdout, r.stdout


def test_reproduce_overrides_take_true_and_false():
    from fadjax.reproduce import presets
    _, overrides = presets.parse_overrides(["--diffusion.model.class_to_time=true", "--diffusion.cond.label_dropout=0"])
    configs = presets.build("tiny", data=None, seeds=None, expert_workdir="e", cache_dir=None, overrides=overrides,
                            pretrain_workdir="p")
    assert configs.models["baseline"].model.class_to_time is True
    assert configs.models["baseline"].cond.label_dropout == 0
