"""The benchmark CLI on the tiny config (CPU) and the summariser on synthetic lines."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import summarise  # noqa: E402

REQUIRED = ("what", "config", "batch", "dtype", "img_per_s", "step_time_ms", "compile_s", "peak_bytes", "peak_gib",
            "flops", "flops_model", "tflops", "mfu_spec", "mfu_measured", "peak_tflops_spec",
            "peak_tflops_measured", "device", "device_name", "backend", "jax", "jaxlib", "flax", "date",
            "attention", "attention_requested", "program_bytes")


def _bench(*args, tmp_path, config="configs/feature_aligned.py:tiny"):
    """``python -m fadjax.bench`` on one CPU device, as a user runs it; returns its JSON lines."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One CPU device, not conftest's eight.
    # Cheap CPU code generation and the test suite's compilation cache keep the test fast.
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               JAX_COMPILATION_CACHE_DIR=os.environ.get(
                   "FADJAX_TEST_XLA_CACHE", str(pathlib.Path.home() / ".cache" / "fadjax-test-xla")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    jsonl = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "fadjax.bench", "--config", config, "--jsonl", str(jsonl),
         "--warmup", "1", "--iters", "1", "--repeats", "2", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == summarise.read_jsonl(str(jsonl))
    return printed


def _check_common(r):
    missing = [k for k in REQUIRED if k not in r]
    assert not missing, missing
    assert r["config"] == "configs/feature_aligned.py:tiny"
    assert r["backend"] == "cpu" and r["peak_bytes"] is None and r["mfu_spec"] is None
    assert r["img_per_s"] > 0 and r["step_time_ms"] > 0 and r["compile_s"] > 0
    assert r["flops"] > 0 and r["flops_model"] > 0 and r["tflops"] >= 0
    assert r["attention"] == "xla" and r["cudnn_fmha_calls"] == 0 and r["host_calls"] == 0
    assert r["finite"] is True


def test_cli_train_step(tmp_path):
    (r,) = _bench("--what", "train_step", "--attention", "cudnn", tmp_path=tmp_path)
    _check_common(r)
    assert r["what"] == "train_step" and r["batch"] == 8 and r["dtype"] == "float32"
    assert r["attention_requested"] == "cudnn" and r["attention"] == "xla"  # 'cudnn' falls back on a CPU.
    assert r["align"] is True and r["expert"] == "random resnet18 width 8"  # configs/expert.py:tiny's expert.
    assert r["donated"] is True
    assert abs(r["img_per_s"] - r["batch"] / (r["step_time_ms"] / 1e3)) / r["img_per_s"] < 1e-3
    assert len(r["step_time_ms_loops"]) == 2


def test_cli_sample(tmp_path):
    (r,) = _bench("--what", "sample", "--batch", "4", "--steps", "3", tmp_path=tmp_path)
    _check_common(r)
    assert r["what"] == "sample" and r["batch"] == 4 and r["steps"] == 3 and r["sampler"] == "ddim"
    # One sampler call is the whole chain: img/s at 1000 steps scales it to the reference's chain length.
    assert r["img_per_s_at_1000_steps"] == pytest.approx(r["img_per_s"] * 3 / 1000, rel=1e-2)
    # The compiled loop's cost analysis counts its body once; flops_model counts every step.
    assert r["flops_model"] > 2 * r["flops"]


def test_cli_plan_is_self_consistent(tmp_path):
    """``--what plan`` on the micro config: each number follows from the others as documented."""
    from fadjax import bench
    (r,) = _bench("--what", "plan", "--share", "0.5", tmp_path=tmp_path, config="configs/feature_aligned.py:micro")
    assert r["what"] == "plan" and r["config"] == "configs/feature_aligned.py:micro"
    b0, b1 = r["batch"], 2 * r["batch"]
    assert b0 == 8 and r["dtype"] == "float32" and r["backend"] == "cpu"
    # State: float32 parameters, Adam's two moments of each (and its step counters), no EMA in micro.
    assert r["param_bytes"] == 4 * r["params"]
    assert 2 * r["param_bytes"] <= r["opt_state_bytes"] <= 2 * r["param_bytes"] + 64
    assert r["ema_bytes"] == 0 and r["state_bytes"] == r["param_bytes"] + r["opt_state_bytes"]
    assert r["expert"] == "random resnet18 width 4" and r["expert_bytes"] > 0  # configs/expert.py:micro's expert.
    # FLOPs: the per-image part times the batch plus the per-step part gives each batch's count.
    flops = {int(k): v for k, v in r["train_flops"].items()}
    assert flops[b1] > flops[b0] > 0 and r["train_flops_per_image"] > 0
    for b in (b0, b1):
        assert r["train_flops_per_step_fixed"] + r["train_flops_per_image"] * b == pytest.approx(flops[b], rel=1e-9)
    s = r["sample"]
    assert s["sampler"] == "ddim" and s["steps"] == s["unet_calls"] == 4 and s["flops_per_image"] > 0
    # Memory: each program holds at least its arguments (state, frozen expert, data); the line through the
    # two batches' program bytes gives the per-step and per-image parts.
    m = r["memory"]
    assert m["per_image_bytes"] > 0 and m["source"].startswith("compiled")
    program = {int(k): v for k, v in m["program_bytes"].items()}
    assert program[b0] >= r["state_bytes"] + r["expert_bytes"] + r["data_bytes"]
    for b in (b0, b1):
        assert m["fixed_bytes"] + m["per_image_bytes"] * b == pytest.approx(program[b], abs=b)
    accs = r["accelerators"]
    assert list(accs) == ["H100", "H200", "TPU v5e", "TPU v4"]
    for name, a in accs.items():
        spec = bench.ACCELERATORS[name]
        assert a["usable_bytes"] == int(bench.USABLE_MEMORY * spec["memory_bytes"])
        # The largest batch fits the usable memory, one more image does not.
        n = a["max_batch"]
        assert m["fixed_bytes"] + n * m["per_image_bytes"] <= a["usable_bytes"]
        assert m["fixed_bytes"] + (n + 1) * m["per_image_bytes"] > a["usable_bytes"]
        assert a["max_batch_multiple_of_8"] % 8 == 0 and a["max_batch_multiple_of_8"] <= n
        # The predicted step: the step's FLOPs at half the float32 peak.
        assert a["peak_tflops"] == spec["peak_tflops"]["float32"] and a["share_of_peak"] == 0.5
        assert a["predicted_step_ms"] == pytest.approx(flops[b0] / (0.5 * a["peak_tflops"] * 1e12) * 1e3, rel=1e-3)
        assert a["predicted_img_per_s"] == pytest.approx(b0 / (a["predicted_step_ms"] / 1e3), rel=1e-2)
    assert accs["H200"]["max_batch"] > accs["H100"]["max_batch"] > accs["TPU v4"]["max_batch"] > accs["TPU v5e"]["max_batch"]


def test_plan_refuses_a_share_outside_0_1():
    from fadjax import bench, config_lib
    with pytest.raises(ValueError, match=r"^share=1.5: a fraction of peak FLOP/s in \(0, 1\]$"):
        bench.plan(config_lib.load("feature_aligned", "micro"), share=1.5)


def test_summarise(tmp_path):
    env = {"device": "NVIDIA H200", "date": "2026-11-29T00:00:00+00:00", "jax": "0.11.2", "flax": "0.12.8"}
    ours = [
        {"what": "train_step", "batch": 64, "dtype": "bfloat16", "attention": "cudnn", "img_per_s": 500.0,
         "step_time_ms": 128.0, "tflops": 400.0, "mfu_measured": 0.506, "mfu_spec": 0.404, "peak_gib": 40.0,
         "compile_s": 60.0, **env},
        {"what": "train_step", "batch": 4, "dtype": "float32", "attention": "xla", "img_per_s": 90.3, **env},
        {"what": "sample", "batch": 70, "dtype": "float32", "attention": "xla", "img_per_s": 14.0,
         "img_per_s_at_1000_steps": 0.7, "steps": 50, "sampler": "ddim", **env},
        {"what": "skipped", "part": "ours_max_batch"},
    ]
    peer = [
        {"peer": "torch-reference-step", "batch": 64, "align": True, "bf16": True, "compiled": True,
         "img_per_s": 250.0},
        {"peer": "torch-reference-unet-forward", "batch": 1, "evals_per_s": 50.0, "images_per_s_at_1000_steps": 0.05},
    ]
    path = tmp_path / "job.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ours + peer) + "a log line\n{not json\n")
    stored = tmp_path / "stored.jsonl"
    stored.write_text(json.dumps({"peer": "torch-reference-step", "batch": 4, "align": True, "bf16": False,
                                  "compiled": False, "img_per_s": 30.1}) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "summarise.py"), str(path), "--peer_fallback",
                          str(stored)], capture_output=True, text=True, check=True).stdout
    assert "### fadjax on NVIDIA H200" in out
    assert "| train_step | 64 | bfloat16 | cudnn | 500.00 | 128.0 | 400.0 | 50.6% | 40.4% | 40.00 | 60.0 |" in out
    assert "500.0 / 250.0 | 2.00x" in out  # ours / peer compiled bf16 batch 64, same job
    assert "the paper's setting) (stored run) | 90.3 / 30.1 | 3.00x" in out  # from the stored peer run
    assert "0.7000 / 0.0500 | 14.0x" in out  # sampling at 1000 steps vs one image at a time
    assert "14.000 / 0.0500 | 280x" in out  # as run (50 steps) vs the reference's 1000-step images
    assert "Skipped by the job's time limit: ours_max_batch." in out
    assert "peer bf16 b64 eager" not in out  # no such peer line, none stored: no ratio


def test_import_path_needs_no_hf_packages():
    """What the GPU image lacks stays out of the benchmark's imports (bench/README.md: wheels to carry)."""
    code = ("import sys, fadjax.bench, fadjax.sampling, fadjax.train.diffusion_stage, fadjax.models.expert, "
            "fadjax.models.build, fadjax.models.unet, fadjax.models.conditioning\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'dm_pix', 'tensorboardX', 'torch', 'tensorflow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    assert out.strip() == "[]"
