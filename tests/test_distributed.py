"""Multi-process data parallelism: 2 processes x 2 CPU devices against 1 process x 4 devices,
then a kill and a resume of the 2-process run (the same command on every process)."""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from fadjax import runs

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
MICRO = [
    "--config=configs/baseline.py:tiny", "--config.data.source=demo:12", "--config.data.image_size=8",
    "--config.model.block_out_channels=8,16", "--config.model.attention_head_dim=1",
    "--config.model.cross_attention_dim=8", "--config.model.norm_num_groups=4",
    f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=6", "--config.train.log_every=2",
    "--config.train.batch_size=8", "--config.train.progress=false",
]


def _env(devices: int) -> dict:
    # The relaunched processes find their compiled programs in the persistent cache of the first launch.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    env.pop("FADJAX_COORDINATOR", None)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The expert stage, micro: ResNet18 of width 4 at 16 px on 60 demo images (48 train: 6 steps of 8 per epoch).
EXPERT_STEPS = 12
EXPERT = [
    "--config=configs/expert.py:tiny", "--config.data.source=demo:12", "--config.data.image_size=16",
    "--config.expert.width=4", "--config.expert.head_hidden=8", "--config.train.batch_size=8",
    "--config.train.num_epochs=2", "--config.train.checkpoint_every=4", "--config.train.log_every=2",
    "--config.train.eval_batch_size=12", "--config.train.progress=false",
]


def _launch(workdir, nproc: int, devices: int, logs: pathlib.Path, args=MICRO):
    port = _port()
    procs = []
    for i in range(nproc):
        cmd = [sys.executable, "train.py", *args, f"--workdir={workdir}"]
        if nproc > 1:
            cmd += [f"--coordinator=127.0.0.1:{port}", f"--num_processes={nproc}", f"--process_id={i}"]
        log = open(logs / f"{pathlib.Path(workdir).name}_{i}_{time.time_ns()}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    return procs


def _wait(procs, timeout=600):
    for p, log in procs:
        rc = p.wait(timeout=timeout)
        log.close()
        if rc != 0:
            raise AssertionError(f"process failed ({rc}):\n" + pathlib.Path(log.name).read_text()[-4000:])


def _steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_two_processes_match_one_process_and_resume_after_kill(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    # Reference: one process with 4 devices; and the 2x2 run, started at the same time.
    ref = _launch(tmp_path / "one", 1, 4, logs)
    two = _launch(tmp_path / "two", 2, 2, logs)
    # Kill the 2-process run (both processes, SIGKILL) once it has saved a checkpoint, mid-run.
    deadline = time.time() + 600
    while not _steps(tmp_path / "two") and time.time() < deadline:
        if any(p.poll() is not None for p, _ in two):
            break
        time.sleep(0.2)
    saved = _steps(tmp_path / "two")
    assert saved, "the 2-process run saved no checkpoint"
    for p, log in two:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log.close()
    # The kill lands at some step after the first checkpoint (or after the end, the steps are fast):
    # removing the later checkpoints makes it a kill right after the first one, every time.
    for step in _steps(tmp_path / "two")[1:]:
        shutil.rmtree(tmp_path / "two" / "checkpoints" / str(step))
    first = _steps(tmp_path / "two")[0]
    assert first < STEPS
    _wait(ref)
    # The same command again on both processes resumes.
    resumed = _launch(tmp_path / "two", 2, 2, logs)
    _wait(resumed)
    assert _steps(tmp_path / "two")[-1] == STEPS
    text = "".join(p.read_text() for p in logs.glob("two_*.log"))
    assert f"at step {first}" in text and "resumed from" in text
    assert "process 1 of 2" in text and "process 0 of 2" in text

    one = runs.load_diffusion_run(tmp_path / "one", use_ema=False).params
    two_p = runs.load_diffusion_run(tmp_path / "two", use_ema=False).params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-4), one, two_p)  # Adam: reordered sums move near-zero-gradient entries by up to ~lr
    # Only process 0 wrote the metrics: one line per logged step, no duplicates.
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_two_process_expert_resumes_on_every_process(tmp_path):
    """The expert stage restores its checkpoint onto each process's own devices (process 1 cannot
    address process 0's), after a kill right after its first checkpoint."""
    logs = tmp_path / "logs"
    logs.mkdir()
    first = _launch(tmp_path / "e", 2, 2, logs, EXPERT)
    _wait(first)
    for step in _steps(tmp_path / "e")[1:]:  # As if killed right after the first checkpoint.
        shutil.rmtree(tmp_path / "e" / "checkpoints" / str(step))
    kept = _steps(tmp_path / "e")
    assert kept and kept[0] < EXPERT_STEPS
    again = _launch(tmp_path / "e", 2, 2, logs, EXPERT)
    _wait(again)
    assert _steps(tmp_path / "e")[-1] == EXPERT_STEPS
    text = "".join(p.read_text() for p in logs.glob("e_*.log"))
    assert f"resumed from step {kept[0]}" in text and "process 1 of 2" in text
    assert runs.load_expert_run(tmp_path / "e").val_accuracy is not None


def test_two_processes_read_only_their_rows_on_the_host_path(tmp_path):
    """The host input path over 2 processes x 2 devices: each process reads only the examples of its half
    of every global batch, and the assembled batch equals the device path's (tests/host_feed_worker.py)."""
    port = _port()
    env = dict(_env(2), PYTHONPATH=str(REPO))  # This checkout's fadjax (the script's folder is tests/).
    procs = [subprocess.Popen([sys.executable, "tests/host_feed_worker.py", f"127.0.0.1:{port}", "2", str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert [[l for l in o.splitlines() if l.startswith("OK ")] for o in outs] == [["OK 0 4 48"], ["OK 4 8 48"]]
