"""A run survives its user's mistakes and its machine's faults (fadjax.workdir): one run per workdir,
config drift on resume, SIGTERM's save, a damaged checkpoint, a full disk, and sample's partial output."""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fadjax import checkpoints
from fadjax import config_lib
from fadjax import sample as sample_lib
from fadjax import train as train_lib
from fadjax import workdir as workdir_lib
from fadjax.diffusion import make_schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]


def micro_config(**train):
    """The baseline's tiny config on the demo data with a micro U-Net (seconds on a CPU)."""
    c = config_lib.load("baseline", "tiny")
    c.data.source = "demo:4"
    c.data.image_size = 8
    c.model.block_out_channels = "8,16"
    c.model.attention_head_dim = 1
    c.model.cross_attention_dim = 8
    c.model.norm_num_groups = 4
    c.train.progress = False
    c.num_devices = 1  # Compiles faster than over the suite's 8 virtual devices.
    c.train.num_steps, c.train.checkpoint_every, c.train.log_every = 4, 2, 1
    for k, v in train.items():
        c.train[k] = v
    return c


MICRO_FLAGS = ["--config.num_devices=1", "--config.data.source=demo:4", "--config.data.image_size=8", "--config.model.block_out_channels=8,16",
               "--config.model.attention_head_dim=1", "--config.model.cross_attention_dim=8",
               "--config.model.norm_num_groups=4", "--config.train.progress=False"]


def train_py(workdir, *flags, **kw):
    """``python train.py`` on the micro config (a subprocess, sharing the suite's compilation cache)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir or ""),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "train.py", "--config", "configs/baseline.py:tiny", "--workdir", str(workdir),
           *MICRO_FLAGS, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def metric_steps(workdir):
    return [json.loads(l)["step"] for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished micro run (checkpoints at steps 2 and 4), copied by the tests that change it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train_lib.run(micro_config(), workdir)
    return workdir


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ----------------------------------------------------------------------------- 1. one run per workdir

def test_a_locked_workdir_stops_a_second_run_at_once_and_a_dead_holder_does_not_block(tmp_path):
    workdir = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fadjax.workdir import WorkdirLock; "
         "WorkdirLock(sys.argv[1], what='training run').acquire(); print('held', flush=True); time.sleep(120)",
         str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        with pytest.raises(workdir_lib.WorkdirLocked, match=rf"in use by another training run \(training run pid "
                                                            rf"{holder.pid} on host .*, started 20"):
            train_lib.run(micro_config(), workdir)
        assert time.time() - t0 < 5  # Before any data, model or compilation.
        assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # Touched nothing.
    finally:
        holder.kill()  # SIGKILL: no clean-up ran; the OS dropped the flock.
        holder.wait()
    with workdir_lib.WorkdirLock(workdir):  # The dead holder's lock file does not block.
        with pytest.raises(workdir_lib.WorkdirLocked):  # ... while a live one (this process) does.
            workdir_lib.WorkdirLock(workdir).acquire()
    workdir_lib.WorkdirLock(workdir).acquire().release()


# ----------------------------------------------------------------------------- 3. SIGTERM (and 1. via train.py)

def test_sigterm_saves_the_current_step_and_the_rerun_continues(tmp_path, monkeypatch):
    workdir = tmp_path / "w"
    run = train_py(workdir, "--config.train.num_steps=100000", "--config.train.log_every=1",
                   "--config.train.checkpoint_every=100000")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((workdir / "metrics.jsonl").exists() and
                                              len(metric_steps(workdir)) >= 3):
            assert run.poll() is None, run.communicate()
            time.sleep(0.2)
        # A second train.py on the live run's workdir stops at once, naming the holder.
        second = train_py(workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000")
        _, err2 = second.communicate(timeout=120)
        assert second.returncode != 0
        line = last_line(err2)
        assert line.startswith(f"train.py: {workdir} is in use by another training run (training run pid {run.pid} "
                               f"on host "), line
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    line = last_line(err)
    assert line.startswith("train.py: stopped by SIGTERM at step "), line
    step = int(line.split("at step ")[1].split(":")[0])
    assert f"checkpoint saved in {workdir / 'checkpoints'}" in line and "rerun the same command" in line
    assert checkpoints.saved_steps(workdir / "checkpoints") == [step] and metric_steps(workdir)[-1] == step

    # The rerun (in this process) resumes at that step and loses none; a stop request there saves too.
    calls = []
    monkeypatch.setattr(workdir_lib, "stop_requested", lambda: calls.append(1) or len(calls) >= 2)
    c = micro_config(num_steps=100000, checkpoint_every=100000)
    with pytest.raises(workdir_lib.Preempted, match=f"stopped by SIGTERM at step {step + 2}: checkpoint saved"):
        train_lib.run(c, workdir)
    assert metric_steps(workdir)[-3:] == [step, step + 1, step + 2]
    assert checkpoints.saved_steps(workdir / "checkpoints") == [step, step + 2]


# ----------------------------------------------------------------------------- 2. config drift

def test_config_drift_on_resume_is_named_extensions_are_accepted_and_allowed_changes_recorded(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "w")
    c = micro_config()
    c.seed = 1
    c.model.block_out_channels = "8,8"
    with pytest.raises(workdir_lib.ConfigDrift) as e:
        train_lib.run(c, workdir)
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.block_out_channels '8,16' -> '8,8'" in msg and "seed 0 -> 1" in msg
    assert "Use a new --workdir, or pass --config.train.allow_config_change=True" in msg
    with pytest.raises(workdir_lib.ConfigDrift, match=r"train.num_steps 4 -> 3"):  # Shorter: not an extension.
        train_lib.run(micro_config(num_steps=3), workdir)

    # Extending and observing are accepted and recorded.
    summary = train_lib.run(micro_config(num_steps=6, log_every=2, checkpoint_every=3), workdir)
    assert summary["start_step"] == 4 and summary["final_step"] == 6
    changes = json.loads((workdir / "run.json").read_text())["config_changes"]
    assert {(ch["field"], ch["old"], ch["new"], ch["kind"]) for ch in changes} == {
        ("train.num_steps", 4, 6, "extend"), ("train.log_every", 1, 2, "observe"),
        ("train.checkpoint_every", 2, 3, "observe")}

    # An explicit allow_config_change continues with the change, recorded (with the earlier ones).
    c = micro_config(num_steps=8, log_every=2, checkpoint_every=3, allow_config_change=True)
    c.optim.lr = 5e-4
    assert train_lib.run(c, workdir)["final_step"] == 8
    changes = json.loads((workdir / "run.json").read_text())["config_changes"]
    assert ("optim.lr", 1e-3, 5e-4, "allowed") in {(ch["field"], ch["old"], ch["new"], ch["kind"]) for ch in changes}
    assert ("train.num_steps", 4, 6, "extend") in {(ch["field"], ch["old"], ch["new"], ch["kind"]) for ch in changes}


def test_config_drift_through_train_py_is_one_line_and_a_nonzero_exit(trained, tmp_path):
    workdir = copy_run(trained, tmp_path / "w")
    r = train_py(workdir, "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
                 "--config.train.log_every=1", "--config.data.image_size=16")
    _, err = r.communicate(timeout=180)
    assert r.returncode != 0
    line = last_line(err)
    assert line.startswith(f"train.py: the run in {workdir} was trained with other settings: "
                           f"data.image_size 8 -> 16. Use a new --workdir"), line


# ----------------------------------------------------------------------------- 4. damaged checkpoint, full disk

def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one_and_nothing_is_deleted(trained, tmp_path, capfd):
    workdir = copy_run(trained, tmp_path / "w")
    victim = _largest_file(workdir / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d")  # Array data.
    size = victim.stat().st_size
    with open(victim, "r+b") as f:  # A copy cut short.
        f.truncate(size // 2)
    rel = victim.relative_to(workdir / "checkpoints" / "4")
    summary = train_lib.run(micro_config(num_steps=6), workdir)
    err = capfd.readouterr().err
    assert f"checkpoint {workdir / 'checkpoints' / '4'} cannot be read" in err
    assert summary["start_step"] == 2 and summary["final_step"] == 6
    kept = workdir / "checkpoints_damaged" / "4" / rel
    assert kept.stat().st_size == size // 2  # Kept as it was, out of orbax's way.
    assert checkpoints.saved_steps(workdir / "checkpoints")[-2:] == [4, 6]  # Step 4 trained and saved again.


def test_restore_readable_skips_a_checkpoint_with_a_removed_file(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path / "c", keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": np.full((3,), step, np.float32)}, {"step": step})
    ckpt.wait()
    (tmp_path / "c" / "2" / "meta" / "metadata").unlink()  # Removed (e.g. by a full disk's clean-up).
    step, tree, meta = ckpt.restore_readable()
    assert step == 1 and meta == {"step": 1} and np.asarray(tree["w"]).tolist() == [1, 1, 1]
    assert (tmp_path / "c_damaged" / "2").is_dir() and ckpt.latest_step() == 1
    ckpt.close()
    with pytest.raises(workdir_lib.WorkdirError, match="no readable checkpoint"):
        bad = checkpoints.Checkpointer(tmp_path / "d", keep=3)
        bad.save(1, {"w": np.zeros(2, np.float32)}, {"step": 1})
        bad.wait()
        for p in (tmp_path / "d" / "1" / "state").rglob("*"):
            if p.is_file():
                p.write_bytes(b"")
        bad.restore_readable()


def test_the_manifest_names_a_truncated_or_changed_file(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path / "c", keep=3)
    ckpt.save(1, {"w": np.arange(4096, dtype=np.float32)}, {"step": 1})
    step_dir = tmp_path / "c" / "1"
    checkpoints.verify_manifest(step_dir)  # Intact.
    victim = _largest_file(step_dir)
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # Same size, one bit flipped.
    with pytest.raises(checkpoints.DamagedCheckpoint, match="differs from the file that was saved"):
        checkpoints.verify_manifest(step_dir)
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoints.DamagedCheckpoint, match=f"has {len(data) // 2} bytes, {len(data)} were saved"):
        checkpoints.verify_manifest(step_dir)
    victim.unlink()
    with pytest.raises(checkpoints.DamagedCheckpoint, match="is missing"):
        checkpoints.verify_manifest(step_dir)
    ckpt.close()


def test_checkpointers_saving_at_once_in_threads_all_finish(tmp_path):
    """reproduce trains stages in threads; orbax's process-wide operation counter made concurrent saves
    wait for each other's signals until a 300 s timeout (seen in CI). Saves are serialised now."""
    import concurrent.futures

    def run(name):
        ckpt = checkpoints.Checkpointer(tmp_path / name, keep=2)
        for step in range(1, 6):
            ckpt.save(step, {"w": np.full((256,), step, np.float32)}, {"step": step})
        ckpt.close()
        return checkpoints.Checkpointer(tmp_path / name, keep=2, read_only=True).restore_readable()

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, ["a", "b", "c"]))
    assert time.perf_counter() - t < 120
    for step, tree, meta in results:
        assert step == 5 and meta == {"step": 5} and np.asarray(tree["w"]).tolist() == [5.0] * 256


def test_a_full_disk_while_saving_stops_with_one_line_and_keeps_the_previous_checkpoint(trained, tmp_path,
                                                                                         monkeypatch):
    workdir = copy_run(trained, tmp_path / "w")  # Checkpoints at steps 2 and 4; the disk fills at step 6.
    original = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(workdir_lib.DiskFull) as e:
        train_lib.run(micro_config(num_steps=6), workdir)
    assert str(e.value) == (f"no space left on device while saving checkpoint step 6 in {workdir / 'checkpoints'}; "
                            f"the previous checkpoint (step 4) is intact; free some space and rerun the same command "
                            f"to resume")
    assert checkpoints.saved_steps(workdir / "checkpoints") == [2, 4]
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=3, read_only=True)
    step, _, meta = ckpt.restore_readable()  # Intact: it reads back.
    assert step == 4 and meta["step"] == 4 and not (workdir / "checkpoints_damaged").exists()


# ----------------------------------------------------------------------------- 5. sampling's partial output

CLASSES = ["tumor", "stroma"]


def fake_run(workdir):
    def eps(params, x, t, labels):
        return jnp.tanh(params * x + labels[:, None, None, None] * 0.3)
    config = ml_collections.ConfigDict({"sample": {
        "sampler": "ddim", "steps": 4, "num_per_class": 2, "seeds": "0-1", "exclude_classes": None,
        "guidance_scale": 1.0, "batch_size": 4}})
    return types.SimpleNamespace(
        workdir=str(workdir), config=config, step=3, class_names=list(CLASSES), params=0.5, eps_fn=eps,
        schedule=make_schedule(20), image_size=8, channels=1, condition_labels={c: i for i, c in enumerate(CLASSES)},
        null_label=None, used_ema=True, data_range="[0,1]")


def test_sampling_output_lock_partial_drift_and_damaged_images(tmp_path, monkeypatch):
    from fadjax import evaluate as evaluate_lib
    run, out = fake_run(tmp_path / "run"), str(tmp_path / "gens")
    with workdir_lib.WorkdirLock(out, what="sampling run"):  # Another sampling run holds it.
        with pytest.raises(workdir_lib.WorkdirLocked, match="in use by another sampling run"):
            sample_lib.generate(run, out, seeds=[0, 1], num_per_class=2, progress=False)

    # An interrupted run, then a rerun with other settings: refused, naming the setting.
    writes = []
    real_write = sample_lib._write_png

    def failing_write(path, image):
        writes.append(path)
        if len(writes) > 3:
            raise KeyboardInterrupt
        real_write(path, image)

    monkeypatch.setattr(sample_lib, "_write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        sample_lib.generate(run, out, seeds=[0, 1], num_per_class=2, progress=False)
    monkeypatch.setattr(sample_lib, "_write_png", real_write)
    with pytest.raises(sample_lib.SamplingDrift, match=r"partial sampling run with other settings: steps 4 -> 6\. "):
        sample_lib.generate(run, out, seeds=[0, 1], num_per_class=2, steps=6, progress=False)

    # The same settings finish it, keeping the 3 images already written.
    written = []
    monkeypatch.setattr(sample_lib, "_write_png", lambda p, im: written.append(p) or real_write(p, im))
    manifest = sample_lib.generate(run, out, seeds=[0, 1], num_per_class=2, progress=False)
    assert len(written) == 8 - 3
    fresh = str(tmp_path / "fresh")
    assert sample_lib.generate(run, fresh, seeds=[0, 1], num_per_class=2, progress=False)["images"] == manifest["images"]
    for e in manifest["images"]:
        np.testing.assert_array_equal(evaluate_lib.read_png(os.path.join(out, e["file"])),
                                      evaluate_lib.read_png(os.path.join(fresh, e["file"])))

    # A truncated image: evaluate names it in one line; sampling again redoes only it.
    victim = os.path.join(out, manifest["images"][5]["file"])
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    with pytest.raises(workdir_lib.WorkdirError, match=f"generated image {victim} cannot be decoded .*; rerun "):
        evaluate_lib._read_generated(out, manifest["images"][5]["file"])
    written.clear()
    assert sample_lib.generate(run, out, seeds=[0, 1], num_per_class=2, progress=False) == manifest
    assert written == [victim]
    np.testing.assert_array_equal(evaluate_lib.read_png(victim),
                                  evaluate_lib.read_png(os.path.join(fresh, manifest["images"][5]["file"])))


def test_config_drift_rules_field_by_field():
    old = config_lib.load("expert", "tiny")
    saved = json.loads(json.dumps(old.to_dict()))
    new = config_lib.load("expert", "tiny")
    new.train.num_epochs, new.train.progress, new.num_devices = 3, False, 2  # Extend and observe.
    changes = workdir_lib.config_drift(saved, new)
    assert {(c["field"], c["old"], c["new"], c["kind"]) for c in changes} == {
        ("train.num_epochs", 2, 3, "extend"), ("train.progress", True, False, "observe"),
        ("num_devices", None, 2, "observe")}
    new = config_lib.load("expert", "tiny")
    new.train.num_epochs, new.train.num_steps = None, 100  # A switch of the run length's field is drift.
    new.expert.width = 16
    with pytest.raises(workdir_lib.ConfigDrift, match=r"expert.width 8 -> 16; train.num_epochs 2 -> None; "
                                                      r"train.num_steps None -> 100\. Use a new --workdir"):
        workdir_lib.config_drift(saved, new)
    assert [c["kind"] for c in workdir_lib.config_drift(saved, new, allow=True)] == ["allowed"] * 3
    assert workdir_lib.disk_full(RuntimeError("x")) is False
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise ValueError("tensorstore write failed") from e
    except ValueError as e:
        assert workdir_lib.disk_full(e)
